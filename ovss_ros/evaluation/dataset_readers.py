"""Readers for the benchmark folder layouts that mmsegmentation, SCLIP and NACLIP use.

Every reader gives (image path, label array) pairs in one convention, so the metrics never need to
know which data set they score: a label value is an index into that data set's class-name file,
and 255 means "not evaluated" (object boundaries in VOC, unlabeled pixels, and the background of
the data sets that have no background class). The conversions are the ones the published numbers
were computed with (mmsegmentation's ``reduce_zero_label``, the GroupViT/TCL COCO-Object
conversion), so our mIoU is comparable with theirs.

Each ``read_*`` function takes the data set's root folder (the one mmsegmentation calls
``data_root``); a parent folder that holds the usual sub-folder (``VOCdevkit/VOC2012``, ...) works
too. Missing labels are reported before any image is segmented.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ovss_ros.core.file_checks import read_text

IGNORE = 255  # label value that is never scored


def identity_map() -> np.ndarray:
    """Stored value = class index (VOC21, PASCAL Context 60, COCO-Stuff, Cityscapes trainIds)."""
    return np.arange(256, dtype=np.uint8)


def reduce_zero_label_map() -> np.ndarray:
    """mmsegmentation's ``reduce_zero_label``: 0 (background / other) -> 255, k -> k - 1.

    Used where the benchmark has no background class (VOC20, PASCAL Context 59, ADE20K): those
    pixels are not scored at all, rather than scored as a class nobody asked for.
    """
    table = np.arange(256, dtype=np.int32) - 1
    table[0] = IGNORE
    table[IGNORE] = IGNORE
    return table.astype(np.uint8)


def coco_object_from_stuff_map() -> np.ndarray:
    """COCO-Stuff trainIds (0..79 things, 80..170 stuff, 255) -> COCO-Object (0 = background).

    Same result as NACLIP/SCLIP's ``cvt_coco_object.py`` (from GroupViT): things shift to 1..80,
    stuff becomes background, and so do the unlabeled pixels (its table maps 255 to 0 as well).
    """
    table = np.zeros(256, dtype=np.uint8)
    table[:80] = np.arange(1, 81)
    return table


# Label images are decoded whole: as many pixels as the tools' image limit allows.
MAX_LABEL_PIXELS = 40_000_000


class DataError(ValueError):
    """A data set file (image, labels, list) cannot be used; ``str(error)`` names it and why."""


class DatasetReader:
    """(image path, label path) pairs of one split, and how stored label values become classes."""

    def __init__(
        self,
        name: str,
        pairs: Sequence[tuple[Path, Path]],
        label_map: np.ndarray | None = None,
    ) -> None:
        self.name = name
        self.pairs = list(pairs)
        self.label_map = identity_map() if label_map is None else label_map
        self.max_pixels = MAX_LABEL_PIXELS

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[tuple[Path, np.ndarray]]:
        for index in range(len(self.pairs)):
            yield self.sample(index)

    def sample(self, index: int) -> tuple[Path, np.ndarray]:
        """Image path and HxW uint8 labels (255 = ignore) of sample ``index``."""
        image_path, label_path = self.pairs[index]
        return image_path, self.load_labels(label_path)

    def load_labels(self, path: Path) -> np.ndarray:
        """HxW uint8 class indices (255 = ignore) from an index PNG (palette or grey).

        Bounded before decoding (``image_file_size``: a regular file declaring at most
        ``max_pixels``); raises DataError naming the file when it is unusable or damaged.
        """
        from ovss_ros.ros.image_conversion import ImageConversionError, image_file_size

        try:
            image_file_size(path, max_pixels=self.max_pixels)
            with Image.open(path) as image:
                stored = np.asarray(image)  # palette PNGs give their indices, not colours
        except (ImageConversionError, OSError, ValueError) as error:  # truncated: OSError
            raise DataError(f"label image {path}: {' '.join(str(error).split())}") from None
        if stored.ndim != 2:
            raise DataError(
                f"{path}: label image has {stored.shape[2]} channels; expected an index PNG "
                "(palette or grey), not a colour visualisation"
            )
        if stored.dtype != np.uint8:
            if stored.min() < 0 or stored.max() > 255:
                raise DataError(f"{path}: label values outside 0..255 ({stored.dtype})")
            stored = stored.astype(np.uint8)
        return self.label_map[stored]


def find_root(root: Path, required: Sequence[str], nested: Sequence[str] = ()) -> Path:
    """``root`` itself if it holds ``required``, else the first ``root/nested`` that does.

    Raises FileNotFoundError naming what is missing: ``root`` itself, or the paths missing in
    the candidate folder that holds most of the layout (``root`` first on ties).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data set folder {root} does not exist (or is not a folder)")
    candidates = [root, *(root / sub for sub in nested)]
    found = {c: [part for part in required if (c / part).exists()] for c in candidates}
    for candidate in candidates:
        if len(found[candidate]) == len(required):
            return candidate
    closest = max(candidates, key=lambda c: len(found[c]))  # max keeps the first on ties
    missing = [str(closest / part) for part in required if part not in found[closest]]
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"data set layout not found: missing {' and '.join(missing)} "
        f"(looked for {', '.join(required)} in {where})"
    )


