"""Class-agnostic mask proposals for the proposal-classification methods (DeOP, two-stream).

Three sources, all giving soft masks (N, K, Hm, Wm) in [0, 1] on the *mask grid* (``cells``
cells per patch side; DeOP's MaskFormer proposals are at 1/4 of the image, i.e. 4 cells per
16-pixel patch) and a validity flag (N, K) for the padding of images with fewer proposals:

- ``superpixels``: SLIC superpixels (scikit-image) of the frame at the mask grid, merged to at
  most the target count. Training-free, a partition: every cell is covered exactly once.
- ``clusters``: k-means of the frozen CLIP tokens before the last block (with their grid
  positions), one cluster per proposal. Training-free, a partition of the patch grid.
- ``learned``: :class:`ProposalHead`, a small MaskFormer-style set predictor (learned queries ->
  mask embeddings, dot product with per-cell mask features, objectness) on the same frozen
  tokens, trained by ``ovss-train-deop`` with Hungarian matching (:func:`hungarian_match`,
  scipy's ``linear_sum_assignment``) and MaskFormer's losses (:func:`proposal_losses`).

Sources: MaskFormer (Cheng et al., NeurIPS 2021; ``mask_former/modeling/matcher.py`` and
``criterion.py`` as shipped in CongHan0808/DeOP), SLIC (Achanta et al., TPAMI 2012).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SLIC_ATTEMPTS, SLIC_ENOUGH = 3, 0.9


@dataclass
class Proposals:
    """Soft masks (N, K, Hm, Wm) in [0, 1] on the mask grid, and which are real (N, K) bool."""

    masks: torch.Tensor
    valid: torch.Tensor

    def on_patches(self, cells: int) -> torch.Tensor:
        """Each proposal's share of every patch (N, K, h, w): the mean over its cells."""
        return F.avg_pool2d(self.masks, cells) if cells > 1 else self.masks

    @property
    def count(self) -> torch.Tensor:
        """Real proposals per image (N,)."""
        return self.valid.sum(dim=1)


def pad_proposals(masks: list[torch.Tensor]) -> Proposals:
    """Stack per-image masks (K_i, Hm, Wm) into one padded batch with validity flags."""
    most = max(m.shape[0] for m in masks)
    batch = masks[0].new_zeros((len(masks), most, *masks[0].shape[1:]))
    valid = torch.zeros((len(masks), most), dtype=torch.bool, device=masks[0].device)
    for index, mask in enumerate(masks):
        batch[index, : mask.shape[0]] = mask
        valid[index, : mask.shape[0]] = True
    return Proposals(batch, valid)


# --- training-free: superpixels --------------------------------------------------------------


def merge_to_count(segments: np.ndarray, count: int) -> np.ndarray:
    """Relabel a segment map to 0..k-1 with k <= ``count``.

    While there are too many segments, the smallest is merged into the neighbour it shares the
    longest border with (a segment without neighbours is left alone).
    """
    _, inverse = np.unique(segments, return_inverse=True)
    segments = inverse.reshape(segments.shape)
    while True:
        labels, sizes = np.unique(segments, return_counts=True)
        if len(labels) <= count:
            break
        merged = False
        for smallest in labels[np.argsort(sizes, kind="stable")]:
            neighbour = _longest_border_neighbour(segments, smallest)
            if neighbour is not None:
                segments[segments == smallest] = neighbour
                merged = True
                break
        if not merged:
            break
    _, inverse = np.unique(segments, return_inverse=True)
    return inverse.reshape(segments.shape)


def _longest_border_neighbour(segments: np.ndarray, label: int) -> int | None:
    pairs = []
    for a, b in (
        (segments[:, :-1], segments[:, 1:]),
        (segments[:-1, :], segments[1:, :]),
    ):
        touching = (a != b) & ((a == label) | (b == label))
        pairs.append(np.where(a[touching] == label, b[touching], a[touching]))
    others = np.concatenate(pairs)
    if others.size == 0:
        return None
    values, counts = np.unique(others, return_counts=True)
    return int(values[np.argmax(counts)])


