"""The test's side of the node's typed services (ovss_interfaces): ``~/set_vocabulary`` and
``~/segment`` clients on an ``OvssClient``'s node, requests built by hand, and the node the
service tests share (``serve``: the real node, or the managed one, under
test/fault_injection_node.py, whose text encoder holds a batch of prompts with ``HOLD_WORD``
until the test releases it)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from fault_injection_node import MODULE
from ros_harness import (
    EVENT_TIMEOUT_S,
    TINY_NODE_PARAMETERS,
    Lifecycle,
    NodeProcess,
    OvssClient,
    call_service,
    isolate_dds,
    make_image,
    next_header,
    startup_timeout,
)

from ovss_interfaces.srv import Segment, SetVocabulary

STREAM = ["cat", "dog"]
LONG_PROMPT = " ".join(["x"] * 95)  # 95 tokens: beyond CLIP's 77, within the 200 characters
MAX_PIXELS = 20000  # max_input_pixels: 141x141 passes, 200x101 is refused
SEGMENT_STATUS = "ovss: segment service"


class VocabularyClients:
    """``set_vocabulary`` and ``segment`` of the node at ``client.ns``."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.set_client = client.node.create_client(SetVocabulary, f"{client.ns}/set_vocabulary")
        self.segment_client = client.node.create_client(Segment, f"{client.ns}/segment")

    def set_vocabulary(
        self,
        classes: Sequence[str],
        templates: str = "",
        background_words: Sequence[str] | None = None,
        timeout: float = 2 * EVENT_TIMEOUT_S,
    ) -> Any:
        return call_service(
            self.client.node,
            self.set_client,
            vocabulary_request(classes, templates, background_words),
            timeout,
        )

    def segment(self, request: Any, timeout: float = 2 * EVENT_TIMEOUT_S) -> Any:
        return call_service(self.client.node, self.segment_client, request, timeout)

    def wait_ready(self) -> None:
        for service in (self.set_client, self.segment_client):
            self.client.spin_until(service.service_is_ready, message=service.srv_name)


def vocabulary_request(
    classes: Sequence[str], templates: str = "", background_words: Sequence[str] | None = None
) -> Any:
    request = SetVocabulary.Request(classes=list(classes), templates=templates)
    if background_words is not None:
        request.set_background_words = True
        request.background_words = list(background_words)
    return request


def segment_request(node: Any, rgb: np.ndarray | None, words: Sequence[str]) -> Any:
    """A Segment request with ``rgb`` (HxWx3 uint8) as a raw rgb8 image (None: no image)."""
    request = Segment.Request(words=list(words))
    if rgb is not None:
        request.image = make_image(rgb, "rgb8", next_header(node))
    return request


def label_names(label_info: Any) -> list[str]:
    """Class names of a LabelInfo in class_id order."""
    return [c.class_name for c in sorted(label_info.class_map, key=lambda c: c.class_id)]


def serve(kind: str, tmp_path_factory: Any) -> Iterator[tuple[Any, VocabularyClients, Path, Any]]:
    """(OvssClient, VocabularyClients, fault dir, NodeProcess) of a running (active) node with
    STREAM and MAX_PIXELS; ``kind``: "node" or "lifecycle" (the managed node, activated). For a
    module-scoped fixture; on the way out the node must exit with status 0."""
    isolate_dds()
    fault_dir = tmp_path_factory.mktemp("faults")
    test_dir = str(Path(__file__).resolve().parent)
    names = ("PYTHONPATH", "OVSS_FAULT_DIR", "OVSS_FAULT_LIFECYCLE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [test_dir, saved["PYTHONPATH"]]))
    os.environ["OVSS_FAULT_DIR"] = str(fault_dir)
    os.environ["OVSS_FAULT_LIFECYCLE"] = "1" if kind == "lifecycle" else "0"
    try:
        parameters = TINY_NODE_PARAMETERS | {"classes": STREAM, "max_input_pixels": MAX_PIXELS}
        process = NodeProcess(parameters, module=MODULE)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    rclpy.init()
    client = OvssClient("/ovss", "")
    try:
        if kind == "lifecycle":
            lifecycle = Lifecycle(client, "/ovss")
            assert lifecycle.state(timeout=startup_timeout()) == "unconfigured", process.output()
            lifecycle.activate()
        client.spin_until(
            lambda: process.returncode is not None or client.ready(),
            startup_timeout(),
            message=lambda: (
                f"node start-up; its output:\n{process.output()}\nthe client:\n{client.describe()}"
            ),
        )
        assert process.returncode is None, process.output()
        services = VocabularyClients(client)
        services.wait_ready()
        yield client, services, fault_dir, process
    finally:
        client.destroy()
        rclpy.shutdown()
        (fault_dir / "encoding_release").touch()
        returncode = process.stop()
    assert returncode == 0, process.output()


def in_force(served: tuple) -> tuple:
    """``served`` with STREAM, single templates and no background words in force."""
    client, services, fault_dir, process = served
    answer = services.set_vocabulary(STREAM, "single", background_words=[])
    assert answer.success, answer.reason
    return served


def photo(width: int = 96, height: int = 64) -> np.ndarray:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[: height // 2] = (90, 150, 230)  # a sky-ish top, a grass-ish bottom
    rgb[height // 2 :] = (40, 160, 40)
    return rgb


def streamed_names(client: Any) -> list[str]:
    """The class names of the label_info published with a new frame's labels."""
    message = make_image(photo(), "rgb8", next_header(client.node))
    out = client.wait_for_output(message, ("labels", "label_info"))
    return label_names(out["label_info"])


def classes_parameter(client: Any) -> list[str]:
    return list(client.get_parameter("classes"))


def wait_answer(client: Any, future: Any, timeout: float = 2 * EVENT_TIMEOUT_S) -> Any:
    client.spin_until(future.done, timeout, message="the service's answer")
    return future.result()