def pairs_from_split(
    image_dir: Path, label_dir: Path, split_file: Path, image_suffix: str, label_suffix: str
) -> list[tuple[Path, Path]]:
    """Pairs for the ids listed in a split file (one image id per line), in the file's order."""
    ids = [
        line.strip() for line in read_text(split_file, "split file").splitlines() if line.strip()
    ]
    pairs = [(image_dir / f"{i}{image_suffix}", label_dir / f"{i}{label_suffix}") for i in ids]
    _check_exist(pairs)
    return pairs


def pairs_from_scan(
    image_dir: Path, label_dir: Path, image_suffix: str, label_suffix: str
) -> list[tuple[Path, Path]]:
    """Pairs for every ``*image_suffix`` below ``image_dir`` (sub-folders kept), sorted by path."""
    images = sorted(image_dir.rglob(f"*{image_suffix}"))
    if not images:
        raise FileNotFoundError(f"no *{image_suffix} images below {image_dir}")
    pairs = []
    for image in images:
        relative = image.relative_to(image_dir)
        stem = relative.name[: -len(image_suffix)]
        pairs.append((image, label_dir / relative.parent / f"{stem}{label_suffix}"))
    _check_exist(pairs)
    return pairs


def _check_exist(pairs: Sequence[tuple[Path, Path]]) -> None:
    missing = [path for pair in pairs for path in pair if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} files missing, first: {missing[0]}")


def read_voc21(root: Path) -> DatasetReader:
    """PASCAL VOC 2012 val, 21 classes (0 = background, 255 = object boundary).

    ``VOCdevkit/VOC2012/``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG,
    index = class), ``ImageSets/Segmentation/val.txt``.
    """
    return DatasetReader("voc21", _voc_pairs(root))


def read_voc20(root: Path) -> DatasetReader:
    """PASCAL VOC 2012 val without background: 0 -> 255 (not scored), class k -> k - 1.

    Same files as :func:`read_voc21`.
    """
    return DatasetReader("voc20", _voc_pairs(root), reduce_zero_label_map())


def _voc_pairs(root: Path) -> list[tuple[Path, Path]]:
    split = "ImageSets/Segmentation/val.txt"
    base = find_root(
        root, ("JPEGImages", "SegmentationClass", split), ("VOCdevkit/VOC2012", "VOC2012")
    )
    return pairs_from_split(
        base / "JPEGImages", base / "SegmentationClass", base / split, ".jpg", ".png"
    )


