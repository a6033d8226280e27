"""The study grid as data: runs, method names from the pretext registry, budgets and the time estimate."""
import pytest

from nnpre.errors import NnPreError
from nnpre.study.grid import (
    BUDGETS,
    DEFAULT_METHODS,
    STEP_TIMES,
    StudyBudget,
    StudyGrid,
    available_methods,
    describe,
    estimate,
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
    assert estimate(g, old, STEP_TIMES["gpu"]).total_s > 30 * 24 * 3600
    assert estimate(g, BUDGETS["cpu-tiny"], STEP_TIMES["cpu-tiny"]).total_s <= 15 * 60
    # faithful geometry is untouched: the budget only sets lengths
    from nnpre.presets import get_preset

    assert get_preset("gpu").patch_size == (128, 128, 128) and get_preset("gpu").num_epochs == 1000


def test_describe_lists_grid_lengths_and_time():
    text = describe(StudyGrid(), BUDGETS["gpu"], "gpu")
    assert "methods: mae, mg, diffusion (+ scratch)" in text
    assert "pretraining: 3 run(s) x 20x250 = 5000 iterations" in text
    assert "segmentation fine-tuning: 8 run(s) x 8x250 = 2000 iterations" in text
    assert "detection fine-tuning: 8 run(s) x 5x250 = 1250 iterations" in text
    assert "estimated time" in text and " h " in text and "0.50 s/step" in text
