"""Exit statuses found by issue 20's sweep of every tool's failure paths (docs/tools.md): a
report file that cannot be written after the work is one line and status 1, never a traceback
(``ovss-bench --json`` under /proc ended in a FileNotFoundError traceback)."""

from __future__ import annotations

import tool_process
from conftest import TINY_VIT

TINY = ["--model", str(TINY_VIT), "--pretrained", "none", "--device", "cpu"]


def test_ovss_bench_refuses_a_json_path_it_cannot_write_before_the_work():
    done = tool_process.run_tool(
        "bench", *TINY, "--iterations", "1", "--warmup", "0", "--combos", "naclip",
        "--json", "/proc/no_such_dir/figures.json", timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ovss-bench: error: --json: cannot write in '/proc' ("), done.stderr
    assert not done.stdout.strip()  # nothing timed


def test_ovss_bench_says_in_one_line_that_its_json_was_not_written():
    """A write that fails after the work (a full disk: /dev/full) is one line and status 1."""
    done = tool_process.run_tool(
        "bench", *TINY, "--iterations", "1", "--warmup", "0", "--combos", "naclip",
        "--json", "/dev/full", timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[-1]] and "--json not written" in errors[-1], done.stderr[-3000:]
    assert done.stdout.strip()  # the figures were printed first


def test_an_output_folder_nobody_may_write_in_is_refused_before_the_work(tmp_path):
    """/proc refuses new files even to root, whom os.access always allows: ovss-tune ran all
    its trials and ovss-eval its whole data set before finding that out."""
    import pytest

    from ovss_ros.cli.tool_parser import writable_folder

    with pytest.raises(ValueError, match=r"--output: cannot write in '/proc' \("):
        writable_folder("/proc/no_such_dir", "--output")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        writable_folder(tmp_path / "file" / "below", "--output")
    writable_folder(tmp_path / "new" / "folder", "--output")  # a folder that can be made
    assert not (tmp_path / "new").exists()  # and is not made by the check
    import shutil

    from conftest import voc_image_paths

    shutil.copy(voc_image_paths()[0], tmp_path / "photo.jpg")
    done = tool_process.run_tool(
        "tune", str(tmp_path / "photo.jpg"), "--classes", "cat",
        "-o", "/proc/no_such_dir/tuned.yaml",
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot write in '/proc'" in done.stderr and "Traceback" not in done.stderr
