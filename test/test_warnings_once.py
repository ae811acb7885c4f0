"""Issue 20: a warning is said once, in one format.

ovss-bench printed DeOP's no-checkpoint warning once per round (every round rebuilds each
combo's method), and a tool on random weights printed two warnings about them: ours (what to
set) and open_clip's own "No pretrained weights loaded" on the root logger.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from conftest import TINY_VIT

from ovss_ros.core.clip.model_loading import load_clip

TOOL_TIMEOUT_S = 600
ENGINE = ["--model", str(TINY_VIT), "--pretrained", "none", "--templates", "single"]


def test_random_weights_are_announced_once_in_our_words(caplog):
    with caplog.at_level(logging.INFO):
        load_clip(str(TINY_VIT), "none", device="cpu")
    messages = [record.getMessage() for record in caplog.records]
    assert sum("RANDOM weights" in text for text in messages) == 1
    assert not [text for text in messages if "No pretrained weights loaded" in text]


def test_bench_prints_each_warning_once_per_run():
    """The tool as a user runs it (its own process: Python's logging as a command has it)."""
    args = ["--combos", "deop", "naclip", "--iterations", "2", "--warmup", "1"]
    args += ["--short-side", "64", "--width", "64", "--height", "48"]
    done = subprocess.run(
        [sys.executable, "-m", "ovss_ros.cli.bench", *args, *ENGINE],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr
    rounds = [line for line in err.splitlines() if line.startswith("round ")]
    assert len(rounds) == 3  # three rebuilds of DeOP at least, besides the check up front
    assert err.count("DeOP without a checkpoint") == 1, err
    assert err.count("RANDOM weights") == 1, err
    assert "No pretrained weights loaded" not in err
