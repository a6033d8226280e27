"""Measured difficulty of each synthetic level, as data: what was run, on what, and what it gave.

Each :data:`MEASUREMENTS` record is one set of from-scratch segmentation runs on one difficulty level:

* ``difficulty``: a key of :data:`nnpre.synthetic.SYNTH_PRESETS`;
* ``model``: ``"proxy"`` (:data:`PROXY_SETUP`) or ``"cpu-tiny"`` (the demo's preset, ``nnpre/presets.py``);
* ``iterations``, ``optimizer``, ``test_cases``, ``seeds``;
* ``dice``: {labelled training cases: test lesion Dice per seed, in ``seeds`` order};
* ``ap``: the same for lesion AP @ IoU 0.1 where it was recorded;
* ``command``: the exact command that produced the numbers, or ``None`` where they came from a script that is not
  part of this repository (then ``source`` says what was run);
* ``commit``: the commit at which they were measured (later changes to training can move them).

:data:`REMEASURE` holds, per level, the command that measures the same quantity with today's code: the demo's
scratch runs (``results.json`` keys ``seg_scratch_n{N}_s{S}`` -> ``dice``). :data:`SYNTH_CALIBRATION` condenses
the records into one line per level for reports. ``python -m nnpre.synthetic.calibration`` prints the table.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["PROXY_SETUP", "LEVEL_SUMMARY", "MEASUREMENTS", "REMEASURE", "SYNTH_CALIBRATION", "calibration_line",
           "format_table"]

#: The proxy model of the first calibration (a script outside this repository; ~90 s per run on 1 CPU thread).
PROXY_SETUP = ("PlainConvUNet 8..64 features, 4 stages, 2 mm spacing, 32^3 patches, batch 2, CE + Dice, "
               "AdamW from scratch, sliding-window test Dice, 1 CPU thread")

#: What each level is (the knobs themselves: ``nnpre/synthetic/config.py``).
LEVEL_SUMMARY: Dict[str, str] = {
    "default": "low-contrast (12-70 HU) lesions of radius 3-10 mm, vessel and fat confounders, per-case intensity "
               "variation",
    "medium": "the default task with half the confounders (contrast 25-90 HU, less noise and bias, fewer vessels)",
    "cpu": "'medium' with lesions of radius 6-16 mm (as many voxels on the 2 mm cpu-tiny grid as default lesions "
           "at 1 mm)",
    "easy": "bright (150-250 HU) soft-tissue spheres, no vessels, no bias: a sanity task that saturates",
}

_PROXY_SOURCE = "proxy script outside the repository (PROXY_SETUP)"

MEASUREMENTS: Tuple[dict, ...] = (
    dict(difficulty="default", model="proxy", iterations=600, optimizer="AdamW", test_cases=6, seeds=(0, 1),
         dice={10: (0.16, 0.33), 2: (0.13, 0.08)}, command=None, source=_PROXY_SOURCE, commit="ea82955"),
    dict(difficulty="medium", model="proxy", iterations=600, optimizer="AdamW", test_cases=6, seeds=(0,),
         dice={10: (0.28,), 2: (0.09,)}, command=None, source=_PROXY_SOURCE, commit="ea82955"),
    dict(difficulty="easy", model="proxy", iterations=600, optimizer="AdamW", test_cases=6, seeds=(0,),
         dice={10: (0.91,)}, command=None, source=_PROXY_SOURCE, commit="ea82955"),
    # cpu-tiny, 6 x 45 iterations (the demo budget): 'medium' plateaued at Dice ~0.25 with 2 and 8 labels (only
    # lung nodules were learned; per-seed values were not kept), which is why the 'cpu' level exists.
    dict(difficulty="cpu", model="cpu-tiny", iterations=270, optimizer="AdamW 3e-3", test_cases=8, seeds=(0, 1, 2),
         dice={8: (0.375, 0.433, 0.368), 2: (0.201, 0.272, 0.297)},
         ap={8: (0.70, 0.63, 0.67), 2: (0.34, 0.54, 0.64)},
         command="nnPre_demo --preset cpu-tiny --difficulty cpu --seeds 3 --labelled 2,8",
         source="the demo's scratch runs", commit="e1a1f11"),
    dict(difficulty="easy", model="cpu-tiny", iterations=400, optimizer="AdamW 3e-3", test_cases=8, seeds=(0,),
         dice={8: (0.91,), 2: (0.88,)}, command=None, source="cpu-tiny scratch fine-tuning (script not kept)",
         commit="38a0054"),
)

#: Per level: the command that measures scratch test Dice with 2 and 8 labelled cases on today's code.
REMEASURE: Dict[str, str] = {
    level: f"nnPre_demo --preset cpu-tiny --difficulty {level} --seeds 3 --labelled 2,8 --out calib_{level}"
    for level in LEVEL_SUMMARY
}


def _span(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


def _model_words(rec: dict) -> str:
    words = "proxy tiny U-Net" if rec["model"] == "proxy" else rec["model"]
    extra = f", {len(rec['seeds'])} seeds" if len(rec["seeds"]) > 2 else ""
    return f"{words}, {rec['iterations']} iterations{extra}"


def calibration_line(level: str, measurements: Optional[Sequence[dict]] = None) -> str:
    """One line for ``level``: its summary and, per record, ``model, iterations: test Dice A-B with N ..., C with M``.

    Dice values of several seeds print as their range (min-max, 2 decimals).
    """
    recs = [r for r in (MEASUREMENTS if measurements is None else measurements) if r["difficulty"] == level]
    parts: List[str] = []
    for r in recs:
        sizes = sorted(r["dice"], reverse=True)
        dice = ", ".join(f"{_span(r['dice'][n])} with {n}" + (" labelled cases" if i == 0 else "")
                         for i, n in enumerate(sizes))
        parts.append(f"{_model_words(r)}: test Dice {dice}")
    return "; ".join([LEVEL_SUMMARY[level]] + parts)


#: One line per difficulty level for reports (``nnPre_demo``'s "Calibration" paragraph).
SYNTH_CALIBRATION: Dict[str, str] = {level: calibration_line(level) for level in LEVEL_SUMMARY}


def format_table(measurements: Optional[Sequence[dict]] = None) -> str:
    """Markdown table of all records: level, model, iterations, test cases, Dice per seed for each label count."""
    rows = ["| difficulty | model | iterations | test cases | labelled | Dice per seed | AP@0.1 per seed "
            "| measured by |",
            "|---|---|---|---|---|---|---|---|"]
    for r in (MEASUREMENTS if measurements is None else measurements):
        for n in sorted(r["dice"], reverse=True):
            ap = r.get("ap", {}).get(n)
            rows.append(f"| {r['difficulty']} | {r['model']} | {r['iterations']} | {r['test_cases']} | {n} | "
                        + " / ".join(f"{v:.3g}" for v in r["dice"][n]) + " | "
                        + (" / ".join(f"{v:.2f}" for v in ap) if ap else "--") + " | "
                        + (f"`{r['command']}` @ {r['commit']}" if r["command"] else f"{r['source']} @ {r['commit']}")
                        + " |")
    return "\n".join(rows)


def main() -> None:
    """Print the measurements and the commands that re-measure each level."""
    print(format_table())
    print(f"\nproxy: {PROXY_SETUP}\n\nre-measure (scratch Dice per seed in <out>/report/results.json):")
    for level, cmd in REMEASURE.items():
        print(f"  {level}: {cmd}")


if __name__ == "__main__":
    main()
