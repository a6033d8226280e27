"""The study grid as data: runs, method names from the pretext registry, budgets and the time estimate."""
import pytest

from nnpre.errors import NnPreError
from nnpre.study.grid import (
    BUDGETS,
    DEFAULT_ADAPTERS,
    DEFAULT_METHODS,
    DETECTION_UNSUPPORTED,
    STEP_TIMES,
    Run,
    StudyBudget,
    StudyGrid,
    available_methods,
    describe,
    detection_skip_reason,
    estimate,
    parse_adapters,
    parse_labelled,
    parse_methods,
    run_steps,
)


def test_runs_order_names_and_seeds():
    g = StudyGrid(methods=("mae", "mg"), labelled=(2, 8), seeds=2)
    runs = g.runs()
    assert len(runs) == 2 * 2 * 2 * 3
    assert [r.name for r in runs[:6]] == ["seg_scratch_n2_s0", "seg_mae_n2_s0", "seg_mg_n2_s0",
                                          "seg_scratch_n2_s1", "seg_mae_n2_s1", "seg_mg_n2_s1"]
    assert runs[-1].name == "det_mg_n8_s1"
    assert {r.init_seed for r in runs} == {100, 101}
    assert g.all_methods == ["scratch", "mae", "mg"]
    with pytest.raises(NnPreError, match="--seeds must be >= 1"):
        StudyGrid(seeds=0)


def test_methods_come_from_the_registry():
    from nnpre_trainers.pretext import list_pretexts

    known = available_methods()
    assert known[:3] == list(DEFAULT_METHODS)
    assert len(known) == len(list_pretexts())  # one study method per registered task, 'mg' for model_genesis
    assert "model_genesis" not in known and "mg" in known
    assert parse_methods("all") == tuple(known)
    assert parse_methods("model_genesis, mae,mg") == ("mg", "mae")
    with pytest.raises(NnPreError, match=r"unknown pretext method\(s\) \['simclr'\]"):
        parse_methods("mae,simclr")
    with pytest.raises(NnPreError, match="empty"):
        parse_methods(" , ")


def test_parse_labelled():
    assert parse_labelled("8, 2,2", 8) == (2, 8)
    with pytest.raises(NnPreError, match="between 1 and the 8 labelled"):
        parse_labelled("9", 8)
    with pytest.raises(NnPreError, match="comma-separated integers"):
        parse_labelled("2,x", 8)


def test_estimate_is_the_stated_sum():
    b = StudyBudget(2, 10, 3, 5, 4, 6, 4, "cpu", 1, 8)
    t = STEP_TIMES["cpu-tiny"]
    g = StudyGrid(methods=("mae",), labelled=(1,), seeds=1)
    est = estimate(g, b, t)
    assert set(est.steps) == {"pretrain_mae", "seg_scratch_n1_s0", "seg_mae_n1_s0", "det_scratch_n1_s0",
                              "det_mae_n1_s0"}
    v = t.val_ratio * 2  # two validation iterations per epoch
    assert est.steps["pretrain_mae"] == pytest.approx(20 * t.pretrain_ratio + 2 * v * t.pretrain_ratio)
    assert est.steps["seg_mae_n1_s0"] == pytest.approx(15 + 3 * v + 6 * t.eval_per_case)
    assert est.steps["det_mae_n1_s0"] == pytest.approx(8 * t.detect_ratio + v * t.detect_ratio + 6 * t.eval_per_case)
    assert est.total_s == pytest.approx(sum(est.steps.values()) * t.seg_step_s)
    assert run_steps("seg", b, t, n_test=0) == pytest.approx(15 + 3 * v)


def test_gpu_default_grid_fits_eight_hours_and_cpu_tiny_fifteen_minutes():
    g = StudyGrid()
    gpu = estimate(g, BUDGETS["gpu"], STEP_TIMES["gpu"]).total_s
    assert 5 * 3600 < gpu <= 8 * 3600
    # the old budget (1000 x 250 for every run) was weeks
    old = StudyBudget(1000, 250, 1000, 250, 40, 20, 200, "default", 1000, 250)
    assert estimate(g, old, STEP_TIMES["gpu"]).total_s > 21 * 24 * 3600
    assert estimate(g, BUDGETS["cpu-tiny"], STEP_TIMES["cpu-tiny"]).total_s <= 15 * 60
    # faithful geometry is untouched: the budget only sets lengths
    from nnpre.presets import get_preset

    assert get_preset("gpu").patch_size == (128, 128, 128) and get_preset("gpu").num_epochs == 1000


def test_describe_lists_grid_lengths_and_time():
    text = describe(StudyGrid(), BUDGETS["gpu"], "gpu")
    assert "methods: mae, mg, diffusion (+ scratch)" in text
    assert "pretraining: 3 run(s) x 20x250 = 5000 iterations" in text
    assert "segmentation fine-tuning: 8 run(s) x 8x250 = 2000 iterations" in text
    assert "detection fine-tuning: 8 run(s) x 10x250 = 2500 iterations" in text
    assert "estimated time" in text and " h " in text and "0.50 s/step" in text


