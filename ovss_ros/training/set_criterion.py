"""MaskFormer's set criterion, as DeOP's proposal network is trained with it.

Source: ``HungarianMatcher`` (``mask_former/modeling/matcher.py``) and ``SetCriterion``
(``mask_former/modeling/criterion.py``) of CongHan0808/DeOP (MaskFormer's, Cheng et al. 2021),
with the weights of ``configs/coco-stuff-164k-171/maskformer_R50_bs32_60k.yaml``:
``NO_OBJECT_WEIGHT`` 0.1, ``MASK_WEIGHT`` 20 (sigmoid focal loss), ``DICE_WEIGHT`` 1, class
weight 1, ``DEEP_SUPERVISION`` True (the same losses on every decoder layer's output).

Targets are the semantic mapper's: one binary mask per class present in the crop (ignored pixels
in no mask). The matcher's cost is ``-p(class) + 20 * focal + 1 * dice`` on the prediction
grid (targets resized nearest to it); the mask losses upsample the matched predictions
bilinearly to the target size and are normalised by the number of target masks in the batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

NO_OBJECT_WEIGHT = 0.1
MASK_WEIGHT = 20.0
DICE_WEIGHT = 1.0
CLASS_WEIGHT = 1.0
IGNORE = 255


def semantic_targets(labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image of labels (B, H, W) (255 ignored): (classes (T,), masks (T, H, W) float)."""
    targets = []
    for image in labels:
        classes = torch.unique(image)
        classes = classes[classes != IGNORE]
        masks = (image[None] == classes[:, None, None]).float()
        targets.append((classes.long(), masks))
    return targets


def _pair_focal(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Focal cost (Q, T) of mask logits (Q, P) against binary targets (T, P), mean over P."""
    prob = logits.sigmoid()
    pos = (1 - prob) ** 2 * F.binary_cross_entropy_with_logits(
        logits, torch.ones_like(logits), reduction="none"
    )
    neg = prob**2 * F.binary_cross_entropy_with_logits(
        logits, torch.zeros_like(logits), reduction="none"
    )
    cost = 0.25 * pos @ targets.T + 0.75 * neg @ (1 - targets).T
    return cost / logits.shape[1]


def _pair_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None]
    return 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def hungarian_match(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    targets: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image (query indices, target indices) of the optimal one-to-one assignment.

    ``class_logits`` (B, Q, K + 1), ``mask_logits`` (B, Q, h, w); targets of
    :func:`semantic_targets`. Cost: ``CLASS_WEIGHT * -softmax(logits)[class] + MASK_WEIGHT *
    focal + DICE_WEIGHT * dice`` with the target masks resized (nearest) to (h, w).
    """
    matches = []
    for logits, masks, (classes, target_masks) in zip(
        class_logits, mask_logits, targets, strict=True
    ):
        if not len(classes):
            empty = torch.zeros(0, dtype=torch.long)
            matches.append((empty, empty))
            continue
        small = F.interpolate(target_masks[:, None], size=masks.shape[-2:], mode="nearest")
        flat_pred, flat_target = masks.float().flatten(1), small[:, 0].flatten(1)
        cost = (
            -CLASS_WEIGHT * logits.float().softmax(-1)[:, classes]
            + MASK_WEIGHT * _pair_focal(flat_pred, flat_target)
            + DICE_WEIGHT * _pair_dice(flat_pred, flat_target)
        )
        rows, cols = linear_sum_assignment(np.nan_to_num(cost.cpu().numpy(), nan=1e6))
        matches.append((torch.as_tensor(rows), torch.as_tensor(cols)))
    return matches


def layer_losses(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    targets: list[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Unweighted ``ce``, ``mask`` (focal) and ``dice`` losses of one decoder layer's output.

    ``ce``: cross-entropy over K + 1 with weight ``NO_OBJECT_WEIGHT`` on the "no object" class
    (the target of every unmatched query); ``mask``: sigmoid focal loss (alpha 0.25, gamma 2),
    mean over pixels, summed over matched queries, divided by the number of target masks;
    ``dice`` likewise.
    """
    matches = hungarian_match(class_logits, mask_logits, targets)
    batch, queries, classes = class_logits.shape
    void = classes - 1
    target_classes = torch.full((batch, queries), void, dtype=torch.long)
    for index, ((rows, cols), (labels, _)) in enumerate(zip(matches, targets, strict=True)):
        target_classes[index, rows] = labels[cols].cpu()
    weight = torch.ones(classes, device=class_logits.device)
    weight[void] = NO_OBJECT_WEIGHT
    ce = F.cross_entropy(
        class_logits.float().transpose(1, 2), target_classes.to(class_logits.device), weight
    )
    count = max(sum(len(labels) for labels, _ in targets), 1)
    chosen, wanted = [], []
    for index, ((rows, cols), (_, masks)) in enumerate(zip(matches, targets, strict=True)):
        chosen.append(mask_logits[index, rows.to(mask_logits.device)])
        wanted.append(masks[cols.to(masks.device)])
    predicted = torch.cat(chosen)
    if not len(predicted):
        zero = mask_logits.sum() * 0
        return {"ce": ce, "mask": zero, "dice": zero}
    target = torch.cat(wanted)
    predicted = F.interpolate(
        predicted[:, None].float(), size=target.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0].flatten(1)
    target = target.flatten(1)
    prob = predicted.sigmoid()
    bce = F.binary_cross_entropy_with_logits(predicted, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha = 0.25 * target + 0.75 * (1 - target)
    focal = (alpha * (1 - p_t) ** 2 * bce).mean(1).sum() / count
    numerator = 2 * (prob * target).sum(-1)
    dice = (1 - (numerator + 1) / (prob.sum(-1) + target.sum(-1) + 1)).sum() / count
    return {"ce": ce, "mask": focal, "dice": dice}


def set_losses(
    layers: list[tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Weighted losses over every decoder layer (deep supervision): ``layers`` is a list of
    (class logits (B, Q, K + 1), mask logits (B, Q, h, w)), the last the final output; labels
    (B, H, W) with 255 ignored. Keys ``ce``, ``mask``, ``dice`` (final layer) and
    ``aux_ce``... (the sum over the earlier layers)."""
    targets = semantic_targets(labels)
    weights = {"ce": CLASS_WEIGHT, "mask": MASK_WEIGHT, "dice": DICE_WEIGHT}
    total: dict[str, torch.Tensor] = {}
    for index, (class_logits, mask_logits) in enumerate(layers):
        prefix = "" if index == len(layers) - 1 else "aux_"
        for name, value in layer_losses(class_logits, mask_logits, targets).items():
            key = prefix + name
            total[key] = total.get(key, 0) + weights[name] * value
    return total
