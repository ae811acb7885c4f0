"""ovss-bench runs every stage and reports figures (their size is not tested: timing is noisy)."""

import json

import pytest
from conftest import TINY_VIT

from ovss_ros.cli.bench import STAGES, main, parse_combo
from ovss_ros.core import EngineConfig
from ovss_ros.core.segmenter import Segmenter

ENGINE = ["--model", str(TINY_VIT), "--pretrained", "none", "--templates", "single"]


def test_report_has_every_stage_and_the_bare_forward(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--combos", "naclip", "sclip+dslo-ot+jbu", "--iterations", "3", "--warmup", "1"]
    args += ["--short-side", "64", "--json", str(out)]
    assert main(args + ENGINE) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["input"] == [640, 480]
    assert report["bare_forward"]["median_ms"] > 0
    for combo in ("naclip", "sclip+dslo-ot+jbu"):
        result = report["combos"][combo]
        assert set(result["stages"]) == set(STAGES)
        assert all(s["p95_ms"] >= s["median_ms"] > 0 for s in result["stages"].values())
        e2e = result["end_to_end"]
        assert e2e["p75_ms"] >= e2e["median_ms"] >= e2e["p25_ms"] >= e2e["min_ms"] > 0
        # From the same iterations: no end-to-end figure below that of one of its stages.
        for key in ("median_ms", "p95_ms", "p25_ms", "p75_ms", "min_ms"):
            assert e2e[key] >= max(s[key] for s in result["stages"].values()), key
    captured = capsys.readouterr()
    printed = captured.out
    assert "bare open_clip forward" in printed and "sclip+dslo-ot+jbu" in printed
    assert "spread (IQR)" in printed
    # Progress on stderr while it runs: one line per round, every row in every round.
    rounds = [line for line in captured.err.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == [
        "round 1/4 (warm-up)",
        "round 2/4 (timed)",
        "round 3/4 (timed)",
        "round 4/4 (timed)",
    ]
    for line in rounds:
        rows = [part.split(" ")[0] for part in line.split(": ", 1)[1].split(", ")]
        assert rows == ["bare", "naclip", "sclip+dslo-ot+jbu"]  # interleaved, in order


def test_rows_are_interleaved_round_by_round(monkeypatch):
    """The engine sees the combos in turn within each round, not one combo's frames in a row."""
    order = []
    original = Segmenter.reconfigure

    def recording(self, changes=None, **shared):
        order.append(changes["method"])
        return original(self, changes, **shared)

    monkeypatch.setattr(Segmenter, "reconfigure", recording)
    args = ["--combos", "naclip", "sclip", "clearclip", "--iterations", "2", "--warmup", "1"]
    assert main(args + ["--short-side", "64", "--width", "64", "--height", "48"] + ENGINE) == 0
    # Once each up front (a combo that cannot run is refused before any timing), then the
    # warm-up round and the two timed rounds, each combo in turn.
    assert order == ["naclip", "sclip", "clearclip"] * 4


def test_parse_combo():
    assert parse_combo("naclip") == {
        "method": "naclip",
        "refinement": "none",
        "dense.pamr": False,
        "dense.upsample": "bilinear",
        "dslo.affinity": "naclip",
    }
    settings = parse_combo("clearclip+dslo-velocity+pamr+jbu")
    assert settings["refinement"] == "dslo" and settings["dslo.mode"] == "velocity"
    assert settings["dense.pamr"] and settings["dense.upsample"] == "jbu"
    assert settings["dslo.affinity"] == "naclip"  # the default where a dslo part names none
    settings = parse_combo("vanilla+dslo-ot:sd2+jbu", "keykey")
    assert (settings["dslo.mode"], settings["dslo.affinity"]) == ("ot", "sd2")
    assert parse_combo("vanilla+dslo", "keykey")["dslo.affinity"] == "keykey"
    assert parse_combo("superpixel_clip+p50")["deop.proposals"] == 50
    # every combo sets the affinity: one combo's :sd2 does not leak into the next
    sd2, plain = parse_combo("vanilla+dslo:sd2+jbu"), parse_combo("vanilla")
    assert sd2["dslo.affinity"] != plain["dslo.affinity"]
    combos = ("clearclip+dslo-velocity+pamr+jbu", "vanilla+dslo-ot:sd2+jbu", "superpixel_clip+p50")
    for combo in combos:
        EngineConfig.from_flat(parse_combo(combo))  # every name is a setting's
    with pytest.raises(ValueError, match="unknown part"):
        parse_combo("naclip+crf")


def test_bad_combo_exits_2(capsys):
    assert main(["--combos", "naclip+magic", "--iterations", "1"] + ENGINE) == 2
    assert "unknown part" in capsys.readouterr().err


def test_unreadable_image_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such.jpg"
    assert main(["--image", str(missing), "--iterations", "1"] + ENGINE) == 2
    assert "no-such.jpg" in capsys.readouterr().err
