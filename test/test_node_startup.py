"""A node that cannot start ends quickly, with status 1 and one message that says what to set.

The failing processes are started together (each one pays the torch import) and then checked
one by one. The managed node checks its parameters at start-up too (the model waits for
configure: test_node_lifecycle.py). Each runs from its console script, as ``ros2 run`` starts it.
"""

from __future__ import annotations

import subprocess

import pytest
from ros_harness import TINY_NODE_PARAMETERS, NodeProcess, shutdown_problems, startup_timeout

LIFECYCLE = "ovss_lifecycle_node"
# name: (parameters, texts the one error line must hold[, console script])
CASES = {
    "unknown model": (
        {"model": "NoSuchNet-42", "pretrained": "none"},
        ["unknown model", "NoSuchNet-42", "set model"],
    ),
    "missing checkpoint": (
        TINY_NODE_PARAMETERS | {"pretrained": "/nonexistent/ovss/weights.pt"},
        ["/nonexistent/ovss/weights.pt", "not found", "set pretrained"],
    ),
    "bad vocabulary": (
        TINY_NODE_PARAMETERS | {"classes": ["cat", "dog", "cat"]},
        ["duplicate class", "cat"],
    ),
    "out of range": (
        TINY_NODE_PARAMETERS | {"score_threshold": 5.0},
        ["score_threshold"],
    ),
    "duplicate camera": (
        TINY_NODE_PARAMETERS | {"cameras": ["front", "rear", "front"]},
        ["cameras", "duplicate", "front"],
    ),
    "camera name not a ROS name": (
        TINY_NODE_PARAMETERS | {"cameras": ["front", "rear/left"]},
        ["cameras", "'rear/left'", "not a valid ROS name token"],
    ),
    "managed node, bad vocabulary": (
        TINY_NODE_PARAMETERS | {"classes": ["cat", "cat"]},
        ["duplicate class", "cat"],
        LIFECYCLE,
    ),
}


@pytest.fixture(scope="module")
def failed_starts():
    processes = {
        name: NodeProcess(case[0], executable=case[2] if len(case) > 2 else "ovss_node")
        for name, case in CASES.items()
    }
    yield processes
    for process in processes.values():
        process.stop()
        process.log_path.unlink(missing_ok=True)


@pytest.mark.parametrize("case", list(CASES))
def test_start_up_failure_exits_with_one_clear_message(failed_starts, case):
    process = failed_starts[case]
    limit = startup_timeout(len(CASES))  # all of them start together
    try:
        returncode = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node still running after {limit} s:\n{process.output()}")
    output = process.output()
    assert returncode == 1, output
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, output
    assert shutdown_problems(output) == errors, output  # no traceback, no abort
    for text in CASES[case][1]:
        assert text in errors[0], output
