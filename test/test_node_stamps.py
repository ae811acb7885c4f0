"""Header stamps later than now, over real DDS (issue 18, item 7).

A camera whose clock runs ahead (a common fault between computers) stamps its frames in the
future. Before the fix such a frame entered the latency statistics as a negative latency (a
stamp far ahead gave a median of -175484731027 ms) and was never stale whatever max_frame_age
said, without a word. Now a stamp more than FUTURE_STAMP_TOLERANCE_S ahead is treated like the
other unusable stamps: age unknown (segmented and published, never stale, no latency sample),
counted (``frames with unusable stamp``), warned about; a stamp ahead by less counts as taken
now (latency 0, never negative).
"""

from __future__ import annotations

import pytest
from ros_harness import (
    TINY_NODE_PARAMETERS,
    make_image,
    next_header,
    running_node,
    status_values,
)

from ovss_ros.ros.frames import FUTURE_STAMP_TOLERANCE_S

STATUS = "ovss: image"
pytestmark = pytest.mark.usefixtures("node_survives")

# Far beyond any wait of a fresh frame on a loaded machine (at 10 s, a fresh frame waiting behind
# a parameter change under a CPU hog went stale: test_node_accounting.py).
MAX_FRAME_AGE_S = 60.0


@pytest.fixture(scope="module")
def node():
    parameters = TINY_NODE_PARAMETERS | {
        "classes": ["cat", "dog"],
        "max_frame_age": MAX_FRAME_AGE_S,
    }
    with running_node(parameters) as (client, process):
        yield client, process


def frame_ahead(client, rgb, seconds: float):
    header = next_header(client.node)
    nanoseconds = header.stamp.sec * 10**9 + header.stamp.nanosec + int(seconds * 1e9)
    header.stamp.sec, header.stamp.nanosec = divmod(nanoseconds, 10**9)
    return make_image(rgb, "rgb8", header)


def latencies(values: dict[str, str]) -> list[float]:
    return [
        float(values[key])
        for key in ("latency median (ms)", "latency max (ms)")
        if values[key] != "n/a"
    ]


@pytest.fixture(scope="module")
def rgb(voc_rgb):
    return voc_rgb[0][:48, :64].copy()


@pytest.mark.parametrize("ahead_s", [1000.0, 175484731.0, 10 * FUTURE_STAMP_TOLERANCE_S])
def test_a_stamp_ahead_of_the_clock_means_age_unknown(client, node, rgb, ahead_s):
    _, process = node
    before = int(status_values(client.wait_for_status(STATUS, bool))["frames with unusable stamp"])
    message = frame_ahead(client, rgb, ahead_s)
    client.wait_for_output(message, ("labels",))  # published: never stale
    status = client.wait_for_status(
        STATUS, lambda values: int(values["frames with unusable stamp"]) > before
    )
    values = status_values(status)
    assert "unusable header stamp" in status.message
    assert all(latency >= 0.0 for latency in latencies(values)), values
    assert "later than now" in process.output()


def test_a_stamp_slightly_ahead_counts_as_now(client, rgb):
    before = status_values(client.wait_for_status(STATUS, bool))
    message = frame_ahead(client, rgb, FUTURE_STAMP_TOLERANCE_S / 2)
    client.wait_for_output(message, ("labels",))
    status = client.wait_for_status(
        STATUS,
        lambda values: int(values["frames processed"]) > int(before["frames processed"]),
    )
    values = status_values(status)
    assert values["frames with unusable stamp"] == before["frames with unusable stamp"]
    assert latencies(values) and all(latency >= 0.0 for latency in latencies(values)), values


def test_max_frame_age_still_drops_old_frames(client, rgb):
    before = status_values(client.wait_for_status(STATUS, bool))
    client.image_pub.publish(frame_ahead(client, rgb, -10 * MAX_FRAME_AGE_S))
    client.wait_for_status(
        STATUS,
        lambda values: (
            int(values["frames dropped (stale)"]) == int(before["frames dropped (stale)"]) + 1
        ),
    )


def test_the_tolerance_is_documented():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "ros_interface.md").read_text()
    assert f"{FUTURE_STAMP_TOLERANCE_S} s" in text
