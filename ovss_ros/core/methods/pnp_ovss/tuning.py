"""Label-free tuning of PnP-OVSS: a CLIP reward for masks and a random search over settings.

PnP-OVSS (CVPR 2024, arXiv 2311.17095, section "hyperparameter tuning without segmentation
annotations") picks its layer, head and thresholds with a reward that needs no labels: CLIP
should recognise a class better in the image with the class's mask region kept than with it
removed. Released code: ``get_clipsim_for_pnmask`` / ``Search`` in
``PnP_OVSS_0514_updated_segmentation.py`` (a win is counted when CLIP's probability of the class
is higher for the kept image; the win count is maximised by a random/annealing search).

Here, per image and class that PnP-OVSS put in its prompt:
``kept = pixels * mask``, ``removed = pixels * (1 - mask)`` (normalised pixels, so zero is the
mean colour), CLIP probabilities over the whole vocabulary (softmax of 100 x cosine), a win when
``P(class | kept) > P(class | removed)``. The reward of a setting is the win rate over all
(image, class) pairs, ties broken by the mean margin ``P(kept) - P(removed)``. The release's
negative image is all zeros (it compares the kept image against a blank one); removing the
region is what the paper describes and what separates a good mask from a mask that covers
everything.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.methods.pnp_ovss.pnp_ovss import CLIP_LOGIT_SCALE, PnpOvss
from ovss_ros.core.segmentation import Segmentation

TUNED = ("layer", "head", "threshold", "dropout_rounds")  # what the search varies


@dataclass(frozen=True, order=True)
class Reward:
    """Win rate over (image, class) pairs, then mean margin; compares lexicographically."""

    win_rate: float
    margin: float
    pairs: int = field(default=0, compare=False)


def masked_pair(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(2, 3, s, s): ``pixels`` (3, s, s) with the region kept, and removed. ``mask`` (s, s)."""
    return torch.stack([pixels * mask, pixels * (1 - mask)])


@torch.inference_mode()
def class_probabilities(pipeline: PnpOvss, clip_pixels: torch.Tensor) -> torch.Tensor:
    """(N, classes) CLIP probabilities of N normalised images over the pipeline's vocabulary."""
    model = pipeline.clip.model
    features = F.normalize(model.encode_image(clip_pixels).float(), dim=-1)
    return torch.softmax(CLIP_LOGIT_SCALE * features @ pipeline.class_text.T, dim=-1)


@torch.inference_mode()
def clip_reward_pairs(
    pipeline: PnpOvss,
    clip_pixels: torch.Tensor,
    segmentation: Segmentation,
    classes: Sequence[int],
) -> list[tuple[float, float]]:
    """(P(class | kept), P(class | removed)) for each of ``classes`` in one image.

    ``clip_pixels`` (1, 3, s, s) is the image as CLIP sees it; each class mask is brought to
    that size by area averaging (a soft mask at the mask's edges).
    """
    size = tuple(clip_pixels.shape[-2:])
    pairs = []
    for index in classes:
        mask = torch.from_numpy(segmentation.mask(index)).float().to(clip_pixels.device)
        mask = F.interpolate(mask[None, None], size=size, mode="area")[0, 0]
        probs = class_probabilities(pipeline, masked_pair(clip_pixels[0], mask).to(clip_pixels))
        pairs.append((float(probs[0, index]), float(probs[1, index])))
    return pairs


def reward(pairs: Sequence[tuple[float, float]]) -> Reward:
    """Win rate and mean margin of (kept, removed) probability pairs."""
    if not pairs:
        return Reward(0.0, 0.0, 0)
    kept, removed = np.array(pairs, dtype=np.float64).T
    return Reward(float(np.mean(kept > removed)), float(np.mean(kept - removed)), len(pairs))


def evaluate_settings(
    pipeline: PnpOvss,
    images: Sequence[np.ndarray],
    present: Sequence[Sequence[int]],
    settings: dict[str, object],
) -> Reward:
    """Reward of ``settings`` on ``images`` with each image's classes fixed to ``present``."""
    pipeline.reconfigure(**settings)
    pairs: list[tuple[float, float]] = []
    for rgb, classes in zip(images, present, strict=True):
        _, clip_pixels = pipeline.preprocess(rgb)
        segmentation = pipeline.segment(rgb, present=classes)
        pairs += clip_reward_pairs(pipeline, clip_pixels, segmentation, classes)
    return reward(pairs)


@dataclass
class SearchSpace:
    """The values the search may pick; layer and head are 1-based."""

    layers: Sequence[int]
    heads: Sequence[int]
    thresholds: Sequence[float]
    dropout_rounds: Sequence[int]

    def candidates(self) -> list[dict[str, object]]:
        grid = itertools.product(self.layers, self.heads, self.thresholds, self.dropout_rounds)
        return [dict(zip(TUNED, values, strict=True)) for values in grid]


def random_search(
    objective: Callable[[dict[str, object]], Reward],
    space: SearchSpace,
    budget: int,
    seed: int = 0,
    first: dict[str, object] | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[tuple[dict[str, object], Reward]]:
    """Evaluate ``budget`` distinct candidates (``first`` first, the rest at random).

    Returns (settings, reward) in evaluation order; ``max(results, key=...)`` is the best.
    ``progress(budget)`` wraps the loop (e.g. ``tqdm``). Raises ValueError for an empty space
    or a budget below 1.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    candidates = space.candidates()
    if not candidates:
        raise ValueError("the search space is empty")
    order = random.Random(seed).sample(candidates, len(candidates))
    if first is not None:  # the starting settings are always measured, in the space or not
        order = [first] + [c for c in order if c != first]
    order = order[:budget]
    steps = progress(len(order)) if progress else None
    results = []
    for candidate in order:
        results.append((candidate, objective(candidate)))
        if steps is not None:
            steps.update(1)
            steps.set_postfix(best=f"{max(r for _, r in results).win_rate:.3f}")
    if steps is not None:
        steps.close()
    return results


def best_of(
    results: Sequence[tuple[dict[str, object], Reward]],
) -> tuple[dict[str, object], Reward]:
    """The highest reward; the earliest evaluated among equals."""
    best_index = max(range(len(results)), key=lambda i: (results[i][1], -i))
    return results[best_index]
