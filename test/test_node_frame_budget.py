"""The per-frame budget and the text model's context at the node, over real DDS (issue 18,
items 3 and 9): the node in its own process refuses a size whose frame needs a map beyond the
budget with the cost in the reason, and a background word whose prompt CLIP would cut; nothing
changes, and the node keeps segmenting with the settings in force."""

from __future__ import annotations

import numpy as np
import pytest
from rclpy.parameter import Parameter
from ros_harness import (
    TINY_NODE_PARAMETERS,
    call_service,
    make_image,
    next_header,
    running_node,
)

pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def node():
    with running_node(TINY_NODE_PARAMETERS | {"classes": ["cat", "dog"]}) as (client, process):
        yield client, process


def set_atomically(client, parameters: list[Parameter]):
    from rcl_interfaces.srv import SetParametersAtomically

    if not hasattr(client, "_atomic_client"):
        client._atomic_client = client.node.create_client(
            SetParametersAtomically, "/ovss/set_parameters_atomically"
        )
    request = SetParametersAtomically.Request(
        parameters=[p.to_parameter_msg() for p in parameters]
    )
    return call_service(client.node, client._atomic_client, request).result


@pytest.mark.parametrize(
    ("parameters", "reason"),
    [
        (
            [("dslo.sd.size", 2048)],
            "dslo.sd.size 2048 needs a 2.15 GB VAE activation per frame; at most 1448",
        ),
        ([("dslo.sd.size", 4096)], "dslo.sd.size 4096 needs a 8.59 GB VAE activation per frame"),
        ([("pnp.image_size", 1024)], "pnp.image_size 1024 needs a 1.07 GB attention map"),
        ([("pnp.image_size", 4096)], "pnp.image_size 4096 needs a 274.9 GB attention map"),
        ([("twostream.crop_batch", 1024)], "twostream.crop_batch 1024 needs a 2.48 GB"),
        (
            [("refinement", "dslo"), ("short_side", 4096), ("max_long_side", 4096)],
            "whose patch affinity needs a 17.2 GB map per frame",
        ),
        ([("background_words", ["part " + "7" * 80])], "is too long for the text model"),
        (
            [
                ("method", "superpixel_clip"),
                ("deop.proposals", 1000),
                ("short_side", 4096),
                ("max_long_side", 4096),
            ],
            "deop.proposals 1000 with deop.mask_cells 4 on a 256x256 patch grid need 4.19 GB",
        ),
    ],
    ids=["sd2048", "sd4096", "pnp1024", "pnp4096", "crops", "dslo4096", "prompt", "proposals"],
)
def test_refused_with_its_cost_and_nothing_changes(client, voc_rgb, parameters, reason):
    before = {name: client.get_parameter(name) for name, _ in parameters}
    result = set_atomically(client, [Parameter(name, value=value) for name, value in parameters])
    assert not result.successful and reason in result.reason, result.reason
    assert {name: client.get_parameter(name) for name, _ in parameters} == before
    message = make_image(
        np.ascontiguousarray(voc_rgb[0][:64, :80]), "rgb8", next_header(client.node)
    )
    assert client.wait_for_output(message, ("labels",))["labels"].width == 80


def test_the_descriptor_states_the_budget_limit(client):
    for name, most in (
        ("dslo.sd.size", 1448),
        ("pnp.image_size", 1008),
        ("twostream.crop_batch", 443),
    ):
        descriptor = client.describe_parameter(name)
        assert f"to {most} (the per-frame budget)" in descriptor.additional_constraints, name


def test_a_switch_of_method_is_checked_against_the_budget_of_the_new_method(client):
    """Settings of another method are accepted while they cost nothing; switching to that method
    is then refused up front with the cost (it was accepted and failed in the worker before,
    found by a reviewer of issue 18), and the method in force keeps serving."""
    sizes = {name: client.get_parameter(name) for name in ("short_side", "max_long_side")}
    proposals = client.get_parameter("deop.proposals")
    try:
        for name, value in (
            ("deop.proposals", 1000),
            ("short_side", 4096),
            ("max_long_side", 4096),
        ):
            result = client.set_parameters([Parameter(name, value=value)])[0]
            assert result.successful, (name, result.reason)
        result = client.set_parameters([Parameter("method", value="superpixel_clip")])[0]
        assert not result.successful
        cost = "deop.proposals 1000 with deop.mask_cells 4 on a 256x256 patch grid need 4.19 GB"
        assert cost in result.reason, result.reason
        assert client.get_parameter("method") == "naclip"
    finally:
        restore = [Parameter(n, value=v) for n, v in sizes.items()]
        assert all(r.successful for r in client.set_parameters(restore))
        assert client.set_parameters([Parameter("deop.proposals", value=proposals)])[0].successful
