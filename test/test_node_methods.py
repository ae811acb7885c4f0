"""The node switches to and from pnp_ovss, superpixel_clip and deop over real DDS (issues 9, 10
and 21).

The node runs in its own process with a tiny CLIP whose random weights are saved to a file here
(so this test can compute the same outputs) and a tiny random BLIP saved with save_pretrained.
A switch is applied by the worker (the VLM or checkpoint loads there, the parameter service stays
free); the outputs after it are the new method's, equal to an engine built here with the same
parameters. A missing checkpoint, or deop without one, is refused up front with the reason (the
node keeps serving, the parameters stay as they were); a load that fails in the
worker (a checkpoint of another CLIP, a layer the VLM lacks) keeps the old method serving and
puts the parameters back.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_B32
from rclpy.parameter import Parameter
from ros_harness import (
    TINY_NODE_PARAMETERS,
    call_service,
    image_array,
    make_image,
    next_header,
    running_node,
    status_values,
)
from test_deop_released import released_file
from tiny_blip import IMAGE_SIZE, save_tiny_blip

from ovss_ros.core import Segmenter
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.deop.checkpoint import save_checkpoint
from ovss_ros.core.methods.deop.deop import DeopConfig
from ovss_ros.core.methods.deop.heads import DeopModules
from ovss_ros.ros import parameters as node_parameters

STATUS = "ovss: image"
CLASSES = ["person", "dog", "tv"]
RELEASE = {"deop.proposals": 100}  # the release's decoder has a slot per MaskFormer query

pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("methods")
    torch.manual_seed(0)
    clip = load_clip(str(TINY_VIT), "none", "cpu")
    weights = folder / "tiny-vit.pt"
    torch.save(clip.model.state_dict(), weights)
    other = load_clip(str(TINY_VIT_B32), "none", "cpu")
    modules = DeopModules.create(int(other.model.visual.output_dim), decoder={"heads": 4})
    mismatched = save_checkpoint(folder / "b32.pt", modules, other, asdict(DeopConfig()))
    modules = DeopModules.create(int(clip.model.visual.output_dim), decoder={"heads": 4})
    deop = save_checkpoint(folder / "deop.pt", modules, clip, {})  # on the node's CLIP
    released_file(folder / "release.pth", clip.model)  # the DeOP release's layout
    released_file(folder / "release_b32.pth", other.model)
    return {
        "weights": weights,
        "blip": save_tiny_blip(folder),
        "mismatched": mismatched,
        "trained": deop,  # not a method's name: the change table maps names to files
        "release": folder / "release.pth",
        "release_b32": folder / "release_b32.pth",
    }


@pytest.fixture(scope="module")
def parameters(files):
    return TINY_NODE_PARAMETERS | {
        "pretrained": str(files["weights"]),
        "classes": CLASSES,
        "pnp.vlm_pretrained": str(files["blip"]),
        "pnp.image_size": IMAGE_SIZE,
        "pnp.layer": 2,
        "pnp.head": 3,
        "pnp.dropout_rounds": 2,
        "pnp.dropout_patches": 2,
        "deop.proposals": 12,
    }


@pytest.fixture(scope="module")
def node(parameters):
    with running_node(parameters) as (client, process):
        yield client, process


@pytest.fixture(scope="module")
def rgb(voc_rgb) -> np.ndarray:
    return np.ascontiguousarray(voc_rgb[1][:96, :128])


@pytest.fixture(scope="module")
def expected(parameters, files, rgb):
    """What each method gives for ``rgb`` with the node's parameters, computed here (deop with
    the checkpoint ``files["trained"]``)."""
    values = node_parameters.defaults() | parameters | {"device": "cpu"}
    segmenter = Segmenter(node_parameters.validate(values).engine)
    segmenter.set_classes(CLASSES)
    out = {}
    for method in ("naclip", "pnp_ovss", "superpixel_clip", "deop"):
        changes = {"deop.checkpoint": str(files["trained"])} if method == "deop" else {}
        segmenter.reconfigure(changes, method=method)
        out[method] = segmenter.segment(rgb)
    segmenter.reconfigure(RELEASE | {"deop.checkpoint": str(files["release"])}, method="deop")
    out["release"] = segmenter.segment(rgb)
    return out


def segment(client, rgb):
    message = make_image(rgb, "rgb8", next_header(client.node))
    out = client.wait_for_output(message, ("labels", "confidence"))
    return image_array(out["labels"]), image_array(out["confidence"])


def assert_serves(client, rgb, segmentation):
    labels, confidence = segment(client, rgb)
    assert np.mean(labels == segmentation.labels) > 0.99
    np.testing.assert_allclose(confidence, segmentation.confidence, atol=1e-3)


def set_atomically(client, parameters: list[Parameter]):
    from rcl_interfaces.srv import SetParametersAtomically

    service = client.node.create_client(SetParametersAtomically, "/ovss/set_parameters_atomically")
    request = SetParametersAtomically.Request(
        parameters=[p.to_parameter_msg() for p in parameters]
    )
    return call_service(client.node, service, request).result


def wait_for_change(client, predicate):
    return client.wait_for_status(STATUS, lambda values: predicate(values["parameter change"]))


def switch(client, method: str) -> None:
    assert set_atomically(client, [Parameter("method", value=method)]).successful
    wait_for_change(client, lambda text: text == "applied")


def test_the_outputs_tell_the_methods_apart(expected):
    naclip = expected["naclip"]
    for method in ("pnp_ovss", "superpixel_clip", "deop", "release"):
        other = expected[method]
        assert not np.allclose(other.confidence, naclip.confidence, atol=1e-3), method


def test_naclip_to_pnp_ovss_and_back(client, node, rgb, expected):
    _, process = node
    assert_serves(client, rgb, expected["naclip"])
    switch(client, "pnp_ovss")
    assert client.get_parameter("method") == "pnp_ovss"
    assert_serves(client, rgb, expected["pnp_ovss"])
    assert "method pnp_ovss with blip_itm" in process.output()
    switch(client, "naclip")
    assert_serves(client, rgb, expected["naclip"])


def test_naclip_to_superpixel_clip_says_it_runs_training_free(client, node, rgb, expected):
    _, process = node
    switch(client, "superpixel_clip")
    assert client.get_parameter("method") == "superpixel_clip"
    assert_serves(client, rgb, expected["superpixel_clip"])
    assert "method superpixel_clip (training-free): superpixels proposals" in process.output()
    assert "without a checkpoint" not in process.output()  # not DeOP's warning any more
    assert "[ERROR]" not in process.output()
    switch(client, "naclip")
    assert_serves(client, rgb, expected["naclip"])


def deop_refused(result) -> None:
    assert not result.successful
    assert "method deop needs its proposal network and deop.checkpoint is empty" in result.reason
    assert "use method superpixel_clip for the training-free mode" in result.reason


def test_deop_without_a_checkpoint_is_refused_and_the_node_keeps_serving(
    client, files, rgb, expected
):
    # From naclip, through both parameter services.
    deop_refused(set_atomically(client, [Parameter("method", value="deop")]))
    deop_refused(client.set_parameters([Parameter("method", value="deop")])[0])
    assert client.get_parameter("method") == "naclip"
    assert_serves(client, rgb, expected["naclip"])
    # From deop with a checkpoint: emptying deop.checkpoint is refused; deop keeps serving.
    checkpoint = str(files["trained"])
    assert set_atomically(
        client, [Parameter("method", value="deop"), Parameter("deop.checkpoint", value=checkpoint)]
    ).successful
    wait_for_change(client, lambda text: text == "applied")
    assert_serves(client, rgb, expected["deop"])
    deop_refused(set_atomically(client, [Parameter("deop.checkpoint", value="")]))
    assert (client.get_parameter("method"), client.get_parameter("deop.checkpoint")) == (
        "deop",
        checkpoint,
    )
    assert_serves(client, rgb, expected["deop"])
    # The fix the reason names: superpixel_clip (the checkpoint may stay: it reads none).
    switch(client, "superpixel_clip")
    assert_serves(client, rgb, expected["superpixel_clip"])
    assert set_atomically(
        client, [Parameter("method", value="naclip"), Parameter("deop.checkpoint", value="")]
    ).successful
    wait_for_change(client, lambda text: text == "applied")
    assert_serves(client, rgb, expected["naclip"])


def test_a_missing_checkpoint_is_refused_with_the_reason(client, rgb, expected):
    result = set_atomically(
        client,
        [Parameter("method", value="deop"), Parameter("deop.checkpoint", value="/nowhere/d.pt")],
    )
    assert not result.successful
    assert "deop.checkpoint '/nowhere/d.pt' not found" in result.reason
    assert client.get_parameter("method") == "naclip"
    assert client.get_parameter("deop.checkpoint") == ""
    assert_serves(client, rgb, expected["naclip"])


def test_deop_on_the_release_file_serves_the_published_system(client, node, files, rgb, expected):
    _, process = node
    release = str(files["release"])
    change = {"method": "deop", "deop.checkpoint": release} | RELEASE
    assert set_atomically(client, [Parameter(k, value=v) for k, v in change.items()]).successful
    wait_for_change(client, lambda text: text == "applied")
    assert_serves(client, rgb, expected["release"])
    assert f"DeOP as released from {release} (DeOP release): MaskFormer proposals" in (
        process.output()
    )
    assert "input short side 512 (the release's, not short_side" in process.output()
    # The release fixes its proposal count: 12 is refused up front, the release keeps serving.
    result = set_atomically(client, [Parameter("deop.proposals", value=12)])
    assert not result.successful
    assert "deop.proposals must be 100 with the DeOP file" in result.reason
    assert "its MaskFormer has 100 queries" in result.reason and "got 12" in result.reason
    assert_serves(client, rgb, expected["release"])
    back = {"method": "naclip", "deop.checkpoint": "", "deop.proposals": 12}
    assert set_atomically(client, [Parameter(k, value=v) for k, v in back.items()]).successful
    wait_for_change(client, lambda text: text == "applied")
    assert_serves(client, rgb, expected["naclip"])


@pytest.mark.parametrize(
    ("change", "failure"),
    [
        (
            {"method": "deop", "deop.checkpoint": "mismatched"},
            "was trained on CLIP 'tiny-vit-b32'",
        ),
        (
            {"method": "deop", "deop.checkpoint": "release_b32"} | {"deop.proposals": 100},
            "the decoder is 48 wide, the loaded CLIP's needs 32",
        ),
        ({"method": "pnp_ovss", "pnp.layer": 9}, "pnp.layer 9 > the VLM's 3 text layers"),
    ],
    ids=["mismatched checkpoint", "release of another CLIP", "layer the VLM lacks"],
)
def test_a_failed_load_keeps_the_old_method_and_puts_the_parameters_back(
    client, files, rgb, expected, change, failure
):
    change = {k: str(files[v]) if v in files else v for k, v in change.items()}
    before = {name: client.get_parameter(name) for name in change}
    # Nothing here can be checked before loading: accepted, then the worker's load fails.
    assert set_atomically(client, [Parameter(k, value=v) for k, v in change.items()]).successful
    status = wait_for_change(client, lambda text: failure in text)
    assert "previous settings in force" in status_values(status)["parameter change"]
    client.spin_until(
        lambda: {name: client.get_parameter(name) for name in change} == before,
        message="parameters put back",
    )
    assert_serves(client, rgb, expected["naclip"])
