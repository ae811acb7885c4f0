"""``--protocol pnp_ovss``: PnP-OVSS evaluated as its release evaluates it.

From github.com/letitiabanana/PnP-OVSS (``PnP_OVSS_0514_updated_segmentation.py`` for VOC,
PASCAL Context and ADE20K, ``PnP_OVSS_0514_updated_segmentation_coco.py`` for COCO,
``Load_datasets.py``, ``Dataset.py``, ``Run_seg.sh``):

- class names: the release's lists (``pnp_ovss_<set>.txt``): VOC's ``aeroplane ... table ...
  pottedplant ... tvmonitor`` (``load_voc``), PASCAL Context's 59 (``load_psc``), ADE20K's and
  COCO's with spaces (and COCO's hyphens) removed (``load_ade20k``; the COCO script's
  ``nms[i] = "".join(...)``); ADE20K's classes 59 and 131 are both ``screen`` there, and a
  vocabulary needs distinct names: 59 is ``screendoor`` here (ADE's "screen door");
- classes in the prompt: the per-image class lists (``--presence-lists``, ``presence_lists``),
  or without them CLIP presence, ovss_ros's substitute;
- background channel (``pnp.background``): always on VOC and COCO-Object; on PASCAL Context,
  ADE20K and COCO-Stuff only when fewer than 3 classes are in the prompt (main ~446-455,
  ~468-480; COCO script ~446-490);
- round 0 summed twice (``pnp.round0: release``, main ~716-721), the BLIP input resized by
  torchvision ``Resize((336, 336), BICUBIC)`` on the PIL image (``pnp.resize: pil``,
  ``Dataset.py``);
- the argmax map relabelled as the release does: for i from the last prompt class to the first,
  pixels of channel value i (+1 with a background channel) get that class's data-set label,
  in place (``release_relabel``: a later step can relabel an earlier one's pixels when the
  prompt's class ids are out of order, as in the release);
- scoring (``release_scores``, the release's ``scores`` / ``Calculate_mIoU.py``): a background
  class is scored on every data set (label 0; VOC's 255 -> 0, ADE's "other" 0 kept, COCO-Stuff's
  unlabeled 255 -> 0; PASCAL Context's 255 is not scored), mIoU over the classes with ground
  truth. ovss-eval prints it beside the standard scoring (255 not scored, background only
  where the data set has it).

The release evaluates only these five data sets; ``pnp.round0`` defaults to ``release`` here and
to ``once`` on the robot (the node's parameter).
"""

from __future__ import annotations

import math
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ovss_ros.core.methods.pnp_ovss.presence_lists import PresenceLists, load_for_method
from ovss_ros.core.segmentation import Segmentation
from ovss_ros.evaluation.confusion_metrics import ConfusionMatrix
from ovss_ros.evaluation.dataset_readers import IGNORE, DatasetReader
from ovss_ros.evaluation.protocol import (
    METHOD_PROTOCOLS,
    DatasetProtocol,
    MethodProtocol,
    Settings,
    _table,
)

if TYPE_CHECKING:
    from ovss_ros.core.segmenter import Segmenter

# ovss-eval's data set -> the release's --data_type (its class-list file names)
RELEASE_SETS = {
    "voc21": "voc",
    "context60": "psc",
    "ade20k": "ade20k",
    "coco_object": "coco_object",
    "coco_stuff": "coco_stuff",
}
# The release's class-list file of each data set whose class ids are the release's (VOC20 and
# PASCAL Context 59: VOC's and PASCAL Context's classes without background, ids alike).
LIST_FILE_SETS = RELEASE_SETS | {"voc20": "voc", "context59": "psc"}
BACKGROUND_RULE = {
    "voc21": "always",
    "coco_object": "always",
    "context60": "fewer_than_3",
    "ade20k": "fewer_than_3",
    "coco_stuff": "fewer_than_3",
}
# Data sets whose not-scored pixels (255 here) the release scores as background.
IGNORE_AS_BACKGROUND = {"voc21", "ade20k", "coco_stuff", "coco_object"}
# COCO's category ids (instances_val2017 / stuff_val2017): the release's class ids on COCO.
_UNUSED_THING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_THING_IDS = tuple(i for i in range(1, 91) if i not in _UNUSED_THING_IDS)
COCO_STUFF_IDS = tuple(range(92, 183))
CATEGORY_IDS = {"coco_object": COCO_THING_IDS, "coco_stuff": COCO_THING_IDS + COCO_STUFF_IDS}

