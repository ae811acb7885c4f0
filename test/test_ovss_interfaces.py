"""The interface package ovss_interfaces (ovss_interfaces/srv): scripts/setup.sh builds it into
the venv, its generated Python types have the documented fields, survive rclpy's CDR
serialization unchanged, and carry a call between two processes over real DDS.

The server here is a stand-in process (the node's own serving is tested in
test_node_vocabulary_services.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rclpy
from rclpy.serialization import deserialize_message, serialize_message
from ros_harness import (
    EVENT_TIMEOUT_S,
    REPO_ROOT,
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    call_service,
    child_environment,
    make_compressed,
    make_image,
)
from std_msgs.msg import Header
from vision_msgs.msg import LabelInfo, VisionClass

from ovss_interfaces.srv import Segment, SetVocabulary

SCRIPTS = REPO_ROOT / "scripts"
VENV = Path(sys.prefix)


def label_info(names: list[str], header: Header) -> LabelInfo:
    return LabelInfo(
        header=header,
        class_map=[VisionClass(class_id=i, class_name=n) for i, n in enumerate(names)],
        threshold=0.25,
    )


def stamped(frame_id: str = "camera") -> Header:
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = 1_700_000_000, 123_456_789
    return header


def test_the_fields_are_the_documented_ones():
    assert SetVocabulary.Request.get_fields_and_field_types() == {
        "classes": "sequence<string>",
        "templates": "string",
        "set_background_words": "boolean",
        "background_words": "sequence<string>",
    }
    assert SetVocabulary.Response.get_fields_and_field_types() == {
        "success": "boolean",
        "reason": "string",
        "label_info": "vision_msgs/LabelInfo",
    }
    assert Segment.Request.get_fields_and_field_types() == {
        "image": "sensor_msgs/Image",
        "compressed_image": "sensor_msgs/CompressedImage",
        "words": "sequence<string>",
    }
    assert Segment.Response.get_fields_and_field_types() == {
        "success": "boolean",
        "reason": "string",
        "labels": "sensor_msgs/Image",
        "confidence": "sensor_msgs/Image",
        "label_info": "vision_msgs/LabelInfo",
        "pixel_counts": "sequence<uint32>",
        "unlabeled_pixels": "uint32",
    }


def round_trip(message):
    data = serialize_message(message)
    assert isinstance(data, bytes) and len(data) > 4
    return deserialize_message(data, type(message))


def test_set_vocabulary_round_trips_through_cdr():
    request = SetVocabulary.Request(
        classes=[
            "tv; television; monitor | a flat screen showing a picture",
            "椅子; chair",
            "café",
        ],
        templates="a photo of a {}.|a blurry photo of a {}.",
        set_background_words=True,
        background_words=["sky", "wall"],
    )
    response = SetVocabulary.Response(
        success=False,
        reason="duplicate class 'Chair' (the same name as 'chair')",
        label_info=label_info(["tv", "椅子", "café"], stamped()),
    )
    for message in (request, response):
        back = round_trip(message)
        assert back == message
        assert back is not message
    assert round_trip(request).classes[1] == "椅子; chair"  # UTF-8 text survives
    assert round_trip(response).label_info.class_map[2].class_name == "café"


def test_segment_round_trips_with_image_data():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    request = Segment.Request(image=make_image(rgb, "rgb8", stamped()), words=["cup; mug", "desk"])
    compressed = Segment.Request(
        compressed_image=make_compressed(b"\xff\xd8 not really a jpeg", stamped(), "jpeg"),
        words=["cup"],
    )
    labels = rng.integers(0, 2, size=(6, 8), dtype=np.uint8)
    labels[0, 0] = 255
    confidence = rng.random((6, 8), dtype=np.float32)
    counts = [int((labels == k).sum()) for k in (0, 1)]
    response = Segment.Response(
        success=True,
        labels=make_image(labels, "mono8", stamped()),
        confidence=make_image(confidence, "32FC1", stamped()),
        label_info=label_info(["cup", "desk"], stamped()),
        pixel_counts=counts,
        unlabeled_pixels=1,
    )
    for message in (request, compressed, response):
        assert round_trip(message) == message
    back = round_trip(response)
    assert np.array_equal(np.frombuffer(back.labels.data, np.uint8).reshape(6, 8), labels)
    assert np.array_equal(
        np.frombuffer(back.confidence.data, np.float32).reshape(6, 8), confidence
    )
    assert list(back.pixel_counts) == counts and sum(counts) + back.unlabeled_pixels == 48
    # The request's unused image stays empty: that is how a server tells which one was given.
    assert len(round_trip(request).compressed_image.data) == 0
    assert len(round_trip(compressed).image.data) == 0


# A stand-in server in its own process: it answers Segment with the pixel counts of the image's
# first channel read as labels, and SetVocabulary with the classes' first names.
SERVER = textwrap.dedent(
    """
    import numpy as np
    import rclpy
    from ovss_interfaces.srv import Segment, SetVocabulary
    from vision_msgs.msg import LabelInfo, VisionClass

    def set_vocabulary(request, response):
        names = [entry.split("|")[0].split(";")[0].strip() for entry in request.classes]
        response.success = bool(names)
        response.reason = "" if names else "classes is empty"
        response.label_info = LabelInfo(
            class_map=[VisionClass(class_id=i, class_name=n) for i, n in enumerate(names)])
        return response

    def segment(request, response):
        image = request.image
        labels = np.frombuffer(image.data, np.uint8).reshape(image.height, image.width)
        response.success = True
        response.labels = image
        response.pixel_counts = [int((labels == k).sum()) for k in range(len(request.words))]
        response.unlabeled_pixels = int((labels == 255).sum())
        return response

    rclpy.init()
    node = rclpy.create_node("interfaces_server")
    node.create_service(SetVocabulary, "set_vocabulary", set_vocabulary)
    node.create_service(Segment, "segment", segment)
    print("serving", flush=True)
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    """
)


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    script = tmp_path_factory.mktemp("server") / "server.py"
    script.write_text(SERVER)
    process = subprocess.Popen(
        [sys.executable, str(script)],
        env=child_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield process
    process.send_signal(2)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(EVENT_TIMEOUT_S)


@pytest.fixture(scope="module")
def client_node(server_process):
    child_environment()  # the isolated domain, before rclpy.init
    own_context = not rclpy.ok()
    if own_context:
        rclpy.init()
    node = rclpy.create_node("interfaces_client")
    yield node
    node.destroy_node()
    if own_context:
        rclpy.shutdown()


def test_both_services_carry_calls_between_processes(client_node, server_process):
    vocabulary = client_node.create_client(SetVocabulary, "set_vocabulary")
    segment = client_node.create_client(Segment, "segment")
    answer = call_service(
        client_node,
        vocabulary,
        SetVocabulary.Request(classes=["tv; monitor | a screen", "кошка"]),
        timeout=STARTUP_TIMEOUT_S,
    )
    assert server_process.poll() is None
    assert answer.success and answer.reason == ""
    assert [c.class_name for c in answer.label_info.class_map] == ["tv", "кошка"]

    labels = np.array([[0, 1, 1, 255], [1, 1, 0, 255]], np.uint8)
    request = Segment.Request(image=make_image(labels, "mono8", stamped()), words=["a", "b"])
    answer = call_service(client_node, segment, request)
    assert answer.success
    assert list(answer.pixel_counts) == [2, 4] and answer.unlabeled_pixels == 2
    assert answer.labels.header == request.image.header
    assert bytes(answer.labels.data) == labels.tobytes()


def test_build_script_skips_an_installed_package_built_from_the_same_sources():
    """A second scripts/setup.sh only checks: the venv holds ovss_interfaces built from these
    sources (their hash is recorded at install)."""
    stamp = VENV / "share" / "ovss_interfaces" / "source.sha256"
    assert stamp.is_file(), f"{stamp} missing: run bash scripts/setup.sh"
    wanted = subprocess.run(
        ["bash", str(SCRIPTS / "msg_package_hash.sh"), str(REPO_ROOT / "ovss_interfaces")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert stamp.read_text().strip() == wanted, "the venv's ovss_interfaces is stale: run setup"
    run = subprocess.run(
        ["bash", str(SCRIPTS / "build_ovss_interfaces.sh"), str(VENV)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "FORCE"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "nothing to build" in run.stdout, run.stdout


def test_the_source_hash_follows_every_definition_file(tmp_path):
    """An edited, added or removed .srv (or package.xml, CMakeLists.txt) changes the hash that
    decides a rebuild; the checkout's location does not."""
    copy = tmp_path / "ovss_interfaces"
    shutil.copytree(REPO_ROOT / "ovss_interfaces", copy)

    def digest() -> str:
        command = ["bash", str(SCRIPTS / "msg_package_hash.sh"), str(copy)]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    original = digest()
    assert len(original) == 64
    seen = {original}
    segment = copy / "srv" / "Segment.srv"
    segment.write_text(segment.read_text() + "\nuint32 extra\n")
    seen.add(digest())
    (copy / "srv" / "Extra.srv").write_text("---\n")
    seen.add(digest())
    (copy / "srv" / "Extra.srv").unlink()
    (copy / "srv" / "Segment.srv").write_text(
        (REPO_ROOT / "ovss_interfaces/srv/Segment.srv").read_text()
    )
    assert digest() == original  # back to the same sources: the same hash
    (copy / "package.xml").write_text((copy / "package.xml").read_text().replace("0.1.0", "0.1.1"))
    seen.add(digest())
    assert len(seen) == 4
