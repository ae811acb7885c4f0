"""EngineConfig: every setting that decides how a frame is segmented, as one tree.

The top level holds the shared settings (model, method, templates, frame size...); each method
family's settings are a nested group named after it (``dense``, ``dslo`` with ``dslo.sd``,
``freecp``, ``pnp``, ``deop``, ``twostream``, ``superpixel_clip``), defined in the family's
``settings.py``. The tree is the parameter tree: ``EngineConfig().dslo.sd.size`` is the
parameter ``dslo.sd.size``.
``SCHEMA`` lists them all (``settings.parameters``); ``RENAMED`` is the one place that knows the
flat names of earlier releases. No torch here: settings are checked before a model loads.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from ovss_ros.core.clip.templates import check_templates
from ovss_ros.core.frame_budget import (
    MAX_LONG_SIDE_LIMIT,
    check_affinity,
    check_proposal_masks,
    frame_grid,
)
from ovss_ros.core.methods.dense.settings import LAST_BLOCK_MODES, DenseSettings
from ovss_ros.core.methods.deop.settings import (
    DeopSettings,
    SuperpixelClipSettings,
    TwoStreamSettings,
    check_proposal_method,
)
from ovss_ros.core.methods.dslo.settings import DsloSettings
from ovss_ros.core.methods.freecp.settings import FreecpSettings
from ovss_ros.core.methods.pnp_ovss.settings import PnpSettings
from ovss_ros.core.settings import Settings, flat, group, parameters, replaced, setting
from ovss_ros.core.vocabulary import check_background_words

# Methods with their own pipeline (ovss_ros.core.method_pipelines): PnP-OVSS, DeOP, the
# two-stream baseline and superpixel_clip (DeOP's severed block on superpixels, training-free);
# the rest are the dense family's last-block modes.
PIPELINE_METHODS = ("pnp_ovss", "deop", "twostream", "superpixel_clip")
# The methods that classify mask proposals (deop.* settings): the deop family.
PROPOSAL_METHODS = ("deop", "twostream", "superpixel_clip")
METHODS = (*LAST_BLOCK_MODES, *PIPELINE_METHODS)
REFINEMENTS = ("none", "dslo", "freecp")
PRECISIONS = ("fp32", "fp16", "bf16")
# Sliding windows per frame, counted for a frame at the size bounds: every window is one more
# image in the forward batch. The official protocols need at most 72 (Cityscapes: 560 x 2048,
# 224/112); 224/112 windows on a kept-size 2048 x 2048 frame need 324. A stride of a few
# pixels, or a one-patch crop, would need thousands: refused.
MAX_WINDOWS = 512
# The dense family's settings that would do nothing under a pipeline method: refused unless off.
DENSE_ONLY = {
    "refinement": "none",
    "dense.pamr": False,
    "dense.upsample": "bilinear",
    "dense.area_threshold": 0.0,
    "dense.crop": 0,
}


@dataclass(frozen=True)
class EngineConfig(Settings):
    """Everything that decides how a frame is segmented: the shared settings, then each
    family's (node parameters and tool flags are made from these fields).

    The defaults follow the official NACLIP / SCLIP / ClearCLIP code wherever ovss_ros could
    differ from it (docs/methods.md): mmcv's resize size and OpenCV's bilinear resize of
    the uint8 image, the method's own positional-grid rule, logits upsampled to the resized
    image and then to the input, PAMR at the input size.
    """

    namespace: ClassVar[str] = ""

    model: str = setting(
        "ViT-B-16",
        "open_clip model name (e.g. ViT-B-16) or path to an open_clip model-config JSON",
        runtime=False,
        source="NACLIP/SCLIP/ClearCLIP (ViT-B/16)",
    )
    pretrained: str = setting(
        "laion2b_s34b_b88k",
        "open_clip pretrained tag, a local checkpoint file, or 'none' (random weights)",
        runtime=False,
        source="ovss_ros (LAION ViT-B-16 works as well as OpenAI's and needs no QuickGELU)",
    )
    device: str = setting(
        "auto",
        "inference device: auto picks CUDA when present",
        runtime=False,
        constraints="auto | cpu | cuda | cuda:N",
        source="ovss_ros",
    )
    precision: str = setting(
        "fp32",
        "weights and activations precision; half precision on a GPU only",
        runtime=False,
        choices=PRECISIONS,
        source="ovss_ros",
    )
    method: str = setting(
        "naclip",
        "dense CLIP last-block attention (naclip ... vanilla, FreeCP's *_freecp variants), or a "
        "method with its own pipeline: pnp_ovss (BLIP cross-attention GradCAM; a gradient pass "
        "per dropout round, not camera rate), deop (a trained proposal network's masks "
        "classified from one CLIP pass; needs deop.checkpoint), twostream (one CLIP pass per "
        "proposal crop), superpixel_clip (training-free: superpixels, DeOP's severed last "
        "block, mean pooling); switching to pnp_ovss loads the VLM, to deop/twostream the "
        "deop.checkpoint, beside the frames (which keep the old method until the switch): "
        "a failed load keeps the old method",
        choices=METHODS,
        source="ovss_ros (NACLIP: the best training-free dense method)",
    )
    refinement: str = setting(
        "none",
        "how labels are decided after a dense method: none (argmax), dslo, freecp",
        choices=REFINEMENTS,
        source="ovss_ros",
    )
    templates: str = setting(
        "imagenet",
        "prompt templates: imagenet (80), single ('a photo of a {}.'), or custom joined by '|'",
        constraints="imagenet | single | 'template with {}|...'",
        source="NACLIP/SCLIP (the 80 OpenAI ImageNet templates)",
    )
    background_words: tuple[str, ...] = setting(
        (),
        "texts that mean 'none of the classes' (e.g. sky, wall); pixels they win are unlabeled",
        source="ovss_ros",
    )
    score_threshold: float = setting(
        0.0,
        "pixels whose best class probability is below this are unlabeled (255)",
        minimum=0.0,
        maximum=1.0,
        source="ovss_ros (the standard protocol: 0.1 on VOC21/Context60/COCO-Object)",
    )
    short_side: int = setting(
        448,
        "resize the input so its short side has this many pixels before inference (0 = keep)",
        minimum=0,
        maximum=MAX_LONG_SIDE_LIMIT,
        unit="pixels",
        source="ClearCLIP (448); NACLIP/SCLIP: 336",
    )
    max_long_side: int = setting(
        2048,
        "bound on the network input's long side in pixels, whatever the frame's aspect ratio "
        "(a wide or tall strip is scaled down to it), so the patch count stays bounded",
        minimum=1,
        maximum=MAX_LONG_SIDE_LIMIT,
        unit="pixels",
        constraints="at least one patch of the model",
        source="the long edge of the official test resize (2048)",
    )
    dense: DenseSettings = group(DenseSettings)
    dslo: DsloSettings = group(DsloSettings)
    freecp: FreecpSettings = group(FreecpSettings)
    pnp: PnpSettings = group(PnpSettings)
    deop: DeopSettings = group(DeopSettings)
    twostream: TwoStreamSettings = group(TwoStreamSettings)
    superpixel_clip: SuperpixelClipSettings = group(SuperpixelClipSettings)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> EngineConfig:
        """The defaults with ``values`` (full dotted names: ``method``, ``pnp.layer``); not
        validated. ValueError for a name that is no setting (with the new name of an old one)."""
        return cls().replace(values)

    def replace(self, changes: Mapping[str, Any]) -> EngineConfig:
        """This config with ``changes`` (full dotted names); not validated. ValueError for a
        name that is no setting: ``crop was renamed dense.crop``."""
        for name in changes:
            if name not in NAMES:
                raise ValueError(unknown_setting(name))
        return replaced(self, changes)

    def flat(self) -> dict[str, Any]:
        """Full dotted name -> value of every setting."""
        return flat(self)

    def check(self) -> None:
        """The rules across families (after every value's own range): sliding windows per
        frame, the area filter only on the base method, background words, templates, the
        per-frame budget of the model named when its patch is known, and what a pipeline
        method refuses. ValueError."""
        if self.max_windows() > MAX_WINDOWS:
            raise ValueError(
                f"dense.crop {self.dense.crop} with dense.stride "
                f"{self.dense.stride or self.dense.crop // 2} needs up to {self.max_windows()} "
                f"sliding windows per frame (short side {self.short_side}, long side up to "
                f"{self.max_long_side}); at most {MAX_WINDOWS}: use a larger crop or stride"
            )
        if self.dense.area_threshold and self.refinement != "none":
            raise ValueError(
                f"dense.area_threshold applies to the base method's labels, not to refinement "
                f"{self.refinement!r}: set dense.area_threshold to 0 or refinement to none"
            )
        check_background_words(self.background_words)
        check_templates(self.templates)
        if not self.dslo.sd.model.strip():
            raise ValueError(
                "dslo.sd.model must name a Stable Diffusion model: a Hugging Face hub id "
                f"(e.g. {type(self.dslo.sd)().model}) or a local save_pretrained directory"
            )
        patch = known_patch(self.model)
        if patch is not None:  # else Segmenter.check_config checks it with the loaded model
            check_frame_budget(self, patch)
        check_pipeline(self)

    @property
    def uses_sd2(self) -> bool:
        """Whether these settings need the Stable Diffusion model (DSLO on the sd2 affinity)."""
        return self.refinement == "dslo" and self.dslo.affinity == "sd2"

    def sd2_settings(self) -> dict[str, object]:
        """The settings ``Sd2Attention`` takes (constructor, ``check``, ``reconfigure``)."""
        values = asdict(self.dslo.sd)
        del values["model"], values["precision"]
        return values

    def sd2_key(self) -> tuple[str, str]:
        """What chooses the SD model (``dslo.sd.model``, ``.precision``): a change loads it."""
        return (self.dslo.sd.model, self.dslo.sd.precision)

    def max_windows(self) -> int:
        """Sliding windows of the largest frame the size bounds allow (1 without ``dense.crop``).

        Its sides: ``max_long_side`` and ``short_side`` (``max_long_side`` when ``short_side`` is
        0), the largest the resize (``image_resize.resized_size``) gives unless a side is
        below one patch (then one window along it).
        """
        crop = self.dense.crop
        if crop <= 0:
            return 1
        stride = self.dense.stride or max(1, crop // 2)
        short = min(self.short_side or self.max_long_side, self.max_long_side)

        def count(length: int) -> int:  # as dense.encoded.window_starts
            return 1 if length <= crop else -(-(length - crop) // stride) + 1

        return count(self.max_long_side) * count(short)


SCHEMA = parameters(EngineConfig)
NAMES = frozenset(p.name for p in SCHEMA)
# Settings that choose a model: fixed at start-up (read-only node parameters); a change needs a
# new Segmenter.
LOAD_FIELDS = tuple(p.name for p in SCHEMA if not p.info.runtime)

# The flat names of the releases before namespaced parameters: each is refused with its new name.
RENAMED: dict[str, str] = {
    **{n: f"dense.{n}" for n in (
        "crop", "stride", "pos_interpolation", "logit_scale", "area_threshold", "pamr",
        "upsample",
    )},
    "affinity": "dslo.affinity",
    "dslo_mode": "dslo.mode",
    **{n: f"dslo.{n}" for n in (
        "sinkhorn_iterations", "sinkhorn_epsilon", "ipf_rounds", "velocity_tau",
    )},
    **{f"sd_{n}": f"dslo.sd.{n}" for n in (
        "model", "precision", "size", "timestep", "noise", "temperature", "layers", "seed",
    )},
    "freecp_redundancy": "freecp.redundancy",
    "freecp_ambiguity": "freecp.ambiguity",
    "vlm_model": "pnp.vlm_model",
    "vlm_pretrained": "pnp.vlm_pretrained",
    **{f"pnp_{n}": f"pnp.{n}" for n in (
        "image_size", "layer", "head", "threshold", "dropout_rounds", "dropout_patches",
        "presence", "presence_threshold", "blur", "refine",
    )},
    "deop_checkpoint": "deop.checkpoint",
    **{n: f"deop.{n}" for n in (
        "proposals", "proposal_source", "mask_cells", "superpixel_compactness",
        "cluster_iterations", "severance_residual",
    )},
    "proposal_logit_scale": "deop.logit_scale",
    "deop_pooling": "deop.pooling",
    "twostream_crop_batch": "twostream.crop_batch",
}


def unknown_setting(name: str) -> str:
    """Why ``name`` is refused: renamed (with the new name) or unknown."""
    if name in RENAMED:
        return f"{name} was renamed {RENAMED[name]}"
    return f"unknown setting {name!r}"


def largest_grid(config: EngineConfig, patch: int) -> tuple[int, int]:
    """The patch grid of one window of the largest frame ``config`` allows: the crop's, or
    the whole resized image's (``max_long_side`` by ``short_side``, square at
    ``max_long_side`` when ``short_side`` is 0)."""
    rows, columns = frame_grid(config.short_side, config.max_long_side, patch)
    crop = config.dense.crop
    if crop:
        rows, columns = min(rows, crop // patch), min(columns, crop // patch)
    return max(1, rows), max(1, columns)


def known_patch(model: str) -> int | None:
    """The patch size of an open_clip model name from the model config open_clip ships for it
    (``open_clip/model_configs/<name>.json``, read without importing open_clip or torch);
    None for a config file, a hub model or an unknown name."""
    if model.endswith(".json") or ":" in model or "/" in model or not model:
        return None
    spec = importlib.util.find_spec("open_clip")  # finds the package, runs nothing of it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0], "model_configs", f"{model}.json")
    try:
        vision = json.loads(path.read_text(encoding="utf-8")).get("vision_cfg", {})
    except (OSError, ValueError, AttributeError):  # an unknown name: load_clip says so
        return None
    patch = vision.get("patch_size") if isinstance(vision, dict) else None
    if isinstance(patch, list | tuple):
        patch = patch[0] if patch else None
    return int(patch) if isinstance(patch, int) and patch > 0 else None


def check_frame_budget(config: EngineConfig, patch: int) -> None:
    """The per-frame budget of the maps that must exist whole (``frame_budget``): with DSLO or
    FreeCP, the patch affinity of every window of the largest frame; with DeOP or two-stream,
    the proposal masks of the largest frame (whichever method is in force, so that a switch to
    them is refused up front, not in the worker). FrameBudgetError."""
    if config.method in PROPOSAL_METHODS:
        grid = frame_grid(config.short_side, config.max_long_side, patch)
        check_proposal_masks(config.deop.proposals, grid, config.deop.mask_cells)
    if config.refinement not in ("dslo", "freecp") or config.method in PIPELINE_METHODS:
        return
    settings = "short_side and max_long_side" + (
        " with dense.crop and dense.stride" if config.dense.crop else ""
    )
    check_affinity(config.max_windows(), largest_grid(config, patch), settings)


def check_pipeline(config: EngineConfig) -> None:
    """What the pipeline methods refuse, with one of them selected: the dense methods'
    refinements must be off, pnp_ovss takes no background words, and the proposal methods'
    own rules (``deop.settings.check_proposal_method``: deop needs a checkpoint). ValueError."""
    method = config.method
    if method not in PIPELINE_METHODS:
        return
    values = config.flat()
    for name, off in DENSE_ONLY.items():
        if values[name] != off:
            raise ValueError(
                f"{name} applies to the dense methods ({', '.join(LAST_BLOCK_MODES)}), not to "
                f"method {method}: set {name} to {off!r}"
            )
    if method == "pnp_ovss":
        if config.background_words:
            raise ValueError(
                "method pnp_ovss has no background words (its background is where no class "
                "map fires): set background_words to []"
            )
        return
    check_proposal_method(method, config.deop)


def check_fits_model(config: EngineConfig, patch: int) -> None:
    """The settings that depend on the model's patch size (``patch`` pixels): the long side
    at least one patch, whole-patch windows, the per-frame budget; ValueError."""
    if config.max_long_side < patch:
        raise ValueError(
            f"max_long_side {config.max_long_side} is below one patch of the model ({patch} px)"
        )
    if config.dense.crop % patch:
        raise ValueError(f"dense.crop {config.dense.crop} must be a multiple of the patch {patch}")
    check_frame_budget(config, patch)