# ------------------------------------------------------------------------------------------------ adapter arms
def test_adapter_arms_for_pretrained_methods_only():
    from nnpre_trainers.trainer import variant_plans_name

    g = StudyGrid(methods=("mae", "mg"), labelled=(2,), seeds=1, adapters=("full", "lora", "probe-mlp"))
    seg = [r for r in g.runs() if r.task == "seg"]
    det = [r for r in g.runs() if r.task == "det"]
    assert [r.name for r in seg] == ["seg_scratch_n2_s0", "seg_mae_n2_s0", "seg_mae_n2_s0_lora",
                                     "seg_mae_n2_s0_probe-mlp", "seg_mg_n2_s0", "seg_mg_n2_s0_lora",
                                     "seg_mg_n2_s0_probe-mlp"]
    # probe-mlp cannot train a Retina U-Net: no detection arm, and a note says why
    assert [r.name for r in det] == ["det_scratch_n2_s0", "det_mae_n2_s0", "det_mae_n2_s0_lora", "det_mg_n2_s0",
                                     "det_mg_n2_s0_lora"]
    assert g.skipped() == [f"note: no detection arms for adapter probe-mlp: {DETECTION_UNSUPPORTED['probe-mlp']}"]
    # scratch trains fully, never with an adapter
    assert {r.adapter for r in g.runs() if r.method == "scratch"} == {"full"}
    assert g.arm_labels("seg") == ["scratch", "mae", "mae+lora", "mae+probe-mlp", "mg", "mg+lora", "mg+probe-mlp"]
    # run folders: full keeps its tag, the others append _<adapter>; a valid nnU-Net plans identifier
    lora = seg[2]
    assert (lora.tag, lora.arm, lora.init_seed) == ("mae_n2_s0_lora", "mae+lora", 100)
    assert seg[1].tag == "mae_n2_s0" and Run("seg", "mae", 2, 0).name == "seg_mae_n2_s0"
    assert len({r.name for r in g.runs()}) == len(g.runs())
    for t in (r.tag for r in g.runs()):
        assert variant_plans_name("nnPreResEncLPlans", t) == f"nnPreResEncLPlans_{t}"


def test_default_adapters_change_nothing_and_full_can_be_left_out():
    assert StudyGrid().adapters == DEFAULT_ADAPTERS == ("full",)
    assert StudyGrid().skipped() == []
    assert all(r.adapter == "full" and r.arm == r.method for r in StudyGrid().runs())
    g = StudyGrid(methods=("mae",), labelled=(1,), adapters=("lora",))
    assert [r.name for r in g.runs()] == ["seg_scratch_n1_s0", "seg_mae_n1_s0_lora", "det_scratch_n1_s0",
                                          "det_mae_n1_s0_lora"]
    # no pretrained methods: no arms and no notes
    assert StudyGrid(methods=(), labelled=(1,), adapters=("probe-mlp",)).skipped() == []


def test_parse_adapters_names_come_from_the_registry():
    from nnpre_trainers.adapters import list_adapters

    assert parse_adapters(" full, lora ,full,probe-linear") == ("full", "lora", "probe-linear")
    assert parse_adapters(",".join(list_adapters())) == tuple(list_adapters())
    with pytest.raises(NnPreError) as e:
        parse_adapters("full,lorra")
    msg = str(e.value)
    assert "\n" not in msg and "unknown adapter(s) ['lorra']" in msg and ", ".join(list_adapters()) in msg
    with pytest.raises(NnPreError, match="--adapters is empty"):
        parse_adapters(" , ")
    with pytest.raises(NnPreError, match=r"unknown adapter\(s\) \['peft'\]"):
        StudyGrid(adapters=("full", "peft"))
    assert detection_skip_reason("probe-mlp") and detection_skip_reason("lora") is None


def test_estimate_and_describe_include_the_adapter_arms():
    b = StudyBudget(2, 10, 3, 5, 4, 6, 4, "cpu", 1, 8)
    t = STEP_TIMES["cpu-tiny"]
    plain = estimate(StudyGrid(methods=("mae",), labelled=(1,)), b, t)
    g = StudyGrid(methods=("mae",), labelled=(1,), adapters=("full", "lora", "probe-mlp"))
    est = estimate(g, b, t)
    extra = {"seg_mae_n1_s0_lora", "seg_mae_n1_s0_probe-mlp", "det_mae_n1_s0_lora"}
    assert set(est.steps) == set(plain.steps) | extra
    # an adapter arm is estimated at the cost of the full fine-tuning run of its task
    assert est.steps["seg_mae_n1_s0_lora"] == est.steps["seg_mae_n1_s0"]
    assert est.steps["det_mae_n1_s0_lora"] == est.steps["det_mae_n1_s0"]
    assert est.total_s == pytest.approx(plain.total_s + sum(est.steps[k] for k in extra) * t.seg_step_s)
    text = describe(g, b, "cpu-tiny")
    assert "adapters: full, lora, probe-mlp" in text
    assert "segmentation fine-tuning: 4 run(s) x 3x5 = 15 iterations (scratch 1, full 1, lora 1, probe-mlp 1)" in text
    assert "detection fine-tuning: 3 run(s) x 1x8 = 8 iterations (scratch 1, full 1, lora 1)" in text
    assert "arms: scratch, mae, mae+lora, mae+probe-mlp" in text
    assert "note: no detection arms for adapter probe-mlp" in text and "of which adapter arms" in text
