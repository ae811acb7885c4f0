"""Benchmark protocols of ovss-eval: the data sets, and each method's official settings on them.

A data set (``DatasetProtocol``) says how the benchmark is read and whether label 0 is
background. A method protocol (``MethodProtocol``) holds, per data set, the engine settings of a
method's released test configs: resize short side, sliding window, probability threshold,
softmax temperature, SCLIP's area threshold, PAMR, and the class-name file. Published numbers
can only be reproduced with these and the official conventions the engine defaults to
(docs/methods.md). ``ovss-eval`` picks the method's own protocol unless ``--protocol``
names another; flags override single settings.

- ``naclip``: github.com/sinahmr/NACLIP (v2) ``configs/cfg_<set>.py``, defaults of
  ``naclip.py`` (logit scale 40, 224/112 windows, PAMR 10 iterations at dilations 8/16, which
  ``test_all.sh ... on`` uses for the README's main results).
- ``sclip``: github.com/wangf3014/SCLIP ``configs/cfg_<set>.py``, defaults of
  ``clip_segmentor.py`` (logit scale 40, 224/112 windows, no PAMR, ``area_thd`` None).
- ``clearclip``: github.com/mc-lan/ClearCLIP ``configs/cfg_<set>.py``, defaults of
  ``clearclip_segmentor.py`` (logit scale 50, 448/224 windows), its own class-name files for
  VOC and COCO-Object (``clearclip_<set>.txt``).
- ``freecp``: github.com/chenqi1126/FreeCP ``configs/cfg_<set>.py``, ``configs/cls_<set>.txt``,
  defaults of ``freecp_segmentor.py``: resize short side 448 (Cityscapes 560), 384/112
  windows (Cityscapes 224/112), no probability threshold, refinement ``freecp`` with the
  per-data-set thresholds of ``refine.freecp.DATASET_THRESHOLDS``, and FreeCP's own base
  variants (``base_variants``: ``--method sclip`` runs ``sclip_freecp``, the attention output
  plus FFN without the residual of FreeCP's ``forward_all``, which its "SCLIP + FreeCP"
  numbers use). Where no class survives in any window over a pixel of a data set without
  background, the official argmax of all-zero scores gives the first class; the engine calls
  such pixels unlabeled, and ovss-eval scores them as the first class (``empty_as_first``).
- ``standard``: the data-set settings NACLIP and SCLIP share, without any method's tuning or
  post-processing (NACLIP's table without PAMR); for methods without a protocol of their own.
- ``dslo``: DSLO's published configuration (``DSLO_PAPER``, the same as the node params file
  ``config/dslo_paper.yaml``: vanilla CLIP logits, DSLO velocity on the Stable Diffusion 2
  affinity, JBU) on the ``standard`` data-set settings: DSLO's code and configs are not public,
  so its resize, windows and thresholds are not known; ``standard`` is what the methods it
  compares with share.
- ``deop``: DeOP as released (github.com/CongHan0808/DeOP, ``scripts/deop_verifycoco.sh``, its
  only evaluation, on ``configs/coco-stuff-164k-156/..._featupsample_img512.yaml``): COCO-Stuff
  164k val2017, all 171 classes by the names of ``register_coco_stuff.py`` (``stuff_classes``,
  stripped, no background word), argmax over the classes (threshold 0), ignore label 255, the
  whole image at short side 512 (``INPUT.MIN_SIZE_TEST 512``; the published model applies it
  itself); the 156/15 seen/unseen split reported (``class_splits``). DeOP's code evaluates no
  other data set (its cross-data-set yamls configure SimBaseline's model), so there the
  protocol is ``standard``'s thresholds and class names at short side 512, whole image.

- ``pnp_ovss``: PnP-OVSS as released (its class names, background rule, round-0 sum, resize,
  relabelling and scoring), defined and registered in ``pnp_release``.

All three official repositories evaluate OpenAI's ViT-B/16 (QuickGELU), so that is every
protocol's model. The class-name files in ``ovss_ros/data/class_names`` are the repositories'
(NACLIP's and SCLIP's are identical), with synonyms separated by ';' as everywhere in ovss_ros.

Background: in VOC21, PASCAL Context 60 and COCO-Object label 0 is "background", which is not a
thing CLIP can be asked about by name. Line 0 of those class files therefore lists background
*words* (VOC21 / COCO-Object: sky, wall, tree, ...; Context 60 and ClearCLIP's files: just
"background"), which go to the engine as ``background_words``; the other lines are the classes.
The engine calls a pixel unlabeled when a background word is at least as probable as every
class or the best class is below the threshold, which is exactly the official "argmax over
background + classes (background first: it wins ties), then 0 where max prob < prob_thd", so
unlabeled is scored as label 0 and engine label k as data-set label k + 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from ovss_ros.core.file_checks import read_text
from ovss_ros.core.methods.dense.settings import FREECP_VARIANTS
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
    """How one benchmark is read; the engine settings come from a ``MethodProtocol``."""

    name: str
    title: str
    read: Callable[[Path], DatasetReader]
    has_background: bool  # label 0 is background; line 0 of the class file holds its words

    @property
    def class_file(self) -> str:
        """File name in ovss_ros/data/class_names (the shared NACLIP/SCLIP names)."""
        return f"{self.name}.txt"


# In the order of the papers' result tables (the data sets with a background class first).
PROTOCOLS: dict[str, DatasetProtocol] = {
    row[0]: DatasetProtocol(*row)
    for row in (
        # name         title                    reader            background
        ("voc21",       "PASCAL VOC 2012 (21)",  read_voc21,       True),
        ("context60",   "PASCAL Context (60)",   read_context60,   True),
        ("coco_object", "COCO-Object (81)",      read_coco_object, True),
        ("voc20",       "PASCAL VOC 2012 (20)",  read_voc20,       False),
        ("context59",   "PASCAL Context (59)",   read_context59,   False),
        ("coco_stuff",  "COCO-Stuff 164k (171)", read_coco_stuff,  False),
        ("cityscapes",  "Cityscapes (19)",       read_cityscapes,  False),
        ("ade20k",      "ADE20K (150)",          read_ade20k,      False),
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
    """Data set by name or common alias (``pc59``, ``ade``, ...), case and '-' insensitive."""
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in PROTOCOLS:
        raise ValueError(f"unknown data set {name!r}: use one of {list(PROTOCOLS)}")
    return PROTOCOLS[key]


@dataclass(frozen=True)
class Settings:
    """Engine settings of one method's official config on one data set."""

    short_side: int  # Resize(scale=(2048, short_side), keep_ratio=True)
    crop: int  # slide_crop; 0: the whole image in one forward
    stride: int  # slide_stride
    threshold: float  # prob_thd: pixels whose best class probability is below are background
    logit_scale: float = 40.0
    area_threshold: float = 0.0  # SCLIP's area_thd (0: off)
    pamr: bool = False
    class_prefix: str = ""  # the method's own class-name files: <prefix><set>.txt

    def class_file(self, dataset: DatasetProtocol) -> str:
        return f"{self.class_prefix}{dataset.class_file}"

    def engine(self) -> dict[str, object]:
        """These settings by the engine's full setting names (``EngineConfig.from_flat``)."""
        return {
            "short_side": self.short_side,
            "dense.crop": self.crop,
            "dense.stride": self.stride,
            "score_threshold": self.threshold,
            "dense.logit_scale": self.logit_scale,
            "dense.area_threshold": self.area_threshold,
            "dense.pamr": self.pamr,
        }


