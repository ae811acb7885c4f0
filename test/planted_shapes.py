"""Helpers of the DeOP tests: a planted data set (coloured shapes on textured backgrounds, with
their masks) and a one-thread fixture.

Written in the folder layout of ``ovss_ros.training.deop_data.folder_data`` (``classes.txt``,
optional ``unseen.txt``, ``train|val/images/*.png``, ``train|val/labels/*.png``). Label 0 is the
textured background (a class like COCO-Stuff's stuff), 1.. the shapes; every pixel is labelled.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

CLASSES = ("stripes", "red circle", "blue square", "yellow triangle", "green diamond")
COLOURS = {1: (215, 40, 40), 2: (40, 70, 215), 3: (230, 205, 35), 4: (40, 175, 70)}


def planted_image(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One (size x size x 3 uint8 RGB, size x size uint8 labels) pair."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(3, 8)
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / period)
    base = rng.uniform(100, 150)
    grey = base + 35 * wave + rng.normal(0, 8, (size, size))
    tint = rng.uniform(0.9, 1.1, 3)
    rgb = np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)
    labels = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, len(CLASSES)))
        radius = float(rng.uniform(size * 0.12, size * 0.25))
        cy, cx = rng.uniform(radius, size - radius, 2)
        dy, dx = yy - cy, xx - cx
        if cls == 1:
            mask = dy**2 + dx**2 < radius**2
        elif cls == 2:
            mask = (np.abs(dy) < radius * 0.85) & (np.abs(dx) < radius * 0.85)
        elif cls == 3:
            mask = (dy < radius * 0.6) & (dy > -radius) & (np.abs(dx) < (dy + radius) * 0.6)
        else:
            mask = np.abs(dy) + np.abs(dx) < radius
        colour = np.clip(np.array(COLOURS[cls]) + rng.normal(0, 12, 3), 0, 255)
        shade = 1 + 0.08 * rng.normal(0, 1, (size, size, 1))
        rgb[mask] = np.clip(colour * shade[mask], 0, 255).astype(np.uint8)
        labels[mask] = cls
    return rgb, labels


def write_planted_set(
    root: Path,
    train: int = 48,
    val: int = 16,
    size: int = 128,
    seed: int = 0,
    unseen: tuple[str, ...] = (),
) -> Path:
    """Write the folder data set under ``root`` and return ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    if unseen:
        (root / "unseen.txt").write_text("\n".join(unseen) + "\n")
    for split, count in (("train", train), ("val", val)):
        for folder in ("images", "labels"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rgb, labels = planted_image(rng, size)
            cv2.imwrite(str(root / split / "images" / f"{index:04d}.png"), rgb[:, :, ::-1])
            cv2.imwrite(str(root / split / "labels" / f"{index:04d}.png"), labels)
    return root


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run faster on one thread than on two shared with a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