_RELEASE = Settings(336, 0, 0, 0.0, class_prefix="pnp_ovss_")
_OTHER = Settings(336, 0, 0, 0.0)

PNP_PROTOCOL = MethodProtocol(
    "pnp_ovss",
    "github.com/letitiabanana/PnP-OVSS: PnP_OVSS_0514_updated_segmentation.py, "
    "PnP_OVSS_0514_updated_segmentation_coco.py, Load_datasets.py, Dataset.py, Run_seg.sh",
    _table(
        voc21=_RELEASE,
        context60=_RELEASE,
        coco_object=_RELEASE,
        voc20=_OTHER,
        context59=_OTHER,
        coco_stuff=_RELEASE,
        cityscapes=_OTHER,
        ade20k=_RELEASE,
    ),
    engine={"method": "pnp_ovss", "pnp.round0": "release", "pnp.resize": "pil"},
    dataset_engine={name: {"pnp.background": rule} for name, rule in BACKGROUND_RULE.items()},
)
METHOD_PROTOCOLS["pnp_ovss"] = PNP_PROTOCOL


def check_release_set(dataset: str) -> None:
    """ValueError for a data set the release does not evaluate."""
    if dataset not in RELEASE_SETS:
        raise ValueError(
            f"--protocol pnp_ovss: the PnP-OVSS release evaluates {', '.join(RELEASE_SETS)}, "
            f"not {dataset}"
        )


def release_ids(dataset: str, present: Sequence[int]) -> list[int]:
    """The release's data-set label of each prompt class (vocabulary indices): the COCO
    category id on COCO, else the index + 1 (label 0 is the release's background)."""
    if dataset in CATEGORY_IDS:
        return [CATEGORY_IDS[dataset][i] for i in present]
    return [i + 1 for i in present]


def release_relabel(channels: np.ndarray, targets: Sequence[int], background: bool) -> np.ndarray:
    """The release's in-place relabelling of an argmax map (main ~449-455, COCO ~458-490).

    ``channels``: HxW argmax channel values (0 = background when ``background``), ``targets``:
    the data-set label of each prompt class. For i from the last class to the first, pixels
    equal to i (+1 with background) become targets[i], in place, as the release loops.
    """
    labels = channels.astype(np.int64)
    offset = 1 if background else 0
    for i in range(len(targets) - 1, -1, -1):
        labels[labels == i + offset] = targets[i]
    return labels


@dataclass(frozen=True)
class ReleaseLabels:
    """Maps the engine's labels to the release's label space (0 = background, vocabulary index
    k = k + 1; COCO via category ids and back) with the release's relabelling."""

    dataset: str
    num_classes: int

    def predict(
        self, labels: np.ndarray, unlabeled: int, present: Sequence[int], background: bool
    ) -> np.ndarray:
        """HxW engine labels (vocabulary indices, ``unlabeled``) -> release space (0..n)."""
        position = {c: k for k, c in enumerate(present)}
        channels = np.zeros(labels.shape, dtype=np.int64)
        offset = 1 if background else 0
        for vocabulary_index, k in position.items():
            channels[labels == vocabulary_index] = k + offset
        channels[labels == unlabeled] = 0
        released = release_relabel(channels, release_ids(self.dataset, present), background)
        if self.dataset not in CATEGORY_IDS:
            return released
        table = np.zeros(max(CATEGORY_IDS[self.dataset]) + 1, dtype=np.int64)
        table[list(CATEGORY_IDS[self.dataset])] = np.arange(1, self.num_classes + 1)
        return table[released]

    def truth(self, truth: np.ndarray, has_background: bool) -> np.ndarray:
        """Data-set labels (255 not scored) -> the release's ground truth in its label space."""
        labels = truth.astype(np.int64)
        ignored = labels == IGNORE
        if not has_background:
            labels = labels + 1
        labels[ignored] = 0 if self.dataset in IGNORE_AS_BACKGROUND else IGNORE
        return labels

    def standard(self, released: np.ndarray, has_background: bool) -> np.ndarray:
        """Release-space prediction -> the data set's labels for the standard scoring."""
        if has_background:
            return released
        labels = released - 1
        labels[released == 0] = self.num_classes  # background: "no prediction"
        return labels


def release_miou(confusion: ConfusionMatrix) -> dict[str, float]:
    """The release's ``scores``: mIoU (percent) over the classes with ground truth pixels,
    pixel accuracy (percent)."""
    iou = confusion.iou()
    valid = confusion.true_pixels > 0
    miou = float(np.nanmean(iou[valid])) if valid.any() else float("nan")
    return {"mIoU": 100 * miou, "aAcc": 100 * confusion.pixel_accuracy()}