@dataclass(frozen=True)
class MethodProtocol:
    """A method's official evaluation settings per data set, and where they come from."""

    name: str
    source: str  # repository and files the settings are read from
    settings: dict[str, Settings]
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    refinement: str = "none"  # the refinement the method's code runs after the base method
    # --method -> the variant the method's code runs instead (FreeCP's forward_all bases)
    base_variants: dict[str, str] = field(default_factory=dict)
    # score unlabeled pixels as the first class on data sets without background: the official
    # argmax where every class score is 0 (FreeCP: no class survived purification)
    empty_as_first: bool = False
    # engine settings of the method itself (full setting names), the same on every data set
    engine: Mapping[str, object] = field(default_factory=dict)
    # report mIoU seen / unseen / hIoU on data sets with a split (class_splits.SPLITS)
    class_splits: bool = False
    # engine settings of the method that differ per data set: data set -> {setting: value}
    dataset_engine: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    def for_dataset(self, dataset: DatasetProtocol) -> Settings:
        return self.settings[dataset.name]


def _table(**rows: Settings) -> dict[str, Settings]:
    if set(rows) != set(PROTOCOLS):
        raise ValueError(f"a protocol needs a row for every data set: {sorted(PROTOCOLS)}")
    return rows


_SLIDE = {"crop": 224, "stride": 112}
_NACLIP = {**_SLIDE, "pamr": True}
_CLEARCLIP = {"short_side": 448, "crop": 448, "stride": 224, "logit_scale": 50.0}
_FREECP = {"short_side": 448, "crop": 384, "stride": 112, "threshold": 0.0}