def superpixel_segments(rgb: np.ndarray, count: int, compactness: float = 10.0) -> np.ndarray:
    """SLIC segment ids (H, W) int64 in 0..k-1, k <= ``count``, of an HxWx3 uint8 image.

    ``skimage.segmentation.slic`` with ``n_segments=count`` (connectivity enforced). SLIC's
    count is approximate and often well below the request on small grids, so while it returns
    under 90% of ``count`` it runs again with the request scaled up (at most three runs);
    :func:`merge_to_count` then merges the surplus.
    """
    if count < 1:
        raise ValueError(f"proposal count must be >= 1, got {count}")
    if count == 1:
        return np.zeros(rgb.shape[:2], dtype=np.int64)
    from skimage.segmentation import slic  # scikit-image: only where superpixels are made

    asked = count
    for _ in range(SLIC_ATTEMPTS):
        segments = slic(
            rgb,
            n_segments=asked,
            compactness=compactness,
            start_label=0,
            enforce_connectivity=True,
            channel_axis=-1,
        )
        found = int(segments.max()) + 1
        if found >= SLIC_ENOUGH * count or asked >= rgb.shape[0] * rgb.shape[1]:
            break
        asked = min(rgb.shape[0] * rgb.shape[1], math.ceil(asked * count / max(found, 1)))
    return merge_to_count(segments, count).astype(np.int64)