def read_context60(root: Path) -> DatasetReader:
    """PASCAL Context val, 59 classes + background 0 (mmsegmentation's converted labels).

    ``VOCdevkit/VOC2010/``: ``JPEGImages/<id>.jpg``, ``SegmentationClassContext/<id>.png``
    (values 0..59, from mmsegmentation's ``tools/dataset_converters/pascal_context.py``),
    ``ImageSets/SegmentationContext/val.txt``.
    """
    return DatasetReader("context60", _context_pairs(root))


def read_context59(root: Path) -> DatasetReader:
    """PASCAL Context val without background: 0 -> 255, k -> k - 1; same files as context60."""
    return DatasetReader("context59", _context_pairs(root), reduce_zero_label_map())


def _context_pairs(root: Path) -> list[tuple[Path, Path]]:
    split = "ImageSets/SegmentationContext/val.txt"
    base = find_root(
        root,
        ("JPEGImages", "SegmentationClassContext", split),
        ("VOCdevkit/VOC2010", "VOC2010"),
    )
    return pairs_from_split(
        base / "JPEGImages", base / "SegmentationClassContext", base / split, ".jpg", ".png"
    )


def read_coco_stuff(root: Path) -> DatasetReader:
    """COCO-Stuff 164k val2017, 171 classes (mmsegmentation ``coco_stuff164k`` layout).

    ``coco_stuff164k/``: ``images/val2017/<id>.jpg`` and
    ``annotations/val2017/<id>_labelTrainIds.png`` (values 0..170, 255 = unlabeled, from
    mmsegmentation's ``coco_stuff164k.py`` converter).
    """
    base = _coco_root(root)
    return DatasetReader(
        "coco_stuff",
        pairs_from_scan(
            base / "images/val2017", base / "annotations/val2017", ".jpg", "_labelTrainIds.png"
        ),
    )


def read_coco_object(root: Path) -> DatasetReader:
    """COCO-Object val2017: background 0 + the 80 COCO things (as in SCLIP / NACLIP / GroupViT).

    ``coco_stuff164k/``: ``images/val2017/<id>.jpg`` and
    ``annotations/val2017/<id>_instanceTrainIds.png`` (made by ``cvt_coco_object.py``, values
    0..80). Without those files the COCO-Stuff
    ``<id>_labelTrainIds.png`` are converted on the fly, with the same result.
    """
    base = _coco_root(root)
    images, labels = base / "images/val2017", base / "annotations/val2017"
    if next(labels.glob("*_instanceTrainIds.png"), None) is not None:
        return DatasetReader(
            "coco_object", pairs_from_scan(images, labels, ".jpg", "_instanceTrainIds.png")
        )
    return DatasetReader(
        "coco_object",
        pairs_from_scan(images, labels, ".jpg", "_labelTrainIds.png"),
        coco_object_from_stuff_map(),
    )


def _coco_root(root: Path) -> Path:
    return find_root(root, ("images/val2017", "annotations/val2017"), ("coco_stuff164k",))


def read_cityscapes(root: Path) -> DatasetReader:
    """Cityscapes val, the 19 train classes (255 = void).

    ``cityscapes/``: ``leftImg8bit/val/<city>/<name>_leftImg8bit.png`` and
    ``gtFine/val/<city>/<name>_gtFine_labelTrainIds.png`` (made by cityscapesscripts'
    ``createTrainIdLabelImgs`` or mmsegmentation's ``cityscapes.py`` converter).
    """
    base = find_root(root, ("leftImg8bit/val", "gtFine/val"), ("cityscapes",))
    return DatasetReader(
        "cityscapes",
        pairs_from_scan(
            base / "leftImg8bit/val",
            base / "gtFine/val",
            "_leftImg8bit.png",
            "_gtFine_labelTrainIds.png",
        ),
    )


