"""A short soak in CI: 30 Hz camera, vocabulary change every second, broken frames mixed in."""

import importlib.util
import json
import sys
from pathlib import Path

from conftest import TINY_VIT

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_soak_accounts_for_every_frame(tmp_path):
    soak = load_soak()
    out = tmp_path / "soak.json"
    args = ["--duration", "15", "--model", str(TINY_VIT), "--size", "64", "--json", str(out)]
    assert soak.main(args) == 0, out.read_text()
    report = json.loads(out.read_text())
    node = report["node"]
    assert report["sent_valid"] > 300 and report["sent_broken"] > 30  # ~30 Hz for 15 s
    assert node["received"] == report["sent_valid"] + report["sent_broken"]
    # A broken frame that a newer one overwrote before the worker took it counts as dropped.
    assert 0 < node["rejected"] <= report["sent_broken"]
    dropped = node["dropped_stale"] + node["dropped_overwritten"]
    assert node["dropped_paused"] == node["failed"] == node["in_progress"] == 0
    assert node["processed"] + dropped + node["rejected"] == node["received"]
    assert report["statuses"] >= 10 and report["statuses_not_adding_up"] == 0
    assert node["processed"] + dropped >= report["sent_valid"]
    assert report["answered"] == node["processed"] > 0
    assert report["vocabulary_accepted"] == report["vocabulary_changes"] >= 13


def test_soak_checks_can_fail():
    """The checks flag counters that do not add up, lost labels and memory growth."""
    soak = load_soak()
    args = soak.parse_args(["--duration", "9", "--max-growth-mib", "10"])
    report = soak.SoakReport(
        duration_s=9,
        sent_valid=10,
        sent_broken=1,
        answered=8,
        statuses=9,
        statuses_not_adding_up=2,
    )
    report.node = {
        "received": 11,
        "processed": 9,
        "dropped_paused": 0,
        "dropped_stale": 0,
        "dropped_overwritten": 0,
        "rejected": 1,
        "failed": 0,
        "in_progress": 0,
    }
    samples = [(0, 100.0), (3, 150.0), (9, 200.0)]
    soak.check(report, [(1.0, 0.01), (2.0, 0.02), (7.0, 0.5)], samples, args)
    text = " | ".join(report.failures)
    assert "do not add up" in text and "9 processed but 8 labels" in text
    assert "2 of 9 statuses did not add up" in text
    assert "memory grew 50.0 MiB" in text and "latency grew from 15 to 500 ms" in text
