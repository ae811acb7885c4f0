"""What the dense stages hand each other: the sliding windows of a frame, the encoded batch,
the text queries of the vocabulary.

Windows as NACLIP's / SCLIP's ``forward_slide`` (mmseg's ``slide_inference``): ``crop`` x
``crop`` windows every ``stride`` pixels, the last window of each row and column flush with the
image's edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ovss_ros.core.methods.dense.forward import DenseOutput

Box = tuple[int, int, int, int]  # top, left, height, width in resized-image pixels


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis covering [0, length); the last window ends at the edge."""
    if length <= crop:
        return [0]
    count = -(-(length - crop) // stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


@dataclass
class Encoded:
    """Dense forward of a batch: every image's windows (whole image = one window), image-major."""

    windows: torch.Tensor  # (images * len(boxes), 3, h, w) normalised pixels
    boxes: list[Box]  # the same windows for every image of the batch (they share one size)
    dense: DenseOutput
    size: tuple[int, int]  # resized image (H', W')
    # guide-dependent values postprocess computes once and reuses for every chunk of classes
    guides: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    def image(self, index: int) -> Encoded:
        """The part of the batch that belongs to image ``index``."""
        part = slice(index * len(self.boxes), (index + 1) * len(self.boxes))
        affinity = self.dense.affinity
        dense = DenseOutput(
            self.dense.features[part], None if affinity is None else affinity[part]
        )
        return Encoded(self.windows[part], self.boxes, dense, self.size)


@dataclass(frozen=True)
class TextQueries:
    """Everything the text side hands inference, computed together and swapped in together."""

    embeddings: torch.Tensor  # (queries, D): class synonyms first, then background words
    owner: torch.Tensor  # (queries,) query -> label; len(classes) = background
    class_queries: int  # queries [0, this) are class synonyms
    class_text: torch.Tensor  # (classes, D) normalised mean over each class's synonyms
    descriptions: torch.Tensor  # (classes, D) for FreeCP's crop check


def window_bytes(visual: torch.nn.Module, windows: torch.Tensor) -> int:
    """The largest activation of one window in the dense forward: its tokens times the MLP's
    hidden width (4 x the model width in CLIP), in the model's dtype."""
    tokens = (windows.shape[-2] // visual.patch_size[0]) * (
        windows.shape[-1] // visual.patch_size[1]
    )
    block = visual.transformer.resblocks[0]
    fc = getattr(getattr(block, "mlp", None), "c_fc", None)
    hidden = fc.out_features if isinstance(fc, torch.nn.Linear) else 4 * visual.conv1.out_channels
    return (tokens + 1) * hidden * windows.element_size()


def joined(parts: Sequence[DenseOutput]) -> DenseOutput:
    """The dense output of window chunks, in order."""
    affinity = None
    if parts[0].affinity is not None:
        affinity = torch.cat([part.affinity for part in parts])
    return DenseOutput(torch.cat([part.features for part in parts]), affinity)
