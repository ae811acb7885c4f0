"""Exit statuses found by issue 20's sweep of every tool's failure paths (docs/tools.md): a
report file that cannot be written after the work is one line and status 1, never a traceback
(``ovss-bench --json`` under /proc ended in a FileNotFoundError traceback)."""

from __future__ import annotations

import tool_process
from conftest import TINY_VIT

TINY = ["--model", str(TINY_VIT), "--pretrained", "none", "--device", "cpu"]


def test_ovss_bench_says_in_one_line_that_its_json_was_not_written():
    done = tool_process.run_tool(
        "bench", *TINY, "--iterations", "1", "--warmup", "0", "--combos", "naclip",
        "--json", "/proc/no_such_dir/figures.json", timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[-1]] and "--json not written" in errors[-1], done.stderr[-3000:]
    assert done.stdout.strip()  # the figures were printed first
