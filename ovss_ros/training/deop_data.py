"""Training data for DeOP: the zero-shot splits of the literature and their augmentation.

Zero-shot semantic segmentation (ZS3Net, ZegFormer, SimBaseline, DeOP) trains on the *seen*
classes only and scores all classes: pixels of unseen classes are ignored in training (DeOP's
``*_base`` label folders have them at 255) and the validation vocabulary holds every class, so
mIoU is reported on the seen and the unseen classes and their harmonic mean.

- COCO-Stuff 164k, 171 classes, 15 unseen (ZegFormer's split, DeOP's; written down once, in
  ``ovss_ros.evaluation.class_splits.COCO_STUFF_156_15``): :data:`COCO_STUFF_UNSEEN`.
- PASCAL VOC 2012, 20 classes without background (background not scored), 5 unseen: the last
  five, potted plant, sheep, sofa, train, tv monitor (``register_voc_seg.py``).
- A folder: ``classes.txt`` (one class per line, synonyms after ';'), optional ``unseen.txt``
  (class names), ``train/images``, ``train/labels``, ``val/images``, ``val/labels`` (labels are
  index PNGs with the same stem, 255 = ignore). Tests generate one.

Readers and label conventions are ``ovss_ros.evaluation``'s; only the training splits are added.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ovss_ros.core.file_checks import read_text
from ovss_ros.core.vocabulary import ClassEntry
from ovss_ros.evaluation.class_splits import COCO_STUFF_156_15
from ovss_ros.evaluation.dataset_readers import (
    IGNORE,
    MAX_LABEL_PIXELS,
    DataError,
    DatasetReader,
    find_root,
    pairs_from_scan,
    pairs_from_split,
    reduce_zero_label_map,
)
from ovss_ros.evaluation.evaluation_loop import read_rgb
from ovss_ros.evaluation.protocol import builtin_class_file, class_lines
from ovss_ros.ros.image_conversion import ImageConversionError, image_file_size

if TYPE_CHECKING:  # torch is imported when a run starts: the tool checks its data without it
    import torch

DATASETS = ("coco_stuff", "voc", "folder")
COCO_STUFF_UNSEEN = tuple(COCO_STUFF_156_15.unseen.values())
VOC_UNSEEN = ("pottedplant", "sheep", "sofa", "train", "television monitor")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class TrainingData:
    """A data set's train and val readers, its vocabulary and its unseen classes."""

    name: str
    train: DatasetReader
    val: DatasetReader
    classes: list[str]  # vocabulary entries, index = label value
    unseen: list[int]  # label values held out of training

    @property
    def names(self) -> list[str]:
        return [ClassEntry.parse(line).name for line in self.classes]

    @property
    def seen(self) -> list[int]:
        return [i for i in range(len(self.classes)) if i not in set(self.unseen)]

    def check(self, max_pixels: int = MAX_LABEL_PIXELS) -> None:
        """Everything a run needs, before any model is loaded: classes, seen classes, images in
        both splits, and every pair's image and labels declaring one size of at most
        ``max_pixels`` (headers only: a corrupt, empty, oversized or mismatched file is named
        now, not some steps into the run). Raises ValueError (DataError for a file)."""
        if not self.classes:
            raise ValueError(f"{self.name}: the class list is empty: list one class per line")
        if not self.seen:
            raise ValueError(
                f"{self.name}: every class is unseen ({len(self.classes)} classes): nothing to "
                "train on; list fewer classes in unseen.txt"
            )
        for reader in (self.train, self.val):
            if not len(reader):
                raise ValueError(f"{self.name}: {reader.name} has no images")
            for image, labels in reader.pairs:
                sizes = []
                for path, what in ((image, "image"), (labels, "label image")):
                    try:
                        sizes.append(image_file_size(path, max_pixels=max_pixels))
                    except (ImageConversionError, OSError) as error:
                        raise DataError(f"{what} {path}: {' '.join(str(error).split())}") from None
                if sizes[0] != sizes[1]:
                    raise DataError(
                        f"{image}: image {sizes[0][0]}x{sizes[0][1]} and labels {labels} "
                        f"{sizes[1][0]}x{sizes[1][1]} differ in size"
                    )

    def training_labels(self) -> np.ndarray:
        """Look-up table: data-set label -> index among the seen classes, unseen -> 255."""
        table = np.full(256, IGNORE, dtype=np.uint8)
        table[self.seen] = np.arange(len(self.seen))
        return table


