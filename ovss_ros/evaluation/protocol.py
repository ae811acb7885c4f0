"""The standard evaluation protocol of training-free CLIP segmentation, one row per data set.

The settings are those of NACLIP's released configs (github.com/sinahmr/NACLIP, v2), the numbers
in docs/methods.md are measured with: the short side resized to 336 (Cityscapes 560), sliding
windows of 224 with stride 112 except on VOC, where NACLIP v2 runs the whole image in one forward,
softmax temperature 40, and a probability threshold of 0.1 on the three data sets that score a
background class. The class-name files in ``ovss_ros/data/class_names`` are NACLIP's, with
synonyms separated by ';' as everywhere in ovss_ros.

Background: in VOC21, PASCAL Context 60 and COCO-Object label 0 is "background", which is not a
thing CLIP can be asked about by name. Line 0 of those class files therefore lists background
*words* (VOC21 / COCO-Object: sky, wall, tree, ...; Context 60: just "background"), which go to
the engine as ``background_words``; the other lines are the classes. The engine calls a pixel
unlabeled when a background word beats every class or the best class is below the threshold,
which is exactly NACLIP's "argmax over background + classes, then 0 where max prob < 0.1", so
unlabeled is scored as label 0 and engine label k as data-set label k + 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ovss_ros.core.vocabulary import ClassEntry
from ovss_ros.evaluation.dataset_readers import (
    DatasetReader,
    read_ade20k,
    read_cityscapes,
    read_coco_object,
    read_coco_stuff,
    read_context59,
    read_context60,
    read_voc20,
    read_voc21,
)

BACKGROUND_NAME = "background"


@dataclass(frozen=True)
class DatasetProtocol:
    """How one benchmark is read and which engine settings the published numbers used."""

    name: str
    title: str
    read: Callable[[Path], DatasetReader]
    has_background: bool  # label 0 is background; line 0 of the class file holds its words
    short_side: int
    crop: int  # 0: the whole image in one forward
    stride: int
    threshold: float  # pixels whose best class probability is below are background

    @property
    def class_file(self) -> str:
        """File name in ovss_ros/data/class_names."""
        return f"{self.name}.txt"


# In the order of the papers' result tables (the data sets with a background class first).
PROTOCOLS: dict[str, DatasetProtocol] = {
    row[0]: DatasetProtocol(*row)
    for row in (
        # name         title                    reader            background short crop stride thd
        ("voc21",       "PASCAL VOC 2012 (21)",  read_voc21,       True,  336, 0,   0,   0.1),
        ("context60",   "PASCAL Context (60)",   read_context60,   True,  336, 224, 112, 0.1),
        ("coco_object", "COCO-Object (81)",      read_coco_object, True,  336, 224, 112, 0.1),
        ("voc20",       "PASCAL VOC 2012 (20)",  read_voc20,       False, 336, 0,   0,   0.0),
        ("context59",   "PASCAL Context (59)",   read_context59,   False, 336, 224, 112, 0.0),
        ("coco_stuff",  "COCO-Stuff 164k (171)", read_coco_stuff,  False, 336, 224, 112, 0.0),
        ("cityscapes",  "Cityscapes (19)",       read_cityscapes,  False, 560, 224, 112, 0.0),
        ("ade20k",      "ADE20K (150)",          read_ade20k,      False, 336, 224, 112, 0.0),
    )
}  # fmt: skip

ALIASES = {
    "voc": "voc21",
    "pc60": "context60",
    "pc59": "context59",
    "coco_stuff164k": "coco_stuff",
    "city_scapes": "cityscapes",
    "ade": "ade20k",
}


def get_protocol(name: str) -> DatasetProtocol:
    """Protocol by name or common alias (``pc59``, ``ade``, ...), case and '-' insensitive."""
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in PROTOCOLS:
        raise ValueError(f"unknown data set {name!r}: use one of {list(PROTOCOLS)}")
    return PROTOCOLS[key]


@dataclass(frozen=True)
class EvaluationVocabulary:
    """What the engine is asked (classes, background words) and the names of the scored labels."""

    classes: list[str]  # engine vocabulary entries ("name; synonym; ...")
    background_words: tuple[str, ...]
    label_names: list[str]  # data-set label index -> name (with "background" at 0 if any)
    has_background: bool


def class_lines(text: str) -> list[str]:
    """Non-empty lines of a class-name file: one class per line, synonyms separated by ';'."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def builtin_class_file(file_name: str) -> str:
    """Text of a class-name file shipped in ovss_ros/data/class_names."""
    return resources.files("ovss_ros").joinpath("data", "class_names", file_name).read_text()


def load_vocabulary(
    protocol: DatasetProtocol, class_file: Path | None = None
) -> EvaluationVocabulary:
    """The protocol's vocabulary, or the one in ``class_file`` (same format, same line count).

    A replacement file may change the words (prompt engineering) but not the number or order of
    the classes, because line i must still name label i of the ground truth.
    """
    lines = class_lines(builtin_class_file(protocol.class_file))
    if class_file is not None:
        custom = class_lines(Path(class_file).read_text())
        if len(custom) != len(lines):
            first = "background words, then " if protocol.has_background else ""
            raise ValueError(
                f"{class_file} has {len(custom)} lines; {protocol.name} needs {len(lines)} "
                f"({first}one class per label in label order)"
            )
        lines = custom
    if protocol.has_background:
        background_words = ClassEntry.parse(lines[0]).synonyms
        classes = lines[1:]
        names = [BACKGROUND_NAME] + [ClassEntry.parse(line).name for line in classes]
    else:
        background_words, classes = (), lines
        names = [ClassEntry.parse(line).name for line in classes]
    return EvaluationVocabulary(classes, background_words, names, protocol.has_background)
