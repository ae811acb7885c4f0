"""PnP-OVSS's label-free tuning as released: CLIP on masked versus black images, random annealing.

The release (github.com/letitiabanana/PnP-OVSS) tunes layer, head and attention threshold with
``Search`` (``PnP_OVSS_0514_updated_segmentation.py`` ~1229-1311, search space and optimiser
~1381-1403) and ``Wsupervised_pn_mask_for_allimgs`` (``Dataset.py`` ~212-340):

- per image, its classes (image-level labels) are the prompt; one dropout round (``drop_iter
  1``): the class maps of the plain GradCAM at the trial's layer and head;
- each class's mask: the map above ``min_att``; min-max scaled and resized to CLIP's input
  (``Attmap_resize``: skimage bicubic, ``mode="constant"``); Gaussian blur of sigma 0.04 x the
  side, min-max scaled (``blurring``); above ``min_att`` again;
- positive image: CLIP's normalised input times the mask; negative: all zeros (the input
  times zero); CLIP ViT-L/14-336 (``clip_feature_extractor``), the class names as they are (no
  template), softmax over the image's own classes of 100 x cosine (``cal_clip_sim``);
- reward: the number of classes whose probability on the positive image beats the negative
  (``get_clipsim_for_pnmask``), summed over the images;
- search: layer x head (0..11 there, 1..12 here) x min_att ``np.arange(0.05, 0.5, 0.1)``,
  gradient-free-optimizers' ``RandomAnnealingOptimizer``, 34 iterations.

Ours where the release leaves something out: the code that saved the class maps is not in the
release, so the maps here are PnP-OVSS's own class maps min-max normalised per class (the scale
of ``pnp.threshold``, which the searched ``min_att`` becomes); CLIP's input is the image squashed
to CLIP's square (as PnP-OVSS's presence input); ``random_annealing`` is written here after the
algorithm of gradient-free-optimizers (not a dependency; the release's random sequence is not
reproduced).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage import transform

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import CLIP_LOGIT_SCALE, PnpOvss
from ovss_ros.core.methods.pnp_ovss.settings import TUNING_TRIALS
from ovss_ros.core.methods.pnp_ovss.steps import minmax, square

TRIALS = TUNING_TRIALS  # opt.search(Search, n_iter=34)
BLUR = 0.04  # Dataset.blurring: sigma = 0.04 x the long side
SEARCH_SEED = 1164005944  # the release's random_state


def release_mask(class_map: torch.Tensor, min_att: float, size: int) -> np.ndarray:
    """(g, g) class map -> (size, size) float {0, 1} mask, as ``Wsupervised_pn_mask_for_allimgs``
    makes it: above ``min_att`` (on the min-max normalised map), min-max scaled, skimage bicubic
    resize (mode constant), blur sigma 0.04 x size, min-max scaled, above ``min_att``."""
    binary = (minmax(class_map.float()[None])[0] > min_att).double().cpu().numpy()
    binary -= binary.min()
    if binary.max() > 0:
        binary /= binary.max()
    resized = transform.resize(binary, (size, size), order=3, mode="constant")
    blurred = ndimage.gaussian_filter(resized, BLUR * size)
    blurred -= blurred.min()
    if blurred.max() <= 0:  # nothing above min_att: an empty mask (the release divides 0 / 0)
        return np.zeros((size, size))
    return (blurred / blurred.max() > min_att).astype(np.float64)


@dataclass
class RewardClip:
    """The CLIP that judges the masks, and its text embedding of each class name."""

    clip: LoadedClip
    _text: dict[str, torch.Tensor]

    @classmethod
    def of(cls, clip: LoadedClip) -> RewardClip:
        return cls(clip, {})

    @property
    def size(self) -> int:
        size = self.clip.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @torch.inference_mode()
    def text(self, names: Sequence[str]) -> torch.Tensor:
        """(N, D) normalised embeddings of the names as they are (no template)."""
        missing = [n for n in names if n not in self._text]
        if missing:
            tokens = self.clip.tokenizer(missing).to(self.clip.device)
            features = F.normalize(self.clip.model.encode_text(tokens).float(), dim=-1)
            self._text.update(zip(missing, features, strict=True))
        return torch.stack([self._text[n] for n in names])

    def pixels(self, rgb: np.ndarray) -> torch.Tensor:
        """(1, 3, s, s) the image squashed to CLIP's square and normalised."""
        image = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).to(self.clip.device)
        image = square(image.permute(2, 0, 1)[None].float() / 255.0, self.size)
        mean = torch.tensor(self.clip.mean, device=image.device).view(1, 3, 1, 1)
        std = torch.tensor(self.clip.std, device=image.device).view(1, 3, 1, 1)
        return (image - mean) / std

    @torch.inference_mode()
    def wins(self, pixels: torch.Tensor, masks: np.ndarray, names: Sequence[str]) -> int:
        """Classes whose probability is higher on the masked image than on the black one.

        ``pixels`` (1, 3, s, s) normalised, ``masks`` (C, s, s), ``names`` the C classes."""
        positive = pixels * torch.from_numpy(masks).to(pixels)[:, None]
        images = torch.cat([positive, torch.zeros_like(pixels)]).to(self.clip.dtype)
        features = F.normalize(self.clip.model.encode_image(images).float(), dim=-1)
        probs = torch.softmax(CLIP_LOGIT_SCALE * features @ self.text(names).T, dim=-1)
        count = len(names)
        return int((probs[torch.arange(count), torch.arange(count)] > probs[count]).sum())