class ReleaseRun:
    """A pnp_ovss ``Segmenter`` run as the release runs it, scored both ways.

    ``segment_file(rgb, path)``: the prompt classes from ``lists`` (the image file's stem) or
    CLIP presence, PnP-OVSS on them, the release's relabelling; the returned labels are engine
    labels for the standard scoring. ``observe(truth)`` adds the last image to ``confusion``, the
    release's scoring (``release_miou``).
    """

    def __init__(
        self,
        segmenter: Segmenter,
        dataset: str,
        has_background: bool,
        lists: PresenceLists | None = None,
    ) -> None:
        self.core = segmenter.pipeline.core
        self.num_classes = len(segmenter.classes)
        self.labels = ReleaseLabels(dataset, self.num_classes)
        self.has_background = has_background
        self.lists = lists
        self.category_ids = CATEGORY_IDS.get(dataset)
        self.confusion = ConfusionMatrix(self.num_classes + 1)
        self._released: np.ndarray | None = None

    def present(self, rgb: np.ndarray, image_id: str) -> list[int]:
        """The prompt's vocabulary indices for one image."""
        if self.lists is not None:
            return self.lists.vocabulary_indices(image_id, self.num_classes, self.category_ids)
        _, clip_pixels = self.core.preprocess(rgb)
        return self.core.present_classes(clip_pixels)

    def segment_file(self, rgb: np.ndarray, path: Path) -> Segmentation:
        """Segment one image (its file ``path`` names its class list)."""
        present = self.present(rgb, path.stem)
        segmentation = self.core.segment(rgb, present)
        background = self.core.settings.background == "always" or len(present) < 3
        released = self.labels.predict(
            segmentation.labels, segmentation.unlabeled, present, background
        )
        self._released = released
        engine = released - 1
        engine[released == 0] = segmentation.unlabeled
        return replace(segmentation, labels=engine.astype(segmentation.labels.dtype))

    def observe(self, truth: np.ndarray) -> None:
        """Score the last segmented image the release's way."""
        self.confusion.update(self.labels.truth(truth, self.has_background), self._released)


class ListedRun:
    """A pnp_ovss ``Segmenter`` prompted with each image's listed classes (``segment_file``),
    for protocols other than ``pnp_ovss``; scored the standard way only."""

    def __init__(
        self, segmenter: Segmenter, lists: PresenceLists, category_ids: Sequence[int] | None
    ) -> None:
        self.core, self.lists, self.category_ids = segmenter.pipeline.core, lists, category_ids
        self.num_classes = len(segmenter.classes)

    def segment_file(self, rgb: np.ndarray, path: Path) -> Segmentation:
        """Segment one image (its file ``path`` names its class list)."""
        present = self.lists.vocabulary_indices(path.stem, self.num_classes, self.category_ids)
        return self.core.segment(rgb, present)


def checked_lists(
    args: Namespace,
    method: str,
    protocol: DatasetProtocol,
    reader: DatasetReader,
    num_classes: int,
) -> PresenceLists | None:
    """--presence-lists read and checked before any model loads: an entry for every image to
    score, class ids within the data set's (PresenceListError, a ValueError, otherwise)."""
    lists = load_for_method(args.presence_lists, method, LIST_FILE_SETS.get(protocol.name))
    if lists is not None:
        count = len(reader.pairs) if args.limit is None else min(args.limit, len(reader.pairs))
        lists.check_images([image.stem for image, _ in reader.pairs[:count]])
        if protocol.name not in CATEGORY_IDS:
            lists.check_ids(num_classes)
    return lists


def release_report(run: object, lists_path: Path | None) -> dict[str, object]:
    """The PnP-OVSS release's scoring of the run and where its classes came from ({} for
    other runs); ``line`` is what is printed."""
    if not isinstance(run, ReleaseRun):
        return {}
    scores = release_miou(run.confusion)
    presence = str(lists_path) if run.lists is not None else "clip (ovss_ros's)"
    return {
        "line": f"release scoring (background scored, mean over classes with ground truth): "
        f"mIoU {scores['mIoU']:.2f}  aAcc {scores['aAcc']:.2f}; classes from {presence}",
        "release_scoring": {k: None if math.isnan(v) else v for k, v in scores.items()},
        "presence": presence,
    }
