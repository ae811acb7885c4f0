"""Ctrl-C in the tools that run long without a handler of their own before issue 20:
``ovss-bench`` (timed rounds) and ``ovss-train-deop`` (training steps) end with status 130 and
one line that says what was kept, never a traceback (docs/tools.md, exit statuses)."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY_VIT
from tool_process import interrupted

from ovss_ros.tools.tiny_models import save_shapes

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", str(TINY_VIT), "--pretrained", "none", "--device", "cpu"]


def test_ctrl_c_ends_ovss_bench_with_130_and_nothing_reported(tmp_path):
    json_path = tmp_path / "figures.json"
    args = [*TINY, "--iterations", "100000", "--warmup", "0", "--json", str(json_path)]
    status, _, err = interrupted("bench", args, b"timed rounds", tmp_path)
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and err.rstrip().endswith(
        "ovss-bench: interrupted; nothing reported"
    ), err[-3000:]
    assert not json_path.exists()


def test_ctrl_c_ends_ovss_train_deop_with_130_naming_the_checkpoint_kept(tmp_path):
    data = save_shapes(tmp_path / "shapes")
    output = tmp_path / "run"
    args = ["folder", str(data), "--stage", "head", "--output", str(output), *TINY]
    args += ["--steps", "100000"]
    args += ["--batch-size", "1", "--crop", "64", "--proposals", "4", "--checkpoint-every", "1"]
    status, _, err = interrupted("train_deop", args, b"training images", tmp_path)
    assert status == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.rstrip().splitlines()[-1]
    # Ctrl-C may come before the first step's checkpoint or after: the line says which.
    if (output / "checkpoint.pt").is_file():
        assert last == (
            f"ovss-train-deop: interrupted; the last checkpoint is {output / 'checkpoint.pt'} "
            "(continue with --resume)"
        ), err[-3000:]
    else:
        assert last == "ovss-train-deop: interrupted; no checkpoint was written", err[-3000:]