def read_ade20k(root: Path) -> DatasetReader:
    """ADE20K (SceneParsing) val, 150 classes: stored 1..150 -> 0..149, 0 ("other") -> 255.

    ``ADEChallengeData2016/``: ``images/validation/<id>.jpg``, ``annotations/validation/<id>.png``.
    """
    base = find_root(
        root, ("images/validation", "annotations/validation"), ("ADEChallengeData2016",)
    )
    return DatasetReader(
        "ade20k",
        pairs_from_scan(
            base / "images/validation", base / "annotations/validation", ".jpg", ".png"
        ),
        reduce_zero_label_map(),
    )


# The folder layout each reader above reads (``ovss-eval --help``, docs/tools.md): the folder
# given to ovss-eval (or a folder above it that holds it under the same name), its files relative
# to it, and what a label value means. ``<id>``, ``<city>``, ``<name>``: any file name part.
_VOC = (
    "VOCdevkit/VOC2012",
    (
        ("JPEGImages/<id>.jpg", "the images"),
        ("SegmentationClass/<id>.png", "labels, an index PNG (palette or grey)"),
        ("ImageSets/Segmentation/val.txt", "the <id>s scored, one a line"),
    ),
)
_CONTEXT = (
    "VOCdevkit/VOC2010",
    (
        ("JPEGImages/<id>.jpg", "the images"),
        ("SegmentationClassContext/<id>.png", "labels, a grey PNG (mmsegmentation's converter)"),
        ("ImageSets/SegmentationContext/val.txt", "the <id>s scored, one a line"),
    ),
)
_COCO = (
    "coco_stuff164k",
    (
        ("images/val2017/<id>.jpg", "the images, every one below the folder scored"),
        ("annotations/val2017/<id>_labelTrainIds.png", "labels, a grey PNG"),
    ),
)
_COCO_OBJECT = (
    _COCO[0],
    (
        _COCO[1][0],
        (
            "annotations/val2017/<id>_instanceTrainIds.png",
            "labels, a grey PNG from cvt_coco_object.py; without these files, COCO-Stuff's "
            "<id>_labelTrainIds.png, converted the same way",
        ),
    ),
)
_CITYSCAPES = (
    "cityscapes",
    (
        ("leftImg8bit/val/<city>/<name>_leftImg8bit.png", "the images, every one scored"),
        (
            "gtFine/val/<city>/<name>_gtFine_labelTrainIds.png",
            "labels, a grey PNG of train ids (cityscapesscripts' createTrainIdLabelImgs)",
        ),
    ),
)
_ADE = (
    "ADEChallengeData2016",
    (
        ("images/validation/<id>.jpg", "the images, every one scored"),
        ("annotations/validation/<id>.png", "labels, a grey PNG"),
    ),
)
# data set -> (folder, files, what a stored label value means)
LAYOUTS: dict[str, tuple[str, tuple[tuple[str, str], ...], str]] = {
    "voc21": (*_VOC, "0 background, k class k (1..20), 255 not scored (object edges)"),
    "context60": (*_CONTEXT, "0 background, k class k (1..59), 255 not scored"),
    "coco_object": (*_COCO_OBJECT, "0 background, k thing k (1..80)"),
    "voc20": (*_VOC, "k class k - 1 (1..20); 0 background and 255 not scored"),
    "context59": (*_CONTEXT, "k class k - 1 (1..59); 0 and 255 not scored"),
    "coco_stuff": (*_COCO, "k class k (0..170), 255 not scored"),
    "cityscapes": (*_CITYSCAPES, "k class k (0..18), 255 not scored"),
    "ade20k": (*_ADE, "k class k - 1 (1..150); 0 (other) and 255 not scored"),
}


def layout_text(indent: str = "  ") -> str:
    """Every data set's layout as plain text (``ovss-eval --help``): one block per data set,
    ``name: FOLDER/`` then each file below it (``path: what it holds``), then the label
    values."""
    blocks = []
    for name, (folder, files, values) in LAYOUTS.items():
        lines = [f"{name}: {folder}/"]
        lines += [f"{indent}{path}: {what}" for path, what in files]
        lines.append(f"{indent}label values: {values}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