def _indices(classes: list[str], names: tuple[str, ...] | list[str], source: str) -> list[int]:
    lookup = {ClassEntry.parse(line).name.lower(): i for i, line in enumerate(classes)}
    missing = [n for n in names if n.lower() not in lookup]
    if missing:
        raise ValueError(f"unseen classes {missing} are not in the class list of {source}")
    return sorted(lookup[n.lower()] for n in names)


def coco_stuff_data(root: Path) -> TrainingData:
    """``coco_stuff164k/``: ``images/{train,val}2017/*.jpg``,
    ``annotations/{train,val}2017/*_labelTrainIds.png`` (mmsegmentation's converter)."""
    parts = ("images/train2017", "annotations/train2017", "images/val2017", "annotations/val2017")
    base = find_root(root, parts, ("coco_stuff164k",))
    split = {
        name: pairs_from_scan(
            base / f"images/{name}", base / f"annotations/{name}", ".jpg", "_labelTrainIds.png"
        )
        for name in ("train2017", "val2017")
    }
    classes = class_lines(builtin_class_file("coco_stuff.txt"))
    return TrainingData(
        "coco_stuff",
        DatasetReader("coco_stuff_train", split["train2017"]),
        DatasetReader("coco_stuff", split["val2017"]),
        classes,
        _indices(classes, COCO_STUFF_UNSEEN, "coco_stuff"),
    )


def voc_data(root: Path) -> TrainingData:
    """``VOCdevkit/VOC2012/``: ``JPEGImages``, ``SegmentationClass`` with
    ``ImageSets/Segmentation/{train,val}.txt``; the augmented training set
    (``SegmentationClassAug`` + ``ImageSets/Segmentation/trainaug.txt``) when present."""
    base = find_root(root, ("JPEGImages", "SegmentationClass"), ("VOCdevkit/VOC2012", "VOC2012"))
    sets = base / "ImageSets/Segmentation"
    if (base / "SegmentationClassAug").is_dir() and (sets / "trainaug.txt").is_file():
        train_labels, train_list = base / "SegmentationClassAug", sets / "trainaug.txt"
    else:
        train_labels, train_list = base / "SegmentationClass", sets / "train.txt"
    images = base / "JPEGImages"
    classes = class_lines(builtin_class_file("voc20.txt"))
    table = reduce_zero_label_map()  # background 0 -> ignore, class k -> k - 1
    return TrainingData(
        "voc",
        DatasetReader(
            "voc_train", pairs_from_split(images, train_labels, train_list, ".jpg", ".png"), table
        ),
        DatasetReader(
            "voc20",
            pairs_from_split(images, base / "SegmentationClass", sets / "val.txt", ".jpg", ".png"),
            table,
        ),
        classes,
        _indices(classes, VOC_UNSEEN, "voc20"),
    )


def folder_data(root: Path) -> TrainingData:
    """A generated or hand-made set; see the module docstring for the layout."""
    root = Path(root).expanduser()
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise FileNotFoundError(f"data set layout not found: expected {classes_file}")
    classes = class_lines(read_text(classes_file, "class list"))
    unseen_file = root / "unseen.txt"
    unseen_names = (
        class_lines(read_text(unseen_file, "unseen class list"))
        if os.path.lexists(unseen_file)
        else []
    )
    readers = {}
    for split in ("train", "val"):
        images, labels = root / split / "images", root / split / "labels"
        if not images.is_dir():
            raise FileNotFoundError(f"data set layout not found: expected {images}")
        suffix = next(
            (s for s in IMAGE_SUFFIXES if next(images.glob(f"*{s}"), None) is not None), ".png"
        )
        readers[split] = DatasetReader(
            f"{root.name}_{split}", pairs_from_scan(images, labels, suffix, ".png")
        )
    return TrainingData(
        root.name,
        readers["train"],
        readers["val"],
        classes,
        _indices(classes, unseen_names, str(root)),
    )