# DSLO as published (arXiv 2604.07723, CVPR 2026): what config/dslo_paper.yaml sets (a test
# keeps the two equal); docs/methods.md, DSLO, says what is the paper's and ours.
DSLO_PAPER: Mapping[str, object] = MappingProxyType(
    {
        "model": "ViT-B-16-quickgelu",  # OpenAI CLIP ViT-B/16 (QuickGELU)
        "pretrained": "openai",
        "method": "vanilla",  # the paper's base logits: CLIP unchanged
        "refinement": "dslo",
        "dslo.mode": "velocity",
        "dslo.affinity": "sd2",
        "dense.upsample": "jbu",
        "dslo.ipf_rounds": 15,
        "dslo.velocity_tau": 0.3,
        "dslo.sinkhorn_iterations": 50,
        "dslo.sinkhorn_epsilon": 0.1,
        "dslo.sd.model": "stabilityai/stable-diffusion-2-1-base",
        "dslo.sd.precision": "auto",
        "dslo.sd.size": 512,
        "dslo.sd.timestep": 100,
        "dslo.sd.noise": False,
        "dslo.sd.layers": "m2n2",
        "dslo.sd.temperature": 1.0,
    }
)

METHOD_PROTOCOLS: dict[str, MethodProtocol] = {
    "naclip": MethodProtocol(
        "naclip",
        "github.com/sinahmr/NACLIP: configs/cfg_<set>.py, naclip.py, test_all.sh",
        _table(
            voc21=Settings(336, 0, 0, 0.1, pamr=True),
            context60=Settings(336, threshold=0.1, **_NACLIP),
            coco_object=Settings(336, threshold=0.1, **_NACLIP),
            voc20=Settings(336, 0, 0, 0.0, pamr=True),
            context59=Settings(336, threshold=0.0, **_NACLIP),
            coco_stuff=Settings(336, threshold=0.0, **_NACLIP),
            cityscapes=Settings(560, threshold=0.0, **_NACLIP),
            ade20k=Settings(336, threshold=0.0, **_NACLIP),
        ),
    ),
    "sclip": MethodProtocol(
        "sclip",
        "github.com/wangf3014/SCLIP: configs/cfg_<set>.py, clip_segmentor.py",
        _table(
            voc21=Settings(336, threshold=0.1, logit_scale=65.0, area_threshold=0.1, **_SLIDE),
            context60=Settings(336, threshold=0.1, logit_scale=50.0, **_SLIDE),
            coco_object=Settings(336, threshold=0.1, logit_scale=50.0, **_SLIDE),
            voc20=Settings(336, threshold=0.0, **_SLIDE),
            context59=Settings(336, threshold=0.0, **_SLIDE),
            coco_stuff=Settings(448, threshold=0.0, **_SLIDE),  # cfg_coco_stuff164k.py
            cityscapes=Settings(560, threshold=0.0, **_SLIDE),
            ade20k=Settings(336, threshold=0.0, **_SLIDE),
        ),
    ),
    "clearclip": MethodProtocol(
        "clearclip",
        "github.com/mc-lan/ClearCLIP: configs/cfg_<set>.py, configs/cls_<set>.txt, "
        "clearclip_segmentor.py",
        _table(
            voc21=Settings(threshold=0.5, class_prefix="clearclip_", **_CLEARCLIP),
            context60=Settings(threshold=0.15, **_CLEARCLIP),
            coco_object=Settings(threshold=0.4, class_prefix="clearclip_", **_CLEARCLIP),
            voc20=Settings(threshold=0.0, class_prefix="clearclip_", **_CLEARCLIP),
            context59=Settings(threshold=0.0, **_CLEARCLIP),
            coco_stuff=Settings(threshold=0.0, **_CLEARCLIP),
            cityscapes=Settings(threshold=0.0, **{**_CLEARCLIP, "crop": 224}),  # stride 224
            ade20k=Settings(threshold=0.0, **_CLEARCLIP),
        ),
    ),
    "freecp": MethodProtocol(
        "freecp",
        "github.com/chenqi1126/FreeCP: configs/cfg_<set>.py, configs/cls_<set>.txt, "
        "freecp_segmentor.py, open_clip/transformer.py (forward_all)",
        _table(
            voc21=Settings(class_prefix="freecp_", **_FREECP),
            context60=Settings(**_FREECP),
            coco_object=Settings(class_prefix="freecp_", **_FREECP),
            voc20=Settings(class_prefix="freecp_", **_FREECP),
            context59=Settings(**_FREECP),
            coco_stuff=Settings(**_FREECP),
            cityscapes=Settings(**{**_FREECP, "short_side": 560, "crop": 224}),
            ade20k=Settings(**_FREECP),
        ),
        refinement="freecp",
        base_variants=dict((base, variant) for variant, base in FREECP_VARIANTS.items()),
        empty_as_first=True,
    ),
    "standard": MethodProtocol(
        "standard",
        "NACLIP's configs without PAMR (the data-set settings it shares with SCLIP)",
        _table(
            voc21=Settings(336, 0, 0, 0.1),
            context60=Settings(336, threshold=0.1, **_SLIDE),
            coco_object=Settings(336, threshold=0.1, **_SLIDE),
            voc20=Settings(336, 0, 0, 0.0),
            context59=Settings(336, threshold=0.0, **_SLIDE),
            coco_stuff=Settings(336, threshold=0.0, **_SLIDE),
            cityscapes=Settings(560, threshold=0.0, **_SLIDE),
            ade20k=Settings(336, threshold=0.0, **_SLIDE),
        ),
    ),
}
METHOD_PROTOCOLS["dslo"] = MethodProtocol(
    "dslo",
    "DSLO (arXiv 2604.07723): config/dslo_paper.yaml on the standard protocol's data-set "
    "settings (DSLO's own are not public)",
    METHOD_PROTOCOLS["standard"].settings,
    model=str(DSLO_PAPER["model"]),
    pretrained=str(DSLO_PAPER["pretrained"]),
    engine={k: v for k, v in DSLO_PAPER.items() if k not in ("model", "pretrained")},
)
METHOD_PROTOCOLS["deop"] = MethodProtocol(
    "deop",
    "github.com/CongHan0808/DeOP: scripts/deop_verifycoco.sh, configs/coco-stuff-164k-156/"
    "zero_shot_maskformer_R101c_bs32_60k_proposalmask_featupsample_img512.yaml, "
    "mask_former/data/datasets/register_coco_stuff.py, "
    "mask_former/evaluation/generalized_sem_seg_evaluation.py (COCO-Stuff; the other data sets: "
    "the standard protocol's thresholds and class names at short side 512, DeOP's code has no "
    "evaluation of them)",
    {
        name: replace(standard, short_side=512, crop=0, stride=0)
        for name, standard in METHOD_PROTOCOLS["standard"].settings.items()
    }
    | {"coco_stuff": Settings(512, 0, 0, 0.0, class_prefix="deop_")},
    class_splits=True,
)

