"""What the ovss_interfaces services' requests mean, before the node acts on them (no node here).

- SetVocabulary -> the parameter changes it stands for (``classes``, ``templates``,
  ``background_words``), to go through the node's one validation and all-or-nothing
  application of parameter changes, so that the service and the parameters agree both ways.
- Segment -> which image was given (exactly one of ``image`` and ``compressed_image``).
- A labels image -> Segment's per-class pixel counts.

The requests are read by field name, so this module imports no ovss_interfaces type.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RequestError(ValueError):
    """A request refused for its structure; ``str(error)`` is the response's reason."""


def vocabulary_parameters(request: Any) -> dict[str, Any]:
    """SetVocabulary request -> parameter name -> new value: ``classes`` always, ``templates``
    when not empty, ``background_words`` when ``set_background_words`` (an empty list clears).

    The values are not validated here (the parameters' own checks do that, with their reasons).
    Raises RequestError for background words sent with ``set_background_words`` false.
    """
    changes: dict[str, Any] = {"classes": list(request.classes)}
    if request.templates:
        changes["templates"] = str(request.templates)
    if request.set_background_words:
        changes["background_words"] = list(request.background_words)
    elif len(request.background_words):
        raise RequestError(
            f"background_words has {len(request.background_words)} words but "
            "set_background_words is false: set it true to replace the background words"
        )
    return changes


def segment_image(request: Any) -> tuple[str, Any]:
    """Segment request -> (``"raw"``, Image) or (``"compressed"``, CompressedImage): the image
    whose ``data`` is not empty. Raises RequestError when both or neither have data."""
    raw, compressed = len(request.image.data) > 0, len(request.compressed_image.data) > 0
    if raw and compressed:
        raise RequestError("both image and compressed_image have data: give exactly one")
    if not (raw or compressed):
        raise RequestError("no image: image and compressed_image are both empty (give one)")
    return ("raw", request.image) if raw else ("compressed", request.compressed_image)


def pixel_counts(labels: np.ndarray, class_count: int) -> tuple[list[int], int]:
    """Pixels per label value ``0 .. class_count - 1`` of ``labels`` ``(H, W)`` uint8 or uint16,
    and the pixels of the unlabeled value (the dtype's maximum: 255 or 65535).

    Raises ValueError for another dtype or a value that is neither a class nor unlabeled.
    """
    if labels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"labels must be uint8 or uint16, got {labels.dtype}")
    unlabeled = int(np.iinfo(labels.dtype).max)
    counts = np.bincount(labels.ravel(), minlength=unlabeled + 1)
    stray = np.flatnonzero(counts[class_count:unlabeled])
    if stray.size:
        raise ValueError(
            f"label value {class_count + int(stray[0])} is neither one of {class_count} "
            "classes nor unlabeled"
        )
    return [int(c) for c in counts[:class_count]], int(counts[unlabeled])
