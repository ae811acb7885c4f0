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

from ovss_ros.cli.tool_parser import log_once_to_stderr
from ovss_ros.core.clip.model_loading import load_clip

TOOL_TIMEOUT_S = 600
ENGINE = ["--model", str(TINY_VIT), "--pretrained", "none", "--templates", "single"]


def test_random_weights_are_announced_once_in_our_words(caplog):
    with caplog.at_level(logging.INFO):
        load_clip(str(TINY_VIT), "none", device="cpu")
    messages = [record.getMessage() for record in caplog.records]
    assert sum("RANDOM weights" in text for text in messages) == 1
    assert not [text for text in messages if "No pretrained weights loaded" in text]


def test_a_tool_prints_a_repeated_warning_once(capsys):
    """What ovss-bench's rounds did (DeOP's no-checkpoint warning at every rebuild, before issue
    21 named that mode superpixel_clip): the same warning logged again is not printed again."""
    handler = log_once_to_stderr()
    try:
        for _ in range(3):
            logging.getLogger("ovss_ros.test").warning("the same notice")
        logging.getLogger("ovss_ros.test").warning("another notice")
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("WARNING ovss_ros.test: the same notice") == 1, err
    assert err.count("another notice") == 1, err


def test_bench_prints_each_warning_once_per_run():
    """The tool as a user runs it (its own process: Python's logging as a command has it)."""
    args = ["--combos", "superpixel_clip", "naclip", "--iterations", "2", "--warmup", "1"]
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
    assert len(rounds) == 3  # three rebuilds of superpixel_clip at least
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, err  # superpixel_clip's notice is information, not a warning
    assert err.count("RANDOM weights") == 1, err
    assert "No pretrained weights loaded" not in err