def release_reward(
    pipeline: PnpOvss,
    judge: RewardClip,
    images: Sequence[np.ndarray],
    labels: Sequence[Sequence[int]],
    settings: dict[str, object],
) -> int:
    """The release's reward of ``settings`` (layer, head, threshold = min_att): the summed wins
    of every image's labelled classes (vocabulary indices), one GradCAM round."""
    min_att = float(settings["threshold"])
    pipeline.reconfigure(**settings, dropout_rounds=1)
    total = 0
    for rgb, classes in zip(images, labels, strict=True):
        classes = list(dict.fromkeys(classes))
        if not classes:  # "No gt class for the image": skipped, as released
            continue
        pixels, _ = pipeline.preprocess(rgb)
        maps = pipeline.saliency(pixels, classes)
        masks = np.stack([release_mask(m, min_att, judge.size) for m in maps])
        names = [pipeline.classes[i].name for i in classes]
        total += judge.wins(judge.pixels(rgb), masks, names)
    return total


def random_annealing(
    objective: Callable[[dict[str, object]], float],
    space: dict[str, Sequence[object]],
    trials: int = TRIALS,
    seed: int = SEARCH_SEED,
    first: dict[str, object] | None = None,
    initial: int = 6,
    epsilon: float = 0.03,
    start_temp: float = 10.0,
    annealing_rate: float = 0.98,
) -> list[tuple[dict[str, object], float]]:
    """Maximise ``objective`` over the grid ``space`` (name -> values) in ``trials`` evaluations.

    Random annealing (gradient-free-optimizers' RandomAnnealingOptimizer's rule, defaults
    ``epsilon`` 0.03, ``start_temp`` 10, ``annealing_rate`` 0.98): ``initial`` starting points
    (``first``, then random ones), then each step draws a neighbour of the best point so far,
    each coordinate's index moved by a normal step of sigma ``epsilon x temp x (values - 1)``,
    ``temp = start_temp x annealing_rate^step``, and keeps it when it scores higher. A point is
    evaluated once (a repeat is redrawn, then replaced by a random untried one). Returns
    (settings, score) in evaluation order. ValueError for an empty space or trials < 1.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    names = list(space)
    sizes = [len(space[n]) for n in names]
    if not names or min(sizes) == 0:
        raise ValueError("the search space is empty")
    total = math.prod(sizes)
    rng = random.Random(seed)
    tried: dict[tuple[int, ...], float] = {}
    results: list[tuple[dict[str, object], float]] = []

    def settings(point: tuple[int, ...]) -> dict[str, object]:
        return {n: space[n][i] for n, i in zip(names, point, strict=True)}

    def evaluate(point: tuple[int, ...]) -> None:
        tried[point] = objective(settings(point))
        results.append((settings(point), tried[point]))

    def untried() -> tuple[int, ...]:
        while True:
            point = tuple(rng.randrange(s) for s in sizes)
            if point not in tried:
                return point

    if first is not None:
        evaluate(tuple(list(space[n]).index(first[n]) for n in names))
    while len(tried) < min(initial, trials, total):
        evaluate(untried())
    step = 0
    while len(tried) < min(trials, total):
        best = max(tried, key=lambda p: tried[p])
        temp = start_temp * annealing_rate**step
        point = None
        for _ in range(10):
            moved = tuple(
                min(max(round(i + rng.gauss(0.0, epsilon * temp * (s - 1))), 0), s - 1)
                for i, s in zip(best, sizes, strict=True)
            )
            if moved not in tried:
                point = moved
                break
        evaluate(point or untried())
        step += 1
    return results


def best_result(
    results: Sequence[tuple[dict[str, object], float]],
) -> tuple[dict[str, object], float]:
    """The highest score; the earliest evaluated among equals."""
    return max(results, key=lambda r: r[1]) if results else ({}, float("nan"))
