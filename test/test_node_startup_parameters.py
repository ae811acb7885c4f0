"""Parameters a node cannot start with end start-up at once: status 1, one clear line naming the
parameter and what was wrong, no traceback (issue 7, items 1 and 5).

The processes start together (each pays the torch import) and are checked one by one.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ros_harness import TINY_NODE_PARAMETERS, NodeProcess, child_environment

LIFECYCLE = "ovss_ros.ros.lifecycle_node"
# The namespace, deeper: room for a mask slug of ROOM characters (<ns>/ovss/masks/<slug>
# at most 247), whatever the vocabulary makes of a long name (a 48-character slug at most).
ROOM = 30
NAMESPACE = "/warehouse_robot_07/perception/front_left_camera/segmentation/"
NAMESPACE += "n" * (247 - len("/ovss/masks/") - ROOM - len(NAMESPACE))
LONG_CLASS = "a very long class name " * 8 + "x" * 9  # 193 characters: the example
# A params file in the names of the releases before namespaced parameters (issue 19).
OLD_PARAMS_FILE = Path(tempfile.gettempdir()) / "ovss_test_old_names.yaml"
OLD_PARAMS_FILE.write_text(
    "/**:\n  ros__parameters:\n    pnp_layer: 9\n    dense:\n      crop: 224\n"
)
# name: (parameters, extra ROS arguments, texts the one error line must hold, module)
CASES = {
    "mask topic too long": (
        TINY_NODE_PARAMETERS | {"classes": ["cat", LONG_CLASS]},
        ["-r", f"__ns:={NAMESPACE}"],
        ["cannot start", "classes: entry 1 'a very long class name", "characters long", "247"],
        "ovss_ros.ros.node",
    ),
    "managed node, mask topic too long": (
        TINY_NODE_PARAMETERS | {"classes": ["cat", LONG_CLASS]},
        ["-r", f"__ns:={NAMESPACE}"],
        ["cannot start", "classes: entry 1 'a very long class name", "characters long"],
        LIFECYCLE,
    ),
    "mask topic of a camera too long": (
        # Fits without a camera (242 characters), not under ~/front/ (248).
        TINY_NODE_PARAMETERS | {"classes": ["cat", "f" * (ROOM - 5)], "cameras": ["front"]},
        ["-r", f"__ns:={NAMESPACE}"],
        ["cannot start", "classes: entry 1 'fffff", "248 characters long"],
        "ovss_ros.ros.node",
    ),
    # Not only mask topics: any output topic or service of the node (a reviewer's cases).
    "output topic of a camera too long": (
        TINY_NODE_PARAMETERS | {"classes": ["a"], "cameras": ["c" * 20]},
        ["-r", "__ns:=/" + "n" * 210],
        ["cannot start", "label_info", "shorten the namespace"],
        "ovss_ros.ros.node",
    ),
    "managed node, output topic of a camera too long": (
        TINY_NODE_PARAMETERS | {"classes": ["a"], "cameras": ["c" * 20]},
        ["-r", "__ns:=/" + "n" * 210],
        ["cannot", "label_info", "shorten the namespace"],
        LIFECYCLE,
    ),
    "namespace too long for the node's own services": (
        TINY_NODE_PARAMETERS,
        ["-r", "__ns:=/" + "n" * 230],
        ["cannot start", "shorten the namespace"],
        "ovss_ros.ros.node",
    ),
    "text for a float": (
        TINY_NODE_PARAMETERS | {"overlay_alpha": "abc"},
        [],
        ["cannot start", "overlay_alpha must be a floating-point number, got string 'abc'"],
        "ovss_ros.ros.node",
    ),
    "integer for a boolean": (
        TINY_NODE_PARAMETERS | {"publish_masks": 1},
        [],
        ["cannot start", "publish_masks must be a boolean (true or false), got integer 1"],
        "ovss_ros.ros.node",
    ),
    # pnp_ovss, deop (issues 9, 10): the second model or the checkpoint, named in the line.
    "pnp_ovss with a VLM that is not available offline": (
        TINY_NODE_PARAMETERS | {"method": "pnp_ovss", "pnp.vlm_pretrained": "Salesforce/blip-x"},
        [],
        ["cannot start", "'Salesforce/blip-x'", "not in the local", "set pnp.vlm_pretrained"],
        "ovss_ros.ros.node",
    ),
    "deop with a missing checkpoint": (
        TINY_NODE_PARAMETERS | {"method": "deop", "deop.checkpoint": "/nowhere/deop.pt"},
        [],
        ["cannot start", "deop.checkpoint '/nowhere/deop.pt' not found"],
        LIFECYCLE,
    ),
    # Issue 21: deop without its proposal network is not DeOP (superpixel_clip is that mode).
    "deop without a checkpoint": (
        TINY_NODE_PARAMETERS | {"method": "deop"},
        [],
        [
            "cannot start",
            "method deop needs its proposal network and deop.checkpoint is empty",
            "use method superpixel_clip for the training-free mode",
        ],
        "ovss_ros.ros.node",
    ),
    "integer float out of range": (
        TINY_NODE_PARAMETERS | {"overlay_alpha": 2},
        [],
        ["cannot start", "overlay_alpha must be in [0.0, 1.0], got 2"],
        LIFECYCLE,
    ),
    # Issue 19: a flat name of an earlier release is refused with its new name, not ignored.
    "old flat name on the command line": (
        TINY_NODE_PARAMETERS | {"crop": 224},
        [],
        ["cannot start", "crop was renamed dense.crop"],
        "ovss_ros.ros.node",
    ),
    "managed node, old flat name in a params file": (
        TINY_NODE_PARAMETERS,
        ["--params-file", str(OLD_PARAMS_FILE)],
        ["cannot start", "pnp_layer was renamed pnp.layer"],
        LIFECYCLE,
    ),
}


@pytest.fixture(scope="module")
def failed_starts():
    processes = {
        name: NodeProcess(parameters, extra, module=module)
        for name, (parameters, extra, _, module) in CASES.items()
    }
    yield processes
    for process in processes.values():
        process.stop()
        process.log_path.unlink(missing_ok=True)


@pytest.mark.parametrize("case", list(CASES))
def test_start_up_with_a_bad_parameter_ends_with_one_clear_line(failed_starts, case):
    process = failed_starts[case]
    try:
        returncode = process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node still running after 300 s:\n{process.output()}")
    output = process.output()
    assert returncode == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, output
    for text in CASES[case][2]:
        assert text in errors[0], output


MODEL_LIBRARIES = ("torch", "open_clip", "transformers", "diffusers", "scipy", "skimage")


@pytest.mark.parametrize("module", ["ovss_ros.ros.node", LIFECYCLE])
@pytest.mark.parametrize(
    ("parameter", "reason"),
    [
        ("short_side:=-1", "short_side"),
        ("crop:=224", "crop was renamed dense.crop"),
        ("dslo.sd.size:=4096", "dslo.sd.size 4096 needs"),
        ("method:=nope", "unknown method 'nope'"),
    ],
)
def test_a_bad_parameter_is_refused_before_any_model_library_loads(module, parameter, reason):
    """Issue 19: parameters are checked from the settings' definitions, without torch, so a
    node with a bad one ends in well under a second instead of after the model imports (the
    interpreter's own import log, ``-X importtime``, shows every module it imported)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, "--ros-args", "-p", parameter],
        cwd=Path(__file__).resolve().parents[1],
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    log = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in log}
    assert "rclpy" in imported  # the log is read
    assert not imported & set(MODEL_LIBRARIES), sorted(imported & set(MODEL_LIBRARIES))
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and reason in errors[0], errors
