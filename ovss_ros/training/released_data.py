"""The training inputs of DeOP's three released stages.

- :class:`SemanticCrops` (stages proposals and deop): ``MaskFormerSemanticDatasetMapper``
  (``mask_former/data/dataset_mappers/mask_former_semantic_dataset_mapper.py``, CongHan0808/DeOP):
  the short side resized to a random choice of ``short_sides`` (detectron2
  ``ResizeShortestEdge``, long side at most 2560), a random ``crop`` x ``crop`` crop
  (``RandomCrop_CategoryAreaConstraint`` with ``SINGLE_CATEGORY_MAX_AREA`` 1.0: a plain random
  crop), SSD colour augmentation (:func:`color_aug_ssd`), a random horizontal flip, then the
  crop padded at the bottom and right to ``pad`` x ``pad`` with 128 (labels 255), or cut to it
  where the crop is larger (``F.pad`` with negative padding: DeOP's 640 crop with
  ``SIZE_DIVISIBILITY`` 512 becomes its top-left 512 x 512).
- :class:`MaskCrops` (stage prompt): ``MaskFormerBinarySemanticDatasetMapper`` with the
  ``_classification`` data sets: one (image, class) pair per sample, at most
  ``per_class`` pairs per class (``SAMPLE_PER_CLASS`` 32, drawn once with a seed), the image cut
  to the box of the class's mask (``CropImageWithMask``, expand ratio 1.0), then torchvision's
  ``RandomResizedCrop`` rule (scale 0.08-1, ratio 3/4-4/3) to ``size`` x ``size`` and a random
  flip. Returns the crop and its binary mask (the class's pixels).

Both are deterministic in (seed, sample), like :class:`~ovss_ros.training.deop_data.CropDataset`,
so a resumed run sees the inputs an uninterrupted one would.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ovss_ros.evaluation.dataset_readers import IGNORE
from ovss_ros.evaluation.evaluation_loop import read_rgb
from ovss_ros.training.deop_data import TrainingData

MAX_LONG_SIDE = 2560
PAD_VALUE = 128


def color_aug_ssd(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """detectron2's ``ColorAugSSDTransform`` (point_rend): brightness (+-32), contrast
    (x 0.5-1.5), saturation (x 0.5-1.5, HSV), hue (+-18 of OpenCV's 180), each with
    probability 1/2, contrast first or last with probability 1/2; every step clipped to
    0..255 and truncated to uint8, as there."""

    def convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def brightness(img):
        return convert(img, beta=rng.uniform(-32, 32)) if rng.random() < 0.5 else img

    def contrast(img):
        return convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else img

    def saturation(img):
        if rng.random() < 0.5:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return img

    def hue(img):
        if rng.random() < 0.5:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            shift = int(rng.integers(-18, 19))
            hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int32) + shift) % 180).astype(np.uint8)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return img

    order = (
        (brightness, contrast, saturation, hue)
        if rng.random() < 0.5
        else (brightness, saturation, hue, contrast)
    )
    image = np.ascontiguousarray(rgb, dtype=np.uint8)
    for step in order:
        image = step(image)
    return image


def _epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, 7, epoch]).permutation(count)


class SemanticCrops:
    """Sample ``s``: (pad x pad x 3 uint8 RGB, pad x pad uint8 labels in the seen-class
    space) (module docstring). Map-style, ``length`` samples."""

    def __init__(
        self,
        data: TrainingData,
        short_sides: tuple[int, ...],
        crop: int,
        pad: int,
        seed: int = 0,
        color: bool = True,
        length: int = 1 << 40,
    ) -> None:
        self.reader, self.table = data.train, data.training_labels()
        self.short_sides, self.crop, self.pad = tuple(short_sides), crop, pad
        self.seed, self.color, self.length = seed, color, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, sample: int) -> tuple[np.ndarray, np.ndarray]:
        count = len(self.reader)
        index = int(_epoch_order(self.seed, sample // count, count)[sample % count])
        path, labels = self.reader.sample(index)
        rgb = read_rgb(path)
        rng = np.random.default_rng([self.seed, sample])
        short = self.short_sides[int(rng.integers(len(self.short_sides)))]
        height, width = labels.shape
        scale = short / min(height, width)
        if max(height, width) * scale > MAX_LONG_SIDE:
            scale = MAX_LONG_SIDE / max(height, width)
        size = (max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(self.table[labels], size, interpolation=cv2.INTER_NEAREST)
        crop_h, crop_w = min(self.crop, size[1]), min(self.crop, size[0])
        top = int(rng.integers(0, size[1] - crop_h + 1))
        left = int(rng.integers(0, size[0] - crop_w + 1))
        rgb = rgb[top : top + crop_h, left : left + crop_w]
        labels = labels[top : top + crop_h, left : left + crop_w]
        if self.color:
            rgb = color_aug_ssd(rgb, rng)
        if rng.random() < 0.5:
            rgb, labels = rgb[:, ::-1], labels[:, ::-1]
        out_rgb = np.full((self.pad, self.pad, 3), PAD_VALUE, np.uint8)
        out_labels = np.full((self.pad, self.pad), IGNORE, np.uint8)
        h, w = min(self.pad, crop_h), min(self.pad, crop_w)
        out_rgb[:h, :w] = rgb[:h, :w]
        out_labels[:h, :w] = labels[:h, :w]
        return out_rgb, out_labels


def random_resized_box(
    height: int, width: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (scale 0.08-1, ratio 3/4-4/3, 10 tries,
    then the centre crop clamped to the ratio) as DeOP's ``RandomResizedCrop``: (y, x, h, w)."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        h, w = height, width
    h, w = min(h, height), min(w, width)
    return (height - h) // 2, (width - w) // 2, h, w


def class_pairs(
    data: TrainingData, per_class: int, seed: int, progress: bool = False
) -> list[tuple[int, int]]:
    """(image index, seen-class index) pairs: every class present in a training image, at most
    ``per_class`` pairs per class drawn (with replacement, as the release's
    ``rng.choice``) by a generator seeded with ``seed``. Reads every training label image
    (``progress``: with a progress bar)."""
    from tqdm import tqdm

    table = data.training_labels()
    groups: dict[int, list[int]] = {}
    scan = tqdm(range(len(data.train)), desc="classes per image", disable=not progress)
    for index in scan:
        _, labels = data.train.sample(index)
        for cls in np.unique(table[labels]):
            if cls != IGNORE:
                groups.setdefault(int(cls), []).append(index)
    rng = np.random.default_rng(seed)
    pairs = []
    for cls in sorted(groups):
        images = groups[cls]
        chosen = images if len(images) < per_class else rng.choice(images, size=per_class)
        pairs += [(int(image), cls) for image in chosen]
    return pairs


class MaskCrops:
    """Sample ``s``: (size x size x 3 uint8 RGB, size x size bool mask, seen-class index)."""

    def __init__(
        self,
        data: TrainingData,
        pairs: list[tuple[int, int]],
        size: int = 224,
        seed: int = 0,
        length: int = 1 << 40,
    ) -> None:
        if not pairs:
            raise ValueError(f"{data.name}: no seen class appears in a training label image")
        self.reader, self.table, self.pairs = data.train, data.training_labels(), pairs
        self.size, self.seed, self.length = size, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, sample: int) -> tuple[np.ndarray, np.ndarray, int]:
        count = len(self.pairs)
        order = _epoch_order(self.seed, sample // count, count)
        image, cls = self.pairs[int(order[sample % count])]
        path, labels = self.reader.sample(image)
        rgb, mask = read_rgb(path), self.table[labels] == cls
        ys, xs = np.nonzero(mask)
        rgb = rgb[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        mask = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        rng = np.random.default_rng([self.seed, sample])
        y, x, h, w = random_resized_box(*mask.shape, rng)
        size = (self.size, self.size)
        rgb = cv2.resize(rgb[y : y + h, x : x + w], size, interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(
            mask[y : y + h, x : x + w].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST
        )
        if rng.random() < 0.5:
            rgb, mask = rgb[:, ::-1], mask[:, ::-1]
        return np.ascontiguousarray(rgb), np.ascontiguousarray(mask).astype(bool), cls


def collate_masks(batch: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack :class:`MaskCrops` samples: (B, S, S, 3) uint8, (B, S, S) bool, (B,) int64."""
    return (
        np.stack([b[0] for b in batch]),
        np.stack([b[1] for b in batch]),
        np.array([b[2] for b in batch], dtype=np.int64),
    )
