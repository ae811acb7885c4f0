"""Seen/unseen class splits of the zero-shot benchmarks (the one place they are written down).

Zero-shot ("open-vocabulary") semantic segmentation in the ZegFormer / SimBaseline / DeOP line
trains on the *seen* classes only and scores every class of the data set; the papers report mIoU
over all classes, over the seen and over the unseen ones, and hIoU, the harmonic mean of the
last two (``ConfusionMatrix.split_summary``). ``ovss-eval`` reports them with the ``deop``
protocol or ``--seen-unseen``; ``ovss-train-deop`` holds the unseen classes out of training.

- COCO-Stuff 164k, 156 seen / 15 unseen, as DeOP's release defines it
  (github.com/CongHan0808/DeOP ``mask_former/data/datasets/register_coco_stuff.py``:
  ``COCO_NOVEL_CATEGORIES`` are the entries of ``COCO_CATEGORIES`` with
  ``c["id"] - 1 in [20, 24, 32, 33, 40, 56, 86, 99, 105, 123, 144, 147, 148, 168, 171]``, i.e.
  COCO ids 21, 25, 33, 34, 41, 57, 87, 100, 106, 124, 145, 148, 149, 169, 172, the same list
  as ``novel_clsID`` of ``datasets/prepare_coco_stuff_164k_sem_seg.py``; the test set
  ``coco_2017_test_stuff_sem_seg`` scores all 171 with ``evaluation_set["base"]`` = the others).
  Label values are the contiguous indices 0..170 of ``COCO_CATEGORIES`` (sorted by COCO id), the
  same as mmsegmentation's ``*_labelTrainIds.png`` that ``read_coco_stuff`` reads (DeOP's
  ``datasets/prepare_coco_stuff_164k_sem_seg.py`` uses the same id table).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class ClassSplit:
    """Which labels of one data set are unseen in training; the others are seen."""

    name: str
    dataset: str  # DatasetProtocol.name
    unseen: Mapping[int, str]  # label value -> class name (as the release names it)
    source: str  # the official file that defines the split

    def seen(self, num_classes: int) -> list[int]:
        """Label values 0..num_classes-1 that are not unseen."""
        return [label for label in range(num_classes) if label not in self.unseen]

    def to_dict(self, num_classes: int) -> dict[str, object]:
        """JSON-ready description (ovss-eval's report)."""
        return {
            "name": self.name,
            "seen": len(self.seen(num_classes)),
            "unseen": dict(self.unseen),
            "source": self.source,
        }


COCO_STUFF_156_15 = ClassSplit(
    "coco_stuff_156_15",
    "coco_stuff",
    MappingProxyType(
        {
            19: "cow",
            23: "giraffe",
            28: "suitcase",
            29: "frisbee",
            36: "skateboard",
            51: "carrot",
            76: "scissors",
            88: "cardboard",
            94: "clouds",
            112: "grass",
            133: "playingfield",
            136: "river",
            137: "road",
            157: "tree",
            160: "wall-concrete",
        }
    ),  # fmt: skip
    "github.com/CongHan0808/DeOP: mask_former/data/datasets/register_coco_stuff.py "
    "(COCO_NOVEL_CATEGORIES)",
)

# data set -> its split (ovss-eval refuses --seen-unseen on the others)
SPLITS: Mapping[str, ClassSplit] = MappingProxyType({COCO_STUFF_156_15.dataset: COCO_STUFF_156_15})

VOC_15_5 = ClassSplit(
    "voc_15_5",
    "voc20",
    MappingProxyType({15: "pottedplant", 16: "sheep", 17: "sofa", 18: "train", 19: "tvmonitor"}),
    "github.com/CongHan0808/DeOP: mask_former/data/datasets/register_voc_seg.py "
    "(NOVEL_CLASS_NAMES: CLASS_NAMES indices 15-19)",
)

# data set -> the seen classes of the release's two-stream ensemble on it: the data sets the
# release registers with a ``trainable_flag`` (its ``voc_sem_seg_test`` is voc20: the 20 VOC
# classes, background ignored); on every other data set it has none and every class is unseen.
# ovss-eval gives these to ``twostream.seen_classes``.
TRAINABLE_FLAGS: Mapping[str, ClassSplit] = MappingProxyType(
    {split.dataset: split for split in (COCO_STUFF_156_15, VOC_15_5)}
)


def seen_class_names(
    dataset: str, label_names: list[str], has_background: bool = False
) -> tuple[str, ...]:
    """The names of data set ``dataset``'s seen classes in the release's two-stream ensemble
    (its ``trainable_flag``, ``TRAINABLE_FLAGS``); () where the release has none (every class
    unseen). ``label_names``: the scored labels' names, label 0 background when
    ``has_background``. ValueError when a seen and an unseen class share a name (the setting,
    ``twostream.seen_classes``, names classes)."""
    split = TRAINABLE_FLAGS.get(dataset)
    if split is None:
        return ()
    first = 1 if has_background else 0
    seen = [label_names[label] for label in split.seen(len(label_names)) if label >= first]
    clash = sorted({label_names[label] for label in split.unseen} & set(seen))
    if clash:
        raise ValueError(
            f"the class names {clash} name both a seen and an unseen class of the "
            f"{split.name} split: the two-stream ensemble needs them apart"
        )
    return tuple(seen)
