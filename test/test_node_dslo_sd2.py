"""DSLO's paper configuration in the node, over real DDS, the node in its own process.

The node starts from ``config/dslo_paper.yaml`` (``--params-file``, as README tells a user),
with ``-p`` overrides for what cannot be had here: the tiny random open_clip ViT and the tiny
random SD2-shaped diffusers pipeline (test/tiny_diffusion.py, written with ``save_pretrained``).
At runtime: switching between the CLIP affinities and sd2 (the SD model is loaded and released
by the worker thread, not the parameter service), refusals of bad sd settings up front, and a
model that cannot be loaded: the change is put back and the old settings keep serving.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from rclpy.parameter import Parameter
from ros_harness import (
    TINY_NODE_PARAMETERS,
    NodeProcess,
    image_array,
    make_image,
    next_header,
    running_node,
    shutdown_problems,
    startup_timeout,
    status_values,
)
from tiny_diffusion import save_tiny_pipeline

PRESET = Path(__file__).resolve().parents[1] / "config" / "dslo_paper.yaml"
CLASSES = ["cat", "dog", "person"]
STATUS = "ovss: image"
MISSING = "ovss-test/not-cached-sd2"  # a hub id that is not in the cache (offline)

pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"))


def overrides(pipeline: Path) -> dict:
    return TINY_NODE_PARAMETERS | {
        "classes": CLASSES,
        "dslo.sd.model": str(pipeline),
        "dslo.sd.size": 64,
    }


@pytest.fixture(scope="module")
def node(pipeline):
    with running_node(overrides(pipeline), ["--params-file", str(PRESET)]) as running:
        yield running


@pytest.fixture(scope="module")
def rgb(voc_rgb) -> np.ndarray:
    return np.ascontiguousarray(voc_rgb[1][:96, :128])


def segment(client, rgb) -> np.ndarray:
    message = make_image(rgb, "rgb8", next_header(client.node))
    return image_array(client.wait_for_output(message, ("labels",))["labels"])


def set_one(client, parameter: Parameter):
    return client.set_parameters([parameter])[0]


def wait_for_change(client, predicate):
    return client.wait_for_status(STATUS, lambda values: predicate(values["parameter change"]))


def test_the_paper_preset_serves_frames_with_the_sd2_affinity(client, rgb, node):
    _, process = node
    values = {name: client.get_parameter(name) for name in ("method", "refinement")}
    values |= {name: client.get_parameter(name) for name in ("dslo.affinity", "dense.upsample")}
    assert values == {
        "method": "vanilla",
        "refinement": "dslo",
        "dslo.affinity": "sd2",
        "dense.upsample": "jbu",
    }
    labels = segment(client, rgb)
    assert labels.shape == rgb.shape[:2] and labels.max() < len(CLASSES)
    assert "Stable Diffusion" not in "".join(shutdown_problems(process.output()))


def test_switching_the_affinity_at_runtime_loads_and_releases_the_sd_model(client, rgb):
    with_sd2 = segment(client, rgb)
    try:
        for source in ("naclip", "keykey", "mean"):
            assert set_one(client, Parameter("dslo.affinity", value=source)).successful
            wait_for_change(client, lambda text: text == "applied")
            assert client.get_parameter("dslo.affinity") == source
            segment(client, rgb)
    finally:
        assert set_one(client, Parameter("dslo.affinity", value="sd2")).successful
    wait_for_change(client, lambda text: text == "applied")  # loaded again by the worker
    # the same model and settings again: the same labels as before the switches
    np.testing.assert_array_equal(segment(client, rgb), with_sd2)


@pytest.mark.parametrize(
    ("parameter", "reason"),
    [
        # integer ranges are enforced by rclpy from the descriptor, with its own words
        (
            Parameter("dslo.sd.timestep", value=1000),
            "dslo.sd.timestep out of range. Min: 0, Max: 999",
        ),
        # dslo.sd.size's range is the per-frame budget's: the node refuses it, with the cost
        (Parameter("dslo.sd.size", value=32), "dslo.sd.size must be in [64, 1448], got 32"),
        (
            Parameter("dslo.sd.size", value=2048),
            "dslo.sd.size 2048 needs a 2.15 GB VAE activation",
        ),
        (Parameter("dslo.sd.temperature", value=0.0), "dslo.sd.temperature must be in"),
        (Parameter("dslo.sd.layers", value="middle"), "unknown dslo.sd.layers 'middle'"),
        (Parameter("dslo.sd.precision", value="fp8"), "unknown dslo.sd.precision 'fp8'"),
        (Parameter("dslo.sd.model", value=""), "dslo.sd.model must name a Stable Diffusion model"),
        (Parameter("dslo.sd.noise", value=1), "dslo.sd.noise must be a boolean"),
        (Parameter("dslo.affinity", value="dino"), "unknown dslo.affinity 'dino'"),
    ],
    ids=lambda value: getattr(value, "name", None),
)
def test_a_bad_sd_setting_is_refused_up_front(client, parameter, reason):
    before = client.get_parameter(parameter.name)
    result = set_one(client, parameter)
    assert not result.successful and reason in result.reason, result.reason
    assert client.get_parameter(parameter.name) == before


@pytest.mark.parametrize(
    "changes",
    [
        {"dslo.sd.model": MISSING},  # another SD model, while sd2 is in use
        {"dslo.sd.precision": "fp16"},  # a load the CPU refuses
    ],
    ids=["missing model", "fp16 on the CPU"],
)
def test_a_model_that_cannot_load_leaves_the_old_settings_serving(client, rgb, changes):
    before = {name: client.get_parameter(name) for name in changes}
    labels = segment(client, rgb)
    results = client.set_parameters([Parameter(k, value=v) for k, v in changes.items()])
    assert all(result.successful for result in results)  # only loading can tell
    status = wait_for_change(client, lambda text: "ModelLoadError" in text)
    assert "previous settings in force" in status_values(status)["parameter change"]
    client.spin_until(
        lambda: {name: client.get_parameter(name) for name in changes} == before,
        message="parameters put back",
    )
    np.testing.assert_array_equal(segment(client, rgb), labels)


def test_switching_to_sd2_with_a_missing_model_keeps_the_clip_affinity(client, rgb):
    from rcl_interfaces.srv import SetParametersAtomically
    from ros_harness import call_service

    try:
        assert set_one(client, Parameter("dslo.affinity", value="keykey")).successful
        wait_for_change(client, lambda text: text == "applied")
        before = {name: client.get_parameter(name) for name in ("dslo.affinity", "dslo.sd.model")}
        labels = segment(client, rgb)
        request = SetParametersAtomically.Request(
            parameters=[
                Parameter("dslo.affinity", value="sd2").to_parameter_msg(),
                Parameter("dslo.sd.model", value=MISSING).to_parameter_msg(),
            ]
        )
        atomic = client.node.create_client(
            SetParametersAtomically, "/ovss/set_parameters_atomically"
        )
        assert call_service(client.node, atomic, request).result.successful
        status = wait_for_change(client, lambda text: "ModelLoadError" in text)
        assert MISSING in status_values(status)["parameter change"]
        client.spin_until(
            lambda: {name: client.get_parameter(name) for name in before} == before,
            message="parameters put back",
        )
        np.testing.assert_array_equal(segment(client, rgb), labels)
    finally:
        assert set_one(client, Parameter("dslo.affinity", value="sd2")).successful
        wait_for_change(client, lambda text: text == "applied")


def test_start_up_without_the_sd_model_offline_fails_with_one_clear_message(pipeline):
    parameters = overrides(pipeline) | {"dslo.sd.model": MISSING}
    with NodeProcess(parameters, ["--params-file", str(PRESET)]) as process:
        try:
            returncode = process.wait(timeout=startup_timeout())
        except subprocess.TimeoutExpired:
            pytest.fail(f"node still running:\n{process.output()}")
        output = process.output()
    assert returncode == 1, output
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, output
    assert shutdown_problems(output) == errors, output
    assert MISSING in errors[0] and "set dslo.sd.model to a local directory" in errors[0], output
