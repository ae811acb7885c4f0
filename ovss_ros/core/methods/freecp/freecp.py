"""FreeCP class purification (ICCV 2025, chenqi1126/FreeCP).

A plug-in after any dense CLIP: it drops vocabulary classes that are absent from the frame
(*redundancy*) and, among near-synonyms that claim the same region, keeps those a CLIP crop
classifier votes for (*ambiguity*). Surviving classes are scored by their affinity-refined
activation maps. Each step follows the official ``freecp_segmentor.py`` and its modified
``open_clip`` (window-level maths, box extraction, crop classifier); the background score is
formed by the caller after the windows are averaged (:func:`background_wins`). Everything is
plain tensor code on the features' device; only the small score maps (OpenCV contours) and the
class graph (a K x K closure) go through the CPU.

Boxes are ``(x0, y0, x1, y1)`` in patch units with exclusive ends (OpenCV / torchvision style).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from ovss_ros.core.frame_budget import rows_per_chunk
from ovss_ros.core.methods.dense.forward import interpolate_pos_embed, residual_block
from ovss_ros.core.methods.freecp.settings import DATASET_THRESHOLDS  # noqa: F401 (re-exported)

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in patches, x1/y1 exclusive
CropClassifier = Callable[[list[Box], list[int]], torch.Tensor]

REDUNDANCY_THRESHOLD = 0.15  # the official class default (rp_thres)
AMBIGUITY_THRESHOLD = 0.7
BOX_THRESHOLD = 0.4
CROP_SIZE = 112  # pixels: FreeCP resizes every crop to 112 x 112 before classifying it
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


def class_probabilities(
    features: torch.Tensor, queries: torch.Tensor, temperature: float = 100.0
) -> torch.Tensor:
    """P (Q, h, w): softmax over the queries of ``temperature * cos`` (FreeCP's ``logits``).

    ``features`` (h, w, D) and ``queries`` (Q, D) are L2-normalised; ``temperature`` is CLIP's
    logit scale (100). The redundancy score compares this raw P with the refined map
    (``freecp_segmentor.py``, ``redundancy_purification``).
    """
    logits = torch.einsum("hwd,kd->khw", features, queries.to(features.dtype))
    return torch.softmax(temperature * logits, dim=0)


def class_activation(
    features: torch.Tensor, text: torch.Tensor, temperature: float = 100.0
) -> torch.Tensor:
    """CAM M (K, h, w): :func:`class_probabilities`, then one global min-max.

    The normalisation is global, not per class (FreeCP's ``normalized_logits``), so a class
    that is weak everywhere stays weak; the boxes and the refinement start from this map.
    """
    return _minmax(class_probabilities(features, text, temperature))


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


def scoremap_boxes(scoremap: torch.Tensor, threshold: float = BOX_THRESHOLD) -> list[Box]:
    """Boxes of every contour of a (h, w) map in [0, 1]: FreeCP's ``scoremap2bbox`` with
    ``multi_contour_eval=True`` (``freecp_segmentor.py``, after Choe et al.'s WSOL code).

    The map is quantised as ``uint8(255 * map)`` (truncated) and thresholded at
    ``int(threshold * max)`` of the quantised map (strictly above, OpenCV ``THRESH_BINARY``);
    every contour OpenCV finds with ``RETR_TREE`` (outer borders and holes alike) gives the
    bounding box ``(x0, y0, x1, y1)`` with the end clipped to ``size - 1``. The clipped end is
    used as an exclusive end, so the last patch row and column are never in a box and a
    contour along them can give an empty (degenerate) box. No contour at all gives the single
    degenerate box (0, 0, 0, 0).
    """
    return _contour_boxes(scoremap.detach().float().cpu().numpy(), threshold)


def _contour_boxes(scoremap: np.ndarray, threshold: float) -> list[Box]:
    """:func:`scoremap_boxes` of a float32 (h, w) array."""
    height, width = scoremap.shape
    image = (scoremap * 255).astype(np.uint8)
    _, mask = cv2.threshold(image, int(threshold * image.max()), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if not contours:
        return [(0, 0, 0, 0)]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
    return boxes


def degenerate(box: Box) -> bool:
    """Whether ``box`` holds no patch (x0 == x1 or y0 == y1)."""
    return box[0] >= box[2] or box[1] >= box[3]


def class_boxes(cam: torch.Tensor, threshold: float = BOX_THRESHOLD) -> list[list[Box]]:
    """Per class of ``cam`` (K, h, w), its :func:`scoremap_boxes` (the refinement's masks);
    the maps go to the host in one copy."""
    maps = cam.detach().float().cpu().numpy()
    return [_contour_boxes(scoremap, threshold) for scoremap in maps]


def box_masks(
    boxes: Sequence[Sequence[Box]], grid: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(len(boxes), h, w) bool: the union of each entry's boxes (drawn in NumPy, uploaded once;
    a degenerate box draws nothing)."""
    masks = np.zeros((len(boxes), *grid), dtype=bool)
    for mask, entry in zip(masks, boxes, strict=True):
        for x0, y0, x1, y1 in entry:
            mask[y0:y1, x0:x1] = True
    return torch.from_numpy(masks).to(device)


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


def redundancy_scores(probabilities: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """S_c = sum(P_c * M~_c) / (sum P_c + sum M~_c): (K,), each in [0, 0.5].

    ``probabilities`` (K, h, w) is the raw softmax P (:func:`class_probabilities`, not the
    min-max normalised CAM), ``refined`` (K, h, w) the refined maps; as FreeCP's
    ``redundancy_purification``. A present class's P and refined map agree; an absent class
    fires on scattered patches whose refined map spreads over the region they sit in.
    """
    overlap = (probabilities * refined).sum(dim=(-2, -1))
    return overlap / (probabilities.sum(dim=(-2, -1)) + refined.sum(dim=(-2, -1)) + EPS)


def redundancy_keep(
    probabilities: torch.Tensor, refined: torch.Tensor, threshold: float = REDUNDANCY_THRESHOLD
) -> torch.Tensor:
    """Classes that survive redundancy purification: bool (K,), S_c > ``threshold``."""
    return redundancy_scores(probabilities, refined) > threshold


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
    refined: torch.Tensor,
    crop_classifier: CropClassifier,
    keep: torch.Tensor,
    box_threshold: float = BOX_THRESHOLD,
) -> torch.Tensor:
    """New ``keep`` (K,): each group keeps the union of its crops' winners.

    FreeCP's ``ambiguity_purification``: the group's mean refined map (``refined`` (K, h, w))
    is boxed with :func:`scoremap_boxes` (every contour: fragments and holes alike); each box is
    one vote, the class the crop classifier scores highest on that crop. A group keeps every
    class that wins at least one vote; if any box is degenerate (empty) the whole group stays,
    as the official loop adds the group for such a box. ``crop_classifier(boxes, candidates)``
    returns scores (boxes, candidates) for boxes in patch units; it is called once per group
    with all the group's boxes.
    """
    keep = keep.clone()
    for group in groups:
        group = list(group)
        boxes = scoremap_boxes(refined[group].mean(dim=0), box_threshold)
        if any(degenerate(box) for box in boxes):
            continue
        votes = crop_classifier(boxes, group).reshape(len(boxes), len(group)).argmax(dim=1)
        keep[group] = False
        keep[[group[int(v)] for v in votes]] = True
    return keep


def crop_embeddings(visual: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings (N, D) of crops (N, 3, S, S) at any size S of whole patches.

    The plain ViT forward read from its class token (the vanilla path of FreeCP's
    ``forward_all``, whose ``class_logits`` judge the crops), with the positional grid resized
    to S / patch by the DINO "+0.1" bicubic rule (``interpolate_pos_embed(rule="dino")``, as
    FreeCP's ``interpolate_pos_encoding``). At 112 px a ViT-B/16 sees a 7 x 7 grid.
    """
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(visual, grid, "dino").to(x.dtype)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:
        x = residual_block(block, x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def make_crop_classifier(
    visual: VisionTransformer,
    description_embeddings: torch.Tensor,
    image: torch.Tensor,
    patch: int,
    crop_size: int = CROP_SIZE,
) -> CropClassifier:
    """FreeCP's crop classifier: cut the image at patch boxes, re-encode, match descriptions.

    ``image`` (1, 3, H, W) is the normalised input of the dense forward (one window), ``patch``
    the model's patch size in pixels, ``description_embeddings`` (K, D) normalised (class
    descriptions, or the prompt-template embeddings when the vocabulary has none). A box
    (x0, y0, x1, y1) in patches is the pixel crop ``[y0 * patch : y1 * patch, x0 * patch :
    x1 * patch]``, resized bilinearly (corners not aligned) to ``crop_size`` (FreeCP: 112) and
    embedded with :func:`crop_embeddings`, in batches of at most ``frame_budget.CHUNK_BYTES``
    of activations. The callable returns cosine scores (boxes, candidates) in float32.
    """

    tokens = (crop_size // patch) ** 2 + 1
    per_crop = tokens * 4 * visual.conv1.out_channels * image.element_size()  # the MLP's input

    @torch.no_grad()
    def classify(boxes: list[Box], candidates: list[int]) -> torch.Tensor:
        step = rows_per_chunk(per_crop, len(boxes))  # a map's contours can be hundreds of boxes
        embeddings = []
        for first in range(0, len(boxes), step):
            crops = [
                F.interpolate(
                    image[..., y0 * patch : y1 * patch, x0 * patch : x1 * patch],
                    size=(crop_size, crop_size),
                    mode="bilinear",
                    align_corners=False,
                )
                for x0, y0, x1, y1 in boxes[first : first + step]
            ]
            embeddings.append(crop_embeddings(visual, torch.cat(crops)).float())
        embeddings = F.normalize(torch.cat(embeddings), dim=-1)
        return embeddings @ description_embeddings[candidates].float().T

    return classify


def freecp(
    features: torch.Tensor,
    text: torch.Tensor,
    affinity: torch.Tensor,
    redundancy_threshold: float = REDUNDANCY_THRESHOLD,
    ambiguity_threshold: float = AMBIGUITY_THRESHOLD,
    crop_classifier: CropClassifier | None = None,
    background_text: torch.Tensor | None = None,
    box_threshold: float = BOX_THRESHOLD,
) -> torch.Tensor:
    """FreeCP on one window: class scores (K, h, w), FreeCP's ``logits_ref``.

    Inputs: ``features`` (h, w, D) normalised patch features of one window (any base method),
    ``text`` (K, D) normalised, one row per class (merge synonyms before, e.g. the normalised
    mean of their embeddings: synonyms as separate rows would split the softmax and then look
    ambiguous to each other), ``affinity`` (hw, hw) raw patch affinity, FreeCP's being
    ``dense_forward(..., affinity="mean").affinity[0]``. ``background_text`` (B, D), optional,
    takes part in the softmax and its global min-max only (FreeCP's background prompts) and
    gets no channel. ``crop_classifier`` (:func:`make_crop_classifier`) enables ambiguity
    purification; without it that step is skipped.

    Steps (``freecp_segmentor.py``): CAM (:func:`class_activation`), refined maps inside the
    CAM's boxes, redundancy purification on the raw softmax P, then, with two or more
    survivors, ambiguity purification by crop votes (:func:`resolve_ambiguity`).

    Output: kept classes carry their refined maps in [0, 1] (maximum 1), dropped classes are 0
    everywhere, as the official; when nothing survives every map is 0. The background score
    is *not* formed here: FreeCP upsamples and averages the windows first and only then sets
    background = 1 - max over classes (:func:`background_wins`).
    """
    num = text.shape[0]
    queries = text if background_text is None else torch.cat([text, background_text])
    probabilities = class_probabilities(features, queries)
    cam = _minmax(probabilities)[:num]
    transition = purification_affinity(affinity, square=False)
    refined = refined_maps(cam, transition, box_threshold, hops=2)
    keep = redundancy_keep(probabilities[:num], refined, redundancy_threshold)
    if crop_classifier is not None:
        groups = ambiguous_groups(refined, keep, ambiguity_threshold)
        if groups:
            keep = resolve_ambiguity(groups, refined, crop_classifier, keep, box_threshold)
    return refined * keep[:, None, None]


def background_wins(best: torch.Tensor) -> torch.Tensor:
    """Where FreeCP's background beats the best class score ``best`` (any shape): bool.

    FreeCP's ``postprocess_result``: background = 1 - max over the (window-averaged,
    upsampled) class scores, placed first in the argmax, so it also wins ties.
    """
    return 1.0 - best >= best
