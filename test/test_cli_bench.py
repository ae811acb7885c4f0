"""ovss-bench runs every stage and reports figures (their size is not tested: timing is noisy)."""

import json

import pytest
from conftest import TINY_VIT

from ovss_ros.cli.bench import STAGES, main, parse_combo

ENGINE = ["--model", str(TINY_VIT), "--pretrained", "none", "--templates", "single"]


def test_report_has_every_stage_and_the_bare_forward(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--combos", "naclip", "sclip+dslo-ot+jbu", "--iterations", "2", "--warmup", "1"]
    args += ["--size", "64", "--json", str(out)]
    assert main(args + ENGINE) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["input"] == [640, 480]
    assert report["bare_forward"]["median_ms"] > 0
    for combo in ("naclip", "sclip+dslo-ot+jbu"):
        result = report["combos"][combo]
        assert set(result["stages"]) == set(STAGES)
        assert all(s["p95_ms"] >= s["median_ms"] > 0 for s in result["stages"].values())
        assert result["end_to_end"]["median_ms"] > 0
    printed = capsys.readouterr().out
    assert "bare open_clip forward" in printed and "sclip+dslo-ot+jbu" in printed


def test_parse_combo():
    assert parse_combo("naclip") == {
        "method": "naclip",
        "refinement": "none",
        "pamr": False,
        "upsample": "bilinear",
        "affinity": "naclip",
    }
    settings = parse_combo("clearclip+dslo-velocity+pamr+jbu")
    assert settings["refinement"] == "dslo" and settings["dslo_mode"] == "velocity"
    assert settings["pamr"] and settings["upsample"] == "jbu"
    assert settings["affinity"] == "naclip"  # the default where a dslo part names none
    settings = parse_combo("vanilla+dslo-ot:sd2+jbu", "keykey")
    assert (settings["dslo_mode"], settings["affinity"]) == ("ot", "sd2")
    assert parse_combo("vanilla+dslo", "keykey")["affinity"] == "keykey"
    # every combo sets the affinity: one combo's :sd2 does not leak into the next
    assert parse_combo("vanilla+dslo:sd2+jbu")["affinity"] != parse_combo("vanilla")["affinity"]
    with pytest.raises(ValueError, match="unknown part"):
        parse_combo("naclip+crf")


def test_bad_combo_exits_2(capsys):
    assert main(["--combos", "naclip+magic", "--iterations", "1"] + ENGINE) == 2
    assert "unknown part" in capsys.readouterr().err