def training_data(name: str, root: str | Path) -> TrainingData:
    """Data set by name: coco_stuff, voc or folder; FileNotFoundError/ValueError when wrong."""
    builders = {"coco_stuff": coco_stuff_data, "voc": voc_data, "folder": folder_data}
    if name not in builders:
        raise ValueError(f"unknown data set {name!r}: use one of {list(builders)}")
    return builders[name](Path(root))


class CropDataset:
    """Sample ``s`` of the training stream: a random-scale, random-crop, random-flip crop (a
    map-style data set of torch's ``DataLoader``: ``len`` and indexing).

    Deterministic in (seed, s): the image is ``permutation(epoch)[s % n]`` (one permutation per
    epoch from the seed), the augmentation draws from a generator seeded with (seed, s). So a
    resumed run sees exactly the crops an uninterrupted one would, with any number of workers.
    Scale: the short side becomes ``crop * U(scale_range)`` (DeOP: 0.5..1.5 x 512, crop 512).
    Returns (crop x crop x 3 uint8 RGB, crop x crop uint8 labels in the seen-class space).
    """

    def __init__(
        self,
        data: TrainingData,
        crop: int,
        seed: int = 0,
        scale_range: tuple[float, float] = (0.5, 1.5),
        length: int = 1 << 40,
    ) -> None:
        self.reader = data.train
        self.table = data.training_labels()
        self.crop = crop
        self.seed = seed
        self.scale_range = scale_range
        self.length = length
        self._permutations: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length

    def image_index(self, sample: int) -> int:
        n = len(self.reader)
        epoch = sample // n
        if epoch not in self._permutations:
            import torch

            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutations = {epoch: torch.randperm(n, generator=generator)}
        return int(self._permutations[epoch][sample % n])

    def __getitem__(self, sample: int) -> tuple[np.ndarray, np.ndarray]:
        path, labels = self.reader.sample(self.image_index(sample))
        rgb = read_rgb(path)
        if rgb.shape[:2] != labels.shape:
            raise DataError(f"{path}: image {rgb.shape[:2]} and labels {labels.shape} differ")
        rng = np.random.default_rng([self.seed, sample])
        scale = self.crop * rng.uniform(*self.scale_range) / min(labels.shape)
        size = (max(1, round(labels.shape[1] * scale)), max(1, round(labels.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(self.table[labels], size, interpolation=cv2.INTER_NEAREST)
        pad_y, pad_x = max(0, self.crop - size[1]), max(0, self.crop - size[0])
        if pad_y or pad_x:
            rgb = np.pad(rgb, ((0, pad_y), (0, pad_x), (0, 0)))
            labels = np.pad(labels, ((0, pad_y), (0, pad_x)), constant_values=IGNORE)
        top = int(rng.integers(0, labels.shape[0] - self.crop + 1))
        left = int(rng.integers(0, labels.shape[1] - self.crop + 1))
        rgb = rgb[top : top + self.crop, left : left + self.crop]
        labels = labels[top : top + self.crop, left : left + self.crop]
        if rng.random() < 0.5:
            rgb, labels = rgb[:, ::-1], labels[:, ::-1]
        return np.ascontiguousarray(rgb), np.ascontiguousarray(labels)


def collate(batch: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Stack crops: (B, crop, crop, 3) uint8 and (B, crop, crop) uint8."""
    return np.stack([b[0] for b in batch]), np.stack([b[1] for b in batch])