# The protocol of a method's own code; methods without one get the standard one.
# maskclip_reduced is ClearCLIP's "MaskCLIP" ablation, evaluated with ClearCLIP's code.
DEFAULT_PROTOCOL = {
    "naclip": "naclip",
    "sclip": "sclip",
    "clearclip": "clearclip",
    "maskclip_reduced": "clearclip",
    "maskclip": "standard",
    "vanilla": "standard",
    **dict.fromkeys(FREECP_VARIANTS, "freecp"),
    "deop": "deop",
}


def method_protocol(name: str | None, method: str) -> MethodProtocol:
    """Protocol ``name``, or ``method``'s own when None; raises ValueError for unknown ones."""
    key = DEFAULT_PROTOCOL.get(method, "standard") if name is None else name.lower()
    if key not in METHOD_PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: use one of {list(METHOD_PROTOCOLS)}")
    return METHOD_PROTOCOLS[key]


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
    protocol: DatasetProtocol,
    class_file: Path | None = None,
    builtin: str | None = None,
) -> EvaluationVocabulary:
    """The data set's vocabulary from the built-in file ``builtin`` (default: the shared one,
    ``protocol.class_file``), or the one in ``class_file`` (same format, same line count).

    A replacement file may change the words (prompt engineering) but not the number or order of
    the classes, because line i must still name label i of the ground truth.
    """
    lines = class_lines(builtin_class_file(builtin or protocol.class_file))
    if class_file is not None:
        custom = class_lines(read_text(class_file, "class names file"))
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