def superpixel_proposals(
    images: list[np.ndarray],
    grid: tuple[int, int],
    count: int,
    compactness: float = 10.0,
    device: torch.device | str = "cpu",
) -> Proposals:
    """One-hot SLIC masks on the mask ``grid`` (Hm, Wm) for uint8 RGB images of any size.

    Each image is resized to the grid with OpenCV's area interpolation before SLIC, so the cost
    does not grow with the camera resolution.
    """
    masks = []
    for rgb in images:
        small = cv2.resize(rgb, (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
        segments = torch.from_numpy(superpixel_segments(small, count, compactness)).to(device)
        masks.append(F.one_hot(segments, int(segments.max()) + 1).permute(2, 0, 1).float())
    return pad_proposals(masks)


# --- training-free: clusters of CLIP tokens --------------------------------------------------


def cluster_proposals(
    tokens: torch.Tensor,
    count: int,
    cells: int,
    iterations: int = 10,
    position_weight: float = 1.0,
) -> Proposals:
    """k-means of patch tokens (N, h, w, C) with their positions; one-hot masks on the mask grid.

    Features are the L2-normalised tokens next to the (row, col) position scaled to the unit
    square times ``position_weight`` (spatially compact clusters, as SLIC's compactness).
    Centres start on a regular grid of patches; Lloyd iterations; empty clusters are dropped.
    """
    n, h, w, _ = tokens.shape
    k = max(1, min(count, h * w))
    rows, cols = torch.meshgrid(
        torch.arange(h, device=tokens.device), torch.arange(w, device=tokens.device), indexing="ij"
    )
    scale = position_weight / max(h, w)
    position = torch.stack([rows, cols], dim=-1).reshape(h * w, 2).float() * scale
    seeds = _grid_seeds(h, w, k, tokens.device)
    masks = []
    for image in tokens.float():
        points = torch.cat([F.normalize(image.reshape(h * w, -1), dim=-1), position], dim=1)
        centres = points[seeds]
        for _ in range(iterations):
            assign = torch.cdist(points, centres).argmin(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, assign, points)
            sizes = torch.bincount(assign, minlength=k).unsqueeze(1)
            centres = torch.where(sizes > 0, sums / sizes.clamp(min=1), centres)
        assign = torch.cdist(points, centres).argmin(dim=1)
        used = torch.unique(assign)  # drop empty clusters, keep their order
        remap = torch.full((k,), -1, dtype=torch.long, device=tokens.device)
        remap[used] = torch.arange(len(used), device=tokens.device)
        one_hot = F.one_hot(remap[assign], len(used)).T.reshape(len(used), h, w).float()
        if cells > 1:
            one_hot = F.interpolate(one_hot[None], scale_factor=cells, mode="nearest")[0]
        masks.append(one_hot)
    return pad_proposals(masks)


def _grid_seeds(h: int, w: int, k: int, device: torch.device) -> torch.Tensor:
    """``k`` distinct patch indices spread over an h x w grid (row-major)."""
    rows = max(1, round(math.sqrt(k * h / w)))
    cols = math.ceil(k / rows)
    ys = ((torch.arange(rows, device=device) + 0.5) * h / rows).long().clamp(max=h - 1)
    xs = ((torch.arange(cols, device=device) + 0.5) * w / cols).long().clamp(max=w - 1)
    seeds = torch.unique((ys[:, None] * w + xs[None, :]).flatten())
    if len(seeds) < k:  # fill up with patches not yet used, in order
        unused = torch.ones(h * w, dtype=torch.bool, device=device)
        unused[seeds] = False
        seeds = torch.cat([seeds, unused.nonzero()[:, 0][: k - len(seeds)]])
    return seeds[:k]


# --- learned: a MaskFormer-style head on the frozen tokens ----------------------------------


def sine_positions(grid: tuple[int, int], dim: int, device=None) -> torch.Tensor:
    """DETR's normalised sine position embedding of a grid: (h*w, dim), dim even.

    Half the channels encode the row, half the column (``PositionEmbeddingSine(dim/2,
    normalize=True)`` of DETR / MaskFormer, temperature 10000, scale 2 pi).
    """
    h, w = grid
    half = dim // 2
    y = (torch.arange(1, h + 1, device=device).float() / (h + 1e-6)) * 2 * math.pi
    x = (torch.arange(1, w + 1, device=device).float() / (w + 1e-6)) * 2 * math.pi
    steps = torch.arange(half, device=device).float()
    freq = 10000 ** (2 * torch.div(steps, 2, rounding_mode="floor") / half)
    py, px = y[:, None] / freq, x[:, None] / freq  # (h, half), (w, half)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], dim=2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], dim=2).flatten(1)
    pos = torch.cat([py[:, None, :].expand(h, w, half), px[None, :, :].expand(h, w, half)], -1)
    return pos.reshape(h * w, 2 * half)


class ProposalHead(nn.Module):
    """Learned queries -> class-agnostic masks on the frozen CLIP tokens (MaskFormer's head).

    ``forward(tokens)`` with tokens (N, h, w, width) (the patch tokens before CLIP's last block)
    returns mask logits (N, queries, h*cells, w*cells) and objectness logits (N, queries, 2)
    (index 1 = "no object", MaskFormer's extra class). The pixel decoder upsamples the projected
    tokens to the mask grid (bilinear, two 3x3 convolutions); the transformer decoder attends
    from the queries to the tokens with sine positions.
    """

    def __init__(
        self,
        width: int,
        queries: int = 100,
        dim: int = 256,
        layers: int = 2,
        heads: int = 8,
        cells: int = 4,
    ) -> None:
        super().__init__()
        if dim % heads or dim % 4:
            raise ValueError(f"proposal head dim {dim} must divide by heads {heads} and by 4")
        self.config = {
            "width": width,
            "queries": queries,
            "dim": dim,
            "layers": layers,
            "heads": heads,
            "cells": cells,
        }
        self.cells = cells
        self.norm = nn.LayerNorm(width)
        self.input = nn.Linear(width, dim)
        self.pixel = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.GroupNorm(min(32, dim // 4), dim),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
        )
        layer = nn.TransformerDecoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.queries = nn.Embedding(queries, dim)
        self.objectness = nn.Linear(dim, 2)
        self.mask_embed = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)
        )

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, w, _ = tokens.shape
        memory = self.input(self.norm(tokens.float())).reshape(n, h * w, -1)
        pos = sine_positions((h, w), memory.shape[-1], memory.device)
        queries = self.queries.weight.unsqueeze(0).expand(n, -1, -1)
        out = self.decoder(queries, memory + pos)
        grid = memory.transpose(1, 2).reshape(n, -1, h, w)
        if self.cells > 1:
            grid = F.interpolate(grid, scale_factor=self.cells, mode="bilinear")
        pixel = self.pixel(grid)
        masks = torch.einsum("nqd,ndhw->nqhw", self.mask_embed(out), pixel)
        return masks, self.objectness(out)


def learned_proposals(
    head: ProposalHead, tokens: torch.Tensor, count: int
) -> tuple[Proposals, torch.Tensor]:
    """The ``count`` most object-like masks of the head (sigmoid), and their objectness (N, K);
    equal objectness (e.g. saturated at 1) to the lower query, on every device."""
    with torch.no_grad():
        mask_logits, object_logits = head(tokens)
    objectness = object_logits.softmax(dim=-1)[..., 0]
    k = min(count, objectness.shape[1])
    top = objectness.sort(dim=1, descending=True, stable=True).indices[:, :k]
    masks = mask_logits.gather(1, top[..., None, None].expand(-1, -1, *mask_logits.shape[2:]))
    valid = torch.ones(top.shape, dtype=torch.bool, device=top.device)
    return Proposals(masks.sigmoid(), valid), objectness.gather(1, top)


# --- training of the head: Hungarian matching and MaskFormer's losses -----------------------

CLASS_WEIGHT, MASK_WEIGHT, DICE_WEIGHT, NO_OBJECT_WEIGHT = 1.0, 20.0, 1.0, 0.1


def pairwise_focal_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid focal loss (alpha 0.25, gamma 2) of every prediction (Q, P) vs target (T, P)."""
    prob = logits.sigmoid()
    pos = (
        0.25
        * (1 - prob) ** 2
        * F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    )
    neg = (
        0.75
        * prob**2
        * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    )
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice (with +1 smoothing) of every prediction (Q, P) vs target (T, P)."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def hungarian_match(
    mask_logits: torch.Tensor, object_logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and target indices of the minimum-cost one-to-one matching.

    Cost (MaskFormer's ``HungarianMatcher`` with a single "object" class): ``-1 * p(object)
    + 20 * focal + 1 * dice`` between mask logits (Q, P) and binary targets (T, P), solved by
    ``scipy.optimize.linear_sum_assignment``. Returns two index tensors of length min(Q, T).
    """
    cost = (
        -CLASS_WEIGHT * object_logits.softmax(-1)[:, :1]
        + MASK_WEIGHT * pairwise_focal_cost(mask_logits.float(), targets.float())
        + DICE_WEIGHT * pairwise_dice_cost(mask_logits.float(), targets.float())
    )
    from scipy.optimize import linear_sum_assignment  # scipy: only where training matches

    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    device = mask_logits.device
    return torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)


