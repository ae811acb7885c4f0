"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), as NACLIP and SCLIP use it.

Source: ``pamr.py`` of github.com/visinf/1-stage-wseg, which NACLIP and SCLIP ship unchanged.
They run it on the query logits after upsampling them to the input image, guided by the
normalised network input upsampled to the same size (``naclip.py`` ``predict``, SCLIP's
``clip_segmentor.py`` ``forward_slide``); the engine does the same.

Class scores are repeatedly replaced by an average of their 3x3 neighbours at a few dilations,
weighted by how similar the neighbours' colours are. Colour edges thereby become walls the scores
do not cross, so a class boundary that CLIP's 16-pixel patches put a few pixels off snaps to the
image edge. It needs no parameters and no extra model, and adds about 3 mIoU to NACLIP
(docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

STD_SCALE = 0.1  # colour differences are measured in units of 0.1 x the local colour spread
EPS = 1e-8


def _neighbourhoods(x: torch.Tensor, dilations: Sequence[int]) -> list[torch.Tensor]:
    """The 9 taps of a 3x3 window at each dilation, as (N, C, H, W) views of a padded copy.

    Replicate padding makes a border pixel its own neighbour instead of inventing zeros. Slices
    of the padded tensor are the same as ``F.unfold`` with ``dilation`` but copy nothing, which
    keeps the 20-class propagation at full image size within a few image-sized buffers.
    """
    height, width = x.shape[-2:]
    taps = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        taps += [
            padded[..., d + dy * d : d + dy * d + height, d + dx * d : d + dx * d + width]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
    return taps


def _without_centres(taps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Drop each window's centre tap (index 4 of 9): a pixel is not its own neighbour."""
    return [tap for index, tap in enumerate(taps) if index % 9 != 4]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """Local affinity (N, 8 * len(dilations), H, W) of every pixel to its dilated neighbours.

    ``-|I_i - I_j| / (0.1 * std)``, where std is the spread of the pixel's whole neighbourhood
    (all taps of all dilations, the centre once per dilation; per channel, unbiased): dividing
    by it makes the weights independent of the image's contrast and normalisation, so only
    *relative* edges count. The channel mean and a softmax over the neighbours give weights
    that sum to 1 at every pixel. Built one tap at a time: a few image-sized buffers plus the
    result, instead of a stack of every tap (a 4000x3000 frame stays near 1 GB).
    """
    image = image.float()
    taps = _neighbourhoods(image, dilations)
    mean = sum(taps) / len(taps)
    spread = (sum((tap - mean).square() for tap in taps) / (len(taps) - 1)).sqrt_()
    scale = spread.mul_(STD_SCALE).add_(EPS)
    del mean
    neighbours = _without_centres(taps)
    distance = image.new_empty((image.shape[0], len(neighbours), *image.shape[-2:]))
    for index, tap in enumerate(neighbours):
        distance[:, index] = ((tap - image).abs_() / scale).mean(dim=1)
    return torch.softmax(distance.neg_(), dim=1)


def pamr_propagate(
    affinity: torch.Tensor,
    scores: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """Refine ``scores`` (N, K, H, W) with a ``pamr_affinity`` (N, P, H, W) of the same image.

    Each of the ``iterations`` rounds sets every score to the affinity-weighted mean of its
    neighbours' scores. The weights are convex, so each class map stays within its original
    range. Separate from ``pamr`` so that one affinity serves every chunk of class maps.
    Computed in float32, returned in ``scores.dtype``.
    """
    if affinity.shape[0] != scores.shape[0] or affinity.shape[-2:] != scores.shape[-2:]:
        raise ValueError(
            f"affinity {tuple(affinity.shape)} and scores {tuple(scores.shape)} need the same "
            "N, H, W"
        )
    weights = affinity.unsqueeze(2).unbind(1)  # P x (N, 1, H, W)
    refined = scores.float()
    for _ in range(iterations):
        neighbours = _without_centres(_neighbourhoods(refined, dilations))
        refined = weights[0] * neighbours[0]
        for weight, tap in zip(weights[1:], neighbours[1:], strict=True):
            refined.addcmul_(weight, tap)  # in place: no image-sized temporary per neighbour
    return refined.to(scores.dtype)


def pamr(
    image: torch.Tensor,
    scores: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """Refine class ``scores`` (N, K, H, W) along the edges of ``image`` (N, 3, H, W).

    ``pamr_propagate`` with the ``pamr_affinity`` of ``image``. ``image`` may be in any scale
    (uint8-range, [0, 1] or CLIP-normalised) because the affinity divides by the local spread.
    Raises ValueError unless image and scores share N, H and W.
    """
    if image.shape[0] != scores.shape[0] or image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and scores {tuple(scores.shape)} need the same N, H, W"
        )
    return pamr_propagate(pamr_affinity(image, dilations), scores, iterations, dilations)
