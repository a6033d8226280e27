"""Tests for the calibration records: complete, consistent with the report lines, commands that parse."""
import shlex

from nnpre.synthetic import SYNTH_CALIBRATION, SYNTH_PRESETS
from nnpre.synthetic.calibration import MEASUREMENTS, REMEASURE, calibration_line, format_table, main


def test_every_difficulty_states_its_calibration():
    assert set(SYNTH_CALIBRATION) == set(SYNTH_PRESETS)


def test_records_are_complete_and_name_their_source():
    for r in MEASUREMENTS:
        assert r["difficulty"] in SYNTH_PRESETS and r["model"] in ("proxy", "cpu-tiny")
        assert r["command"] or r["source"], r
        assert len(r["commit"]) >= 7
        for n, vals in r["dice"].items():
            assert len(vals) == len(r["seeds"]) and all(0.0 <= v <= 1.0 for v in vals), (r["difficulty"], n)
        for n, vals in r.get("ap", {}).items():
            assert n in r["dice"] and len(vals) == len(r["seeds"])


def test_report_line_is_derived_from_the_records():
    assert "0.37-0.43 with 8 labelled cases, 0.20-0.30 with 2" in SYNTH_CALIBRATION["cpu"]
    changed = [dict(r, dice={8: (0.5, 0.7, 0.6), 2: (0.1, 0.1, 0.1)}) for r in MEASUREMENTS if r["difficulty"] == "cpu"]
    line = calibration_line("cpu", changed)
    assert line.endswith("test Dice 0.50-0.70 with 8 labelled cases, 0.10 with 2")
    table = format_table()
    assert table.count("\n") == 1 + sum(len(r["dice"]) for r in MEASUREMENTS)
    assert "0.375 / 0.433 / 0.368" in table


def test_commands_parse_with_the_demo_cli(capsys):
    from nnpre.cli.demo import build_parser

    commands = list(REMEASURE.values()) + [r["command"] for r in MEASUREMENTS if r["command"]]
    for cmd in commands:
        argv = shlex.split(cmd)
        assert argv[0] == "nnPre_demo"
        args = build_parser().parse_args(argv[1:])
        assert args.difficulty in SYNTH_PRESETS and args.seeds >= 1
    main()
    assert "nnPre_demo --preset cpu-tiny --difficulty easy" in capsys.readouterr().out