def class_masks(labels: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """One binary mask (T, H, W) per class present in a label map (H, W); ignore excluded."""
    present = [c for c in torch.unique(labels).tolist() if c != ignore]
    if not present:
        return labels.new_zeros((0, *labels.shape), dtype=torch.float32)
    return torch.stack([(labels == c).float() for c in present])


def proposal_losses(
    mask_logits: torch.Tensor, object_logits: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """MaskFormer's set loss of the class-agnostic head, weighted as in its config.

    ``mask_logits`` (N, Q, Hm, Wm), ``object_logits`` (N, Q, 2), ``labels`` (N, Hm, Wm) class
    ids with 255 ignored (every class present is one target mask). Returns ``objectness``
    (cross-entropy, no-object weight 0.1), ``mask`` (focal, x20) and ``dice`` (x1), the last two
    averaged over the number of target masks.
    """
    n, q = object_logits.shape[:2]
    target_class = torch.ones((n, q), dtype=torch.long, device=object_logits.device)
    matched_logits, matched_targets = [], []
    for index in range(n):
        targets = class_masks(labels[index]).flatten(1)
        if targets.shape[0] == 0:
            continue
        logits = mask_logits[index].flatten(1)
        rows, cols = hungarian_match(logits, object_logits[index], targets)
        target_class[index, rows] = 0
        matched_logits.append(logits[rows])
        matched_targets.append(targets[cols])
    weight = torch.tensor([1.0, NO_OBJECT_WEIGHT], device=object_logits.device)
    losses = {
        "objectness": CLASS_WEIGHT
        * F.cross_entropy(object_logits.flatten(0, 1).float(), target_class.flatten(), weight)
    }
    if matched_logits:
        logits, targets = torch.cat(matched_logits).float(), torch.cat(matched_targets)
        count = max(1, logits.shape[0])
        prob = logits.sigmoid()
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_t = prob * targets + (1 - prob) * (1 - targets)
        focal = (0.25 * targets + 0.75 * (1 - targets)) * ce * (1 - p_t) ** 2
        dice = 1 - (2 * (prob * targets).sum(-1) + 1) / (prob.sum(-1) + targets.sum(-1) + 1)
        losses["mask"] = MASK_WEIGHT * focal.mean(1).sum() / count
        losses["dice"] = DICE_WEIGHT * dice.sum() / count
    return losses
