"""FreeCP class purification (ICCV 2025, chenqi1126/FreeCP).

A plug-in after any dense CLIP: it drops vocabulary classes that are absent from the frame
(*redundancy*) and, among near-synonyms that claim the same region, keeps the one a CLIP crop
classifier prefers (*ambiguity*). Surviving classes are scored by their affinity-refined
activation maps. Everything is plain tensor code on the features' device; only the small box
masks and the class-graph go through the CPU (OpenCV connected components, a K x K closure).

Boxes are ``(x0, y0, x1, y1)`` in patch units with exclusive ends (OpenCV / torchvision style).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in patches, x1/y1 exclusive
CropClassifier = Callable[[list[Box], list[int]], torch.Tensor]

# (redundancy threshold T_rp, ambiguity threshold T_ap) per benchmark, read from FreeCP's
# released configs/cfg_*.py (commit 0ed5b4a). To be checked against the paper before they are
# quoted; a robot's vocabulary is closest to the object sets (VOC / COCO-Object).
DATASET_THRESHOLDS: dict[str, tuple[float, float]] = {
    "voc21": (0.15, 0.8),
    "voc20": (0.15, 0.7),
    "context60": (0.10, 0.7),
    "context59": (0.10, 0.7),
    "coco_object": (0.15, 0.8),
    "coco_stuff": (0.05, 0.7),
    "cityscapes": (0.10, 0.8),
    "ade20k": (0.05, 0.7),
}
REDUNDANCY_THRESHOLD = 0.1
AMBIGUITY_THRESHOLD = 0.7
BOX_THRESHOLD = 0.4
EPS = 1e-8
# Float32 elements of one block of the pairwise-minimum temporary in ambiguous_groups (64 MiB).
PAIRWISE_ELEMENTS = 1 << 24


def _minmax(x: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Min-max normalise to [0, 1], over everything (``dim=None``) or per slice along ``dim``."""
    if dim is None:
        low, high = x.min(), x.max()
    else:
        low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    return (x - low) / (high - low + EPS)


def class_activation(
    features: torch.Tensor, text: torch.Tensor, temperature: float = 100.0
) -> torch.Tensor:
    """CAM M (K, h, w): softmax over classes of ``temperature * cos``, then global min-max.

    ``features`` (h, w, D) and ``text`` (K, D) are L2-normalised. The normalisation is global,
    not per class, so a class that is weak everywhere stays weak: that is what lets step 4 see
    an absent class for what it is.
    """
    logits = torch.einsum("hwd,kd->khw", features, text.to(features.dtype))
    return _minmax(torch.softmax(temperature * logits, dim=0))


def purification_affinity(
    affinity: torch.Tensor, rounds: int = 3, square: bool = True
) -> torch.Tensor:
    """Patch transition matrix (…, hw, hw) from a raw attention affinity.

    Alternating column / row normalisation (Sinkhorn, ``rounds`` times) makes the matrix close to
    doubly stochastic, so no patch is a hub that every other patch copies; symmetrising and
    squaring then spread a class over two hops of similar patches. ``square=False`` leaves the
    square out for :func:`refined_maps` with ``hops=2``, which is the same and much cheaper.
    """
    a = affinity.float().clamp_min(0)  # a new tensor: the in-place steps leave the input alone
    for _ in range(rounds):
        a /= a.sum(dim=-2, keepdim=True).clamp_min(EPS)
        a /= a.sum(dim=-1, keepdim=True).clamp_min(EPS)
    a = (a + a.transpose(-2, -1)) / 2
    return a @ a if square else a


def class_boxes(cam: torch.Tensor, threshold: float = BOX_THRESHOLD) -> list[list[Box]]:
    """Per class, the bounding boxes of the connected regions above ``threshold * max``.

    The masks go to the CPU once (K x h x w bytes, tiny) for OpenCV's 8-connected components;
    a class whose map is zero everywhere gets no box.
    """
    peak = cam.amax(dim=(-2, -1), keepdim=True)
    masks = ((cam > threshold * peak) & (peak > 0)).to("cpu", torch.uint8).numpy()
    boxes = []
    for mask in masks:
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        boxes.append([(x, y, x + w, y + h) for x, y, w, h, _ in stats[1:].tolist()])
    return boxes


