"""Everything ``scripts/make_tiny_models.py`` writes: tiny random models in the layouts the node
and the tools read, and a small labelled data set for ``ovss-train-deop``.

- ``blip/``: a BLIP image-text-matching checkpoint (``save_pretrained``), PnP-OVSS's
  ``pnp.vlm_pretrained`` (``tiny_blip.save_blip``);
- ``sd2/``: a Stable-Diffusion-2-shaped pipeline (``save_pretrained`` per part), DSLO's
  ``dslo.sd.model`` (``tiny_diffusion.save_tiny_pipeline``);
- ``clip-tiny.json`` + ``clip-tiny.pt``: the package's tiny open_clip ViT config
  (``data/demo-tiny-vit.json``: 64 px, patch 16) and a random state dict of it, so that the CLIP
  a DeOP checkpoint is trained on is the same file the node later loads (``model``,
  ``pretrained``); a DeOP checkpoint refuses any other CLIP;
- ``shapes/``: coloured shapes on a textured floor with their masks, in the ``folder`` layout of
  ``ovss_ros.training.deop_data`` (``classes.txt``, ``train|val/images|labels``);
- ``example.jpg``: a photo to segment (one the package ships).

All weights are random (seeded): outputs are meaningless; they are for trying the plumbing.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data"
CLIP_CONFIG = DATA / "demo-tiny-vit.json"
EXAMPLE_IMAGE = DATA / "demo_images" / "room_chair.jpg"
SHAPE_CLASSES = ("floor", "red ball", "blue box")
SHAPES_SIZE = 64  # pixels: the tiny CLIP's input size
# What make_tiny_models writes under its folder (names the printed commands use).
BLIP, SD2, CLIP_JSON, CLIP_WEIGHTS, SHAPES, EXAMPLE = (
    "blip",
    "sd2",
    "clip-tiny.json",
    "clip-tiny.pt",
    "shapes",
    "example.jpg",
)


def save_clip(config: Path, weights: Path, seed: int = 0) -> None:
    """Copy the tiny open_clip config to ``config`` and write a random state dict of that
    model (``torch.save`` of ``state_dict()``, what open_clip's ``pretrained=<file>`` loads) to
    ``weights``. The model is built by ``open_clip.create_model`` from the config, seeded."""
    import open_clip
    import torch

    shutil.copyfile(CLIP_CONFIG, config)
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip's "initialized randomly": that is the point
    try:
        model = open_clip.create_model(config.stem, pretrained=None, device="cpu")
    finally:
        logging.disable(logging.NOTSET)
    torch.save(model.state_dict(), weights)


def shape_sample(
    rng: np.random.Generator, size: int = SHAPES_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """One (size x size x 3 uint8 RGB, size x size uint8 labels) pair: a grey textured floor
    (label 0) with a red disc (1) and/or a blue square (2) of random place and size."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    floor = rng.uniform(90, 160) + 25 * np.sin(xx / rng.uniform(2, 6)) + rng.normal(0, 6, xx.shape)
    rgb = np.repeat(np.clip(floor, 0, 255)[..., None], 3, axis=2).astype(np.uint8)
    labels = np.zeros((size, size), np.uint8)
    for label in rng.permutation([1, 2])[: int(rng.integers(1, 3))]:
        radius = rng.uniform(size * 0.12, size * 0.25)
        cy, cx = rng.uniform(radius, size - radius, 2)
        if label == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            colour = (210, 40, 40)
        else:
            mask = (np.abs(yy - cy) < radius) & (np.abs(xx - cx) < radius)
            colour = (40, 70, 210)
        rgb[mask] = colour
        labels[mask] = label
    return rgb, labels


def save_shapes(root: Path, train: int = 8, val: int = 4, seed: int = 0) -> Path:
    """Write the shapes data set (``folder`` layout, PNG images and labels) under ``root``."""
    import cv2

    rng = np.random.default_rng(seed)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in SHAPE_CLASSES))
    for split, count in (("train", train), ("val", val)):
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rgb, labels = shape_sample(rng)
            name = f"{split}_{index:03d}.png"
            cv2.imwrite(str(root / split / "images" / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(root / split / "labels" / name), labels)
    return root


def write_all(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write every part under ``folder`` (which exists); return name -> path. Raises OSError
    when a part cannot be written."""
    from ovss_ros.tools.tiny_blip import save_blip
    from ovss_ros.tools.tiny_diffusion import save_tiny_pipeline

    paths = {name: folder / name for name in (BLIP, SD2, CLIP_JSON, CLIP_WEIGHTS, SHAPES, EXAMPLE)}
    save_blip(paths[BLIP], seed)
    save_tiny_pipeline(paths[SD2], seed)
    save_clip(paths[CLIP_JSON], paths[CLIP_WEIGHTS], seed)
    save_shapes(paths[SHAPES], seed=seed)
    shutil.copyfile(EXAMPLE_IMAGE, paths[EXAMPLE])
    return paths
