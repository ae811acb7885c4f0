"""ovss-tune's procedure: the label source and the search as the PnP-OVSS release runs them.

The label source of each image (its prompt): ``--image-labels`` (image-level labels, as the
release tunes with), else ``--presence-lists`` (class lists in the release's JSON layout), else
CLIP presence with the starting settings (ovss_ros's substitute). The search:
``release_tuning.random_annealing`` over layers x heads x thresholds (min_att) of ``tune_space``,
the reward ``release_tuning.release_reward``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ovss_ros.core.methods.pnp_ovss.presence_lists import PresenceLists, read_image_labels
from ovss_ros.core.vocabulary import ClassEntry

if TYPE_CHECKING:
    from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss
    from ovss_ros.core.methods.pnp_ovss.tuning import SearchSpace

LabelSource = Callable[["PnpOvss", Path, np.ndarray], list[int]]


def label_source(args: argparse.Namespace, files: Sequence[Path]) -> LabelSource:
    """The classes of each image, read and checked before any model loads (PresenceListError,
    a ValueError, naming the file and entry): every image needs an entry."""
    names = [ClassEntry.parse(c).name for c in args.classes]
    stems = [path.stem for path in files]
    if args.image_labels is not None and args.presence_lists is not None:
        raise ValueError(
            "--image-labels and --presence-lists both give the classes of each image: give one"
        )
    if args.image_labels is not None:
        labels = read_image_labels(args.image_labels, names)
        missing = [s for s in stems if s not in labels]
        if missing:
            raise ValueError(
                f"image-labels file {str(args.image_labels)!r} has no entry for {len(missing)} "
                f"of the {len(stems)} images (first: {missing[0]!r})"
            )
        if not any(labels[s] for s in stems):
            raise ValueError(
                f"image-labels file {str(args.image_labels)!r} gives none of the {len(stems)} "
                "images a class: every trial would score 0 (an image with an empty list is "
                "skipped)"
            )
        return lambda _pipeline, path, _rgb: labels[path.stem]
    if args.presence_lists is not None:
        lists = PresenceLists.load(args.presence_lists)
        lists.check_images(stems)
        lists.check_ids(len(names))
        return lambda _pipeline, path, _rgb: lists.vocabulary_indices(path.stem, len(names))
    return lambda pipeline, _path, rgb: pipeline.present_classes(pipeline.preprocess(rgb)[1])


def search_release(
    args: argparse.Namespace,
    pipeline: PnpOvss,
    space: SearchSpace,
    images: Sequence[np.ndarray],
    labels: Sequence[Sequence[int]],
) -> tuple[dict[str, object], str]:
    """Random annealing of the release's reward; prints the first and the best trial. Returns
    the best settings (layer, head, threshold) and a summary line for the params file."""
    from tqdm import tqdm

    from ovss_ros.core.methods.pnp_ovss.release_tuning import (
        best_result,
        random_annealing,
        release_reward,
    )

    start = pipeline.settings
    pairs = sum(len(set(classes)) for classes in labels)
    grid = space.grid()
    first = {name: getattr(start, name) for name in grid}
    steps = tqdm(total=args.budget, desc="ovss-tune", unit="trial", file=sys.stderr)

    def objective(candidate: dict[str, object]) -> float:
        wins = release_reward(pipeline, args.judge, images, labels, candidate)
        steps.update(1)
        return float(wins)

    try:
        results = random_annealing(objective, grid, args.budget, args.seed, first=first)
    finally:
        steps.close()
        pipeline.reconfigure(dropout_rounds=start.dropout_rounds)
    best, wins = best_result(results)
    print(f"start {first}: {results[0][1]:.0f} of {pairs} classes beat the black image")
    print(
        f"best  {best}: {wins:.0f} of {pairs} classes beat the black image ({len(results)} "
        f"trials, {len(images)} images, judge {args.reward_model} {args.reward_pretrained})"
    )
    return best, f"{wins:.0f} of {pairs} image-class pairs won on {len(images)} images"