def box_masks(
    boxes: Sequence[Sequence[Box]], grid: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(len(boxes), h, w) bool: the union of each entry's boxes (drawn in NumPy, uploaded once)."""
    masks = np.zeros((len(boxes), *grid), dtype=bool)
    for mask, entry in zip(masks, boxes, strict=True):
        for x0, y0, x1, y1 in entry:
            mask[y0:y1, x0:x1] = True
    return torch.from_numpy(masks).to(device)


def union_box(boxes: Sequence[Box]) -> Box:
    """The smallest box that holds all of ``boxes`` (not empty)."""
    x0, y0, x1, y1 = zip(*boxes, strict=True)
    return min(x0), min(y0), max(x1), max(y1)


def refined_maps(
    cam: torch.Tensor,
    affinity: torch.Tensor,
    box_threshold: float = BOX_THRESHOLD,
    boxes: Sequence[Sequence[Box]] | None = None,
    hops: int = 1,
) -> torch.Tensor:
    """Refined maps M~ (K, h, w): each class propagated by the affinity from inside its boxes.

    ``affinity`` is the (hw, hw) output of :func:`purification_affinity`. Restricting the
    propagation to the class's own boxes keeps a class from leaking into regions it never
    claimed, so an absent class with a few stray hot patches refines to something unlike its
    CAM. Each map is min-max normalised on its own. ``boxes`` (from :func:`class_boxes`) may be
    passed when already computed. ``hops`` applies the affinity that many times: FreeCP's A @ A
    as the unsquared A with ``hops=2`` costs 2 K hw^2 instead of hw^3 (12x less at 28x37, K=20).
    """
    num, height, width = cam.shape
    boxes = class_boxes(cam, box_threshold) if boxes is None else boxes
    inside = box_masks(boxes, (height, width), cam.device)
    # (A * mask_cols) @ m == A @ (mask * m): (K, hw) x (hw, hw) products for all classes at once
    refined = (cam * inside).reshape(num, -1)
    for _ in range(hops):
        refined = refined @ affinity.to(cam.dtype).mT
    return _minmax(refined, dim=-1).reshape(num, height, width)


def redundancy_scores(cam: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """S_c = sum(M_c * M~_c) / (sum M_c + sum M~_c), in [0, 0.5]: (K,).

    A present class's CAM and refined map agree (S near 0.5); an absent class fires on scattered
    patches whose refined map spreads over the whole region they sit in, so S is small.
    """
    overlap = (cam * refined).sum(dim=(-2, -1))
    return overlap / (cam.sum(dim=(-2, -1)) + refined.sum(dim=(-2, -1)) + EPS)


def redundancy_keep(
    cam: torch.Tensor, refined: torch.Tensor, threshold: float = REDUNDANCY_THRESHOLD
) -> torch.Tensor:
    """Classes that survive redundancy purification: bool (K,), S_c > ``threshold``."""
    return redundancy_scores(cam, refined) > threshold


def ambiguous_groups(
    refined: torch.Tensor, keep: torch.Tensor, threshold: float = AMBIGUITY_THRESHOLD
) -> list[list[int]]:
    """Groups (two or more class indices, sorted) of kept classes that claim the same region.

    Soft IoU sum(min) / sum(max) between the kept refined maps; a group is a connected component
    of the graph "IoU >= threshold" (FreeCP uses >=). The pairwise minimum of the n kept
    classes is taken a block of rows at a time, each (rows, n, hw) temporary at most about
    PAIRWISE_ELEMENTS, so a large vocabulary that survives purification costs time, not
    n^2 hw memory.
    """
    index = keep.nonzero().flatten()
    if len(index) < 2:
        return []
    maps = refined[index].flatten(1).float()
    rows = max(1, PAIRWISE_ELEMENTS // maps.numel())
    inter = torch.cat(
        [
            torch.minimum(maps[start : start + rows, None], maps[None, :]).sum(dim=-1)
            for start in range(0, len(maps), rows)
        ]
    )
    total = maps.sum(dim=1)
    iou = inter / (total[:, None] + total[None, :] - inter).clamp_min(EPS)  # max = a + b - min
    reach = (iou >= threshold).cpu().float()
    while True:  # transitive closure; at most log2(K) squarings
        grown = ((reach @ reach) > 0).float()
        if torch.equal(grown, reach):
            break
        reach = grown
    index = index.cpu()
    groups = {tuple(index[row.bool()].tolist()) for row in reach if row.sum() > 1}
    return sorted(list(group) for group in groups)


def resolve_ambiguity(
    groups: Sequence[Sequence[int]],
    boxes_per_class: Mapping[int, Sequence[Box]] | Sequence[Sequence[Box]],
    crop_classifier: CropClassifier,
    keep: torch.Tensor,
) -> torch.Tensor:
    """New ``keep`` (K,) where each group keeps only the crop classifier's winner.

    The classifier gets ``[union box of the group's boxes]`` (patch units) and the group's class
    indices and returns scores (boxes, candidates); the winner has the highest mean score. A
    group without any box (all maps empty) is left as it is.
    """
    keep = keep.clone()
    for group in groups:
        group = list(group)
        boxes = [box for c in group for box in boxes_per_class[c]]
        if not boxes:
            continue
        scores = crop_classifier([union_box(boxes)], group)
        winner = group[int(scores.reshape(-1, len(group)).mean(dim=0).argmax())]
        keep[[c for c in group if c != winner]] = False
    return keep


def make_crop_classifier(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    description_embeddings: torch.Tensor,
    image: torch.Tensor,
    grid: tuple[int, int],
    input_size: int | tuple[int, int],
) -> CropClassifier:
    """FreeCP's crop classifier: crop the image at patch boxes, re-encode, match descriptions.

    ``image`` (1, 3, H, W) is the normalised input of the dense forward, ``grid`` (h, w) its patch
    grid, ``description_embeddings`` (K, D) normalised (class descriptions, or the prompt-template
    embeddings when the vocabulary has none). Crops are resized to ``input_size`` (the model's
    native size: a plain ``encode_image`` has no positional-embedding interpolation; FreeCP used
    112 px with its own interpolating encoder) and encoded in one batch. The callable returns
    cosine scores (boxes, candidates).
    """
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    scale_y, scale_x = image.shape[-2] / grid[0], image.shape[-1] / grid[1]

    @torch.no_grad()
    def classify(boxes: list[Box], candidates: list[int]) -> torch.Tensor:
        crops = []
        for x0, y0, x1, y1 in boxes:
            top, bottom = round(y0 * scale_y), round(y1 * scale_y)
            left, right = round(x0 * scale_x), round(x1 * scale_x)
            crop = image[..., top:bottom, left:right]
            crops.append(F.interpolate(crop, size=size, mode="bilinear", align_corners=False))
        embeddings = F.normalize(encode_image(torch.cat(crops)).float(), dim=-1)
        return embeddings @ description_embeddings[candidates].float().T

    return classify


def freecp(
    features: torch.Tensor,
    text: torch.Tensor,
    affinity: torch.Tensor,
    redundancy_threshold: float = REDUNDANCY_THRESHOLD,
    ambiguity_threshold: float = AMBIGUITY_THRESHOLD,
    crop_classifier: CropClassifier | None = None,
    background: bool = False,
    background_text: torch.Tensor | None = None,
    box_threshold: float = BOX_THRESHOLD,
    dropped_value: float = float("-inf"),
) -> torch.Tensor:
    """The whole FreeCP pipeline: class scores (K, h, w), or (K + 1, h, w) with ``background``.

    Inputs: ``features`` (h, w, D) normalised patch features of one image (any base method),
    ``text`` (K, D) normalised, one row per class (merge synonyms before, e.g. the normalised mean
    of their embeddings: synonyms as separate rows would split the CAM softmax and then look
    ambiguous to each other), ``affinity`` (hw, hw) raw patch affinity, FreeCP's being
    ``dense_forward(..., affinity="mean").affinity[0]``. ``background_text`` (B, D), optional,
    takes part in the CAM softmax only (FreeCP's background prompts: patches they win are cold
    for every class) and gets no channel. ``crop_classifier`` (see
    :func:`make_crop_classifier`) enables ambiguity purification; without it step 5 is skipped.

    Output: dropped classes are ``dropped_value`` (-inf) everywhere, kept classes carry their
    refined maps in [0, 1]. With ``background`` the last channel (index K) is 1 - max over kept
    classes of M~ (the paper's step 6), and every class may be dropped. Without it at least the
    best-scoring class is kept, so an argmax is always a real class.

    Engine use: ``labels = scores.argmax(0)``; label K (the background channel) maps to
    unlabeled; confidence is the winning score. Bilinear upsampling turns a -inf channel into
    NaN (0 * -inf), and NaN wins ``argmax``: upsample with ``dropped_value=-1.0`` (below every
    real score, and softmax(40 * x) makes it ~0), or argmax at patch resolution first.
    """
    num = text.shape[0]
    queries = text if background_text is None else torch.cat([text, background_text])
    cam = class_activation(features, queries)[:num]
    transition = purification_affinity(affinity, square=False)
    refined = refined_maps(cam, transition, box_threshold, hops=2)
    scores = redundancy_scores(cam, refined)
    keep = scores > redundancy_threshold
    if not background and not keep.any():
        keep[scores.argmax()] = True
    if crop_classifier is not None:
        groups = ambiguous_groups(refined, keep, ambiguity_threshold)
        if groups:
            members = sorted({c for group in groups for c in group})
            boxes = dict(zip(members, class_boxes(refined[members], box_threshold), strict=True))
            keep = resolve_ambiguity(groups, boxes, crop_classifier, keep)
    dropped = ~keep[:, None, None]
    out = refined.masked_fill(dropped, dropped_value)
    if not background:
        return out
    strongest = refined.masked_fill(dropped, 0.0).amax(dim=0, keepdim=True)
    return torch.cat([out, 1.0 - strongest])
