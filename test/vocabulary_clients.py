"""The test's side of the node's typed services (ovss_interfaces): ``~/set_vocabulary`` and
``~/segment`` clients on an ``OvssClient``'s node, and requests built by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ros_harness import EVENT_TIMEOUT_S, call_service, make_image, next_header

from ovss_interfaces.srv import Segment, SetVocabulary


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
