"""EngineConfig: every setting that decides how a frame is segmented, validated in one place.

The fields of the methods with their own pipeline (pnp_ovss, deop, twostream) map onto their
family's settings (``methods/pnp_ovss/settings.py``, ``methods/deop/settings.py``: ``PNP_FIELDS``,
``DEOP_FIELDS``, ``TWOSTREAM_FIELDS``), which check them (``check_pipeline_settings``). This
module imports the families' constants and settings; no family imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ovss_ros.core.clip.text_encoding import template_set
from ovss_ros.core.file_checks import FileCheckError, regular_file
from ovss_ros.core.frame_budget import (
    MAX_LONG_SIDE_LIMIT,
    check_affinity,
    check_proposal_masks,
    frame_grid,
)
from ovss_ros.core.methods.dense.forward import (
    AFFINITY_SOURCES,
    LAST_BLOCK_MODES,
    POS_INTERPOLATIONS,
)
from ovss_ros.core.methods.deop.settings import DeopSettings, TwoStreamSettings
from ovss_ros.core.methods.dslo.sd2_attention import DEFAULT_MODEL as SD_DEFAULT_MODEL
from ovss_ros.core.methods.dslo.sd2_attention import SD_PRECISIONS, check_settings
from ovss_ros.core.methods.pnp_ovss.settings import PnpOvssSettings
from ovss_ros.core.vocabulary import check_background_words

# Fields that need a new model when they change; everything else can change between frames.
LOAD_FIELDS = ("model", "pretrained", "device", "precision")
# Methods with their own pipeline (ovss_ros.core.method_pipelines): PnP-OVSS (issue 9), DeOP and
# the two-stream baseline (issue 10). The second model PnP-OVSS needs is named by VLM_LOAD_FIELDS,
# which, like LOAD_FIELDS, need a new Segmenter when they change.
PIPELINE_METHODS = ("pnp_ovss", "deop", "twostream")
METHODS = (*LAST_BLOCK_MODES, *PIPELINE_METHODS)
VLM_LOAD_FIELDS = ("vlm_model", "vlm_pretrained")
REFINEMENTS = ("none", "dslo", "freecp")
DSLO_MODES = ("ot", "velocity")
UPSAMPLERS = ("bilinear", "jbu")
# DSLO's affinity sources: CLIP's own attention (methods/dense/forward) or Stable Diffusion 2's
# (a second model, loaded while refinement dslo with affinity sd2 is in force).
DSLO_AFFINITIES = (*AFFINITY_SOURCES, "sd2")
# The sd2 affinity's settings; the first two choose the SD model (a change loads it anew).
SD_LOAD_FIELDS = ("sd_model", "sd_precision")
SD_FIELDS = (
    *SD_LOAD_FIELDS,
    "sd_size",
    "sd_timestep",
    "sd_noise",
    "sd_temperature",
    "sd_layers",
    "sd_seed",
)
SD_SEED_LIMIT = 2**31 - 1  # a ROS integer parameter's range is wider; torch seeds are 64-bit
# Sliding windows per frame, counted for a frame at the size bounds: every window is one more
# image in the forward batch. The official protocols need at most 72 (Cityscapes: 560 x 2048,
# 224/112); 224/112 windows on a kept-size 2048 x 2048 frame need 324. A stride of a few
# pixels, or a one-patch crop, would need thousands: refused.
MAX_WINDOWS = 512
# Upper bounds of the positive numbers (the node's parameter ranges): finite, so a flag typed as
# inf or nan is refused as the node refuses it.
POSITIVE_LIMITS = {"logit_scale": 1000.0, "sinkhorn_epsilon": 100.0, "velocity_tau": 100.0}
MAX_ITERATIONS = 1000  # sinkhorn_iterations, ipf_rounds: each one pass over the affinity


def largest_grid(config: EngineConfig, patch: int) -> tuple[int, int]:
    """The patch grid of one window of the largest frame ``config`` allows: the crop's, or
    the whole resized image's (``max_long_side`` by ``short_side``, square at
    ``max_long_side`` when ``short_side`` is 0)."""
    rows, columns = frame_grid(config.short_side, config.max_long_side, patch)
    if config.crop:
        rows, columns = min(rows, config.crop // patch), min(columns, config.crop // patch)
    return max(1, rows), max(1, columns)


def known_patch(model: str) -> int | None:
    """The patch size of an open_clip model name from its registered config (no file is read,
    nothing is loaded); None for a config file, a hub model or an unknown name."""
    import open_clip

    if model.endswith(".json") or ":" in model:
        return None
    try:
        vision = (open_clip.get_model_config(model) or {}).get("vision_cfg", {})
    except Exception:  # an unknown name: load_clip says so
        return None
    patch = vision.get("patch_size")
    return int(patch[0] if isinstance(patch, list | tuple) else patch) if patch else None


def check_frame_budget(config: EngineConfig, patch: int) -> None:
    """The per-frame budget of the maps that must exist whole (``frame_budget``): with DSLO or
    FreeCP, the patch affinity of every window of the largest frame; with DeOP or two-stream,
    the proposal masks of the largest frame (whichever method is in force, so that a switch to
    them is refused up front, not in the worker). FrameBudgetError."""
    if config.method in ("deop", "twostream"):
        grid = frame_grid(config.short_side, config.max_long_side, patch)
        check_proposal_masks(config.proposals, grid, config.mask_cells)
    if config.refinement not in ("dslo", "freecp") or config.method in PIPELINE_METHODS:
        return
    settings = "short_side and max_long_side" + (" with crop and stride" if config.crop else "")
    check_affinity(config.max_windows(), largest_grid(config, patch), settings)


@dataclass
class EngineConfig:
    """Everything that decides how a frame is segmented (node parameters map onto these).

    The defaults follow the official NACLIP / SCLIP / ClearCLIP code wherever ovss_ros could
    differ from it (README, conventions): mmcv's resize size and OpenCV's bilinear resize of
    the uint8 image, the method's own positional-grid rule, logits upsampled to the resized
    image and then to the input, PAMR at the input size.
    """

    model: str = "ViT-B-16"  # open_clip name, or a path to an open_clip model-config JSON
    pretrained: str = "laion2b_s34b_b88k"  # open_clip tag, checkpoint file, or none (random)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | fp16 | bf16 (half precision on a GPU only)
    short_side: int = 448  # resize so the short side is this many pixels; 0 keeps the size
    # ... unless the long side would then exceed this (pixels): every frame's network input is
    # bounded (2048: the long edge of the official NACLIP/SCLIP/ClearCLIP test resize).
    max_long_side: int = 2048
    crop: int = 0  # sliding-window size in pixels; 0 = whole image in one forward
    stride: int = 0  # sliding-window stride; 0 = crop / 2
    # last-block attention: naclip | sclip | clearclip | maskclip | maskclip_reduced | vanilla,
    # FreeCP's variants sclip_freecp | maskclip_freecp | vanilla_freecp (attention + FFN);
    # or a method with its own pipeline: pnp_ovss | deop | twostream (fields below)
    method: str = "naclip"
    # --- pnp_ovss, deop, twostream (ovss_ros.core.method_pipelines; defaults as released) ---
    vlm_model: str = "blip_itm"  # PnP-OVSS's vision-language model (BLIP image-text matching)
    vlm_pretrained: str = "Salesforce/blip-itm-large-flickr"  # hub id or save_pretrained dir
    pnp_image_size: int = 336  # BLIP input side (square), a multiple of its patch
    pnp_layer: int = 8  # text-encoder layer whose cross-attention is read, 1-based
    pnp_head: int = 10  # its attention head, 1-based
    pnp_threshold: float = 0.15  # min-max normalised class map below this: class absent there
    pnp_dropout_rounds: int = 4  # salience dropout rounds (one gradient pass each)
    pnp_dropout_patches: int = 10  # most salient patches dropped after each round
    pnp_presence: str = "clip"  # clip (CLIP image-level scores pick the prompt's classes) | all
    pnp_presence_threshold: float = 0.1  # CLIP probability for a class to count as present
    pnp_blur: float = 0.05  # Gaussian sigma as a share of the long image side (0 = none)
    pnp_refine: str = "auto"  # auto (crf if pydensecrf2 imports, else pamr) | crf | pamr | none
    deop_checkpoint: str = ""  # ovss-train-deop file; empty: training-free DeOP
    proposals: int = 100  # deop/twostream: at most this many mask proposals per frame
    proposal_source: str = "auto"  # auto (learned with a checkpoint head) | superpixels |
    #                                clusters | learned
    proposal_logit_scale: float = 100.0  # proposal-text softmax temperature (DeOP: 100)
    mask_cells: int = 4  # proposal mask cells per patch side
    superpixel_compactness: float = 10.0  # SLIC compactness of the superpixels source
    cluster_iterations: int = 10  # k-means iterations of the clusters source
    deop_pooling: str = "auto"  # auto (cal with a checkpoint, else mean) | cal | mean
    severance_residual: float = 0.2  # residual scale of DeOP's severed last block
    twostream_crop_batch: int = 32  # twostream: masked crops per CLIP forward
    # --- end of pnp_ovss, deop, twostream ---
    # positional grid for other input sizes: official (the method's own code: DINO's "+0.1"
    # rule; exact for maskclip) | exact (bicubic to exactly the patch grid)
    pos_interpolation: str = "official"
    templates: str = "imagenet"  # imagenet (80) | single | custom templates joined by |
    background_words: tuple[str, ...] = ()  # texts that mean "none of the classes"
    score_threshold: float = 0.0  # pixels whose best class probability is below are unlabeled
    logit_scale: float = 40.0  # softmax temperature of the standard protocol
    # SCLIP's area_thd: a class labelling at most this share of the class-labelled pixels is
    # dropped and its pixels go to the next best class (0: off; base method only)
    area_threshold: float = 0.0
    refinement: str = "none"  # none | dslo | freecp: decides the label after the base method
    pamr: bool = False  # pixel-adaptive mask refinement of the final scores (10 its, 8/16)
    upsample: str = "bilinear"  # bilinear | jbu (joint bilateral, guided by the image)
    affinity: str = "naclip"  # DSLO's patch affinity: naclip | keykey | mean (of layers 1..L-1)
    dslo_mode: str = "velocity"  # ot (Sinkhorn) | velocity (Markov chain)
    sinkhorn_iterations: int = 50
    sinkhorn_epsilon: float = 0.1
    ipf_rounds: int = 15
    velocity_tau: float = 0.3
    # DSLO's sd2 affinity (Stable Diffusion 2 self-attention, ``sd2_attention.Sd2Attention``):
    # the SD model, a hub id or a local save_pretrained directory, on the CLIP model's device
    sd_model: str = SD_DEFAULT_MODEL
    sd_precision: str = "auto"  # auto (fp16 on a GPU, fp32 on the CPU) | fp32 | fp16 | bf16
    sd_size: int = 512  # SD input: the frame's aspect ratio at about sd_size^2 pixels
    sd_timestep: int = 100  # UNet timestep, of the scheduler's 1000 training steps (M2N2)
    sd_noise: bool = False  # add that timestep's forward noise (one fixed-seed draw)
    sd_temperature: float = 1.0  # softmax(log A / T) per row before IPF (M2N2: 0.65; 1 = none)
    sd_layers: str = "m2n2"  # m2n2: last up block's first two attn1 | up: every up-block attn1
    sd_seed: int = 0  # seed of the sd_noise draw
    freecp_redundancy: float = 0.15  # keep a class iff its redundancy score is above (official)
    freecp_ambiguity: float = 0.7  # soft IoU above which surviving classes are resolved by crops

    def validate(self) -> None:
        """Raise ValueError with the reason for the first bad value.

        Model-independent checks only; Segmenter.check_config adds those that need the model.
        """
        choices = {
            "method": METHODS,
            "pos_interpolation": POS_INTERPOLATIONS,
            "refinement": REFINEMENTS,
            "upsample": UPSAMPLERS,
            "affinity": DSLO_AFFINITIES,
            "dslo_mode": DSLO_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: use one of {allowed}")
        for name in ("short_side", "crop", "stride"):
            if not 0 <= getattr(self, name) <= MAX_LONG_SIDE_LIMIT:
                raise ValueError(
                    f"{name} must be in [0, {MAX_LONG_SIDE_LIMIT}] pixels, got "
                    f"{getattr(self, name)}"
                )
        if not 1 <= self.max_long_side <= MAX_LONG_SIDE_LIMIT:
            raise ValueError(
                f"max_long_side must be in [1, {MAX_LONG_SIDE_LIMIT}] pixels, got "
                f"{self.max_long_side}"
            )
        if self.stride and not self.crop:
            raise ValueError("stride needs crop > 0 (sliding window)")
        if self.stride > self.crop:
            raise ValueError(
                f"stride {self.stride} larger than crop {self.crop} would skip pixels"
            )
        if self.max_windows() > MAX_WINDOWS:
            raise ValueError(
                f"crop {self.crop} with stride {self.stride or self.crop // 2} needs up to "
                f"{self.max_windows()} sliding windows per frame (short side "
                f"{self.short_side}, long side up to {self.max_long_side}); at most "
                f"{MAX_WINDOWS}: use a larger crop or stride"
            )
        for name in ("score_threshold", "area_threshold", "freecp_redundancy", "freecp_ambiguity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name, most in POSITIVE_LIMITS.items():  # the node's ranges; False for NaN too
            if not 0 < getattr(self, name) <= most:
                raise ValueError(f"{name} must be in (0, {most:g}], got {getattr(self, name)}")
        for name in ("sinkhorn_iterations", "ipf_rounds"):
            if not 1 <= getattr(self, name) <= MAX_ITERATIONS:
                raise ValueError(
                    f"{name} must be in [1, {MAX_ITERATIONS}], got {getattr(self, name)}"
                )
        if self.area_threshold and self.refinement != "none":
            raise ValueError(
                f"area_threshold applies to the base method's labels, not to refinement "
                f"{self.refinement!r}: set area_threshold to 0 or refinement to none"
            )
        check_background_words(self.background_words)
        template_set(self.templates)
        patch = known_patch(self.model)
        if patch is not None:  # else Segmenter.check_config checks it with the loaded model
            check_frame_budget(self, patch)
        self._validate_sd()
        check_pipeline_settings(self)

    @property
    def uses_sd2(self) -> bool:
        """Whether these settings need the Stable Diffusion model (DSLO on the sd2 affinity)."""
        return self.refinement == "dslo" and self.affinity == "sd2"

    def sd2_settings(self) -> dict[str, object]:
        """The settings ``Sd2Attention`` takes (constructor, ``check``, ``reconfigure``)."""
        return {
            "size": self.sd_size,
            "timestep": self.sd_timestep,
            "noise": self.sd_noise,
            "temperature": self.sd_temperature,
            "layers": self.sd_layers,
            "seed": self.sd_seed,
        }

    def _validate_sd(self) -> None:
        """The sd_* settings, checked whatever the affinity (so a later switch to sd2 cannot
        meet a bad value); whether the model loads is the Segmenter's to find out."""
        if not isinstance(self.sd_model, str) or not self.sd_model.strip():
            raise ValueError(
                "sd_model must name a Stable Diffusion model: a Hugging Face hub id "
                f"(e.g. {SD_DEFAULT_MODEL}) or a local save_pretrained directory"
            )
        if self.sd_precision not in SD_PRECISIONS:
            raise ValueError(
                f"unknown sd_precision {self.sd_precision!r}: use one of {list(SD_PRECISIONS)}"
            )
        check_settings(self.sd_size, self.sd_timestep, self.sd_temperature, self.sd_layers)
        if not 0 <= self.sd_seed <= SD_SEED_LIMIT:
            raise ValueError(f"sd_seed must be in [0, {SD_SEED_LIMIT}], got {self.sd_seed}")

    def max_windows(self) -> int:
        """Sliding windows of the largest frame the size bounds allow (1 without ``crop``).

        Its sides: ``max_long_side`` and ``short_side`` (``max_long_side`` when ``short_side`` is
        0), the largest the resize (``image_resize.resized_size``) gives unless a side is
        below one patch (then one window along it).
        """
        if self.crop <= 0:
            return 1
        stride = self.stride or max(1, self.crop // 2)
        short = min(self.short_side or self.max_long_side, self.max_long_side)

        def count(length: int) -> int:  # as dense.encoded.window_starts
            return 1 if length <= self.crop else -(-(length - self.crop) // stride) + 1

        return count(self.max_long_side) * count(short)


# EngineConfig field -> the method's settings field.
PNP_FIELDS = {
    "pnp_image_size": "image_size",
    "pnp_layer": "layer",
    "pnp_head": "head",
    "pnp_threshold": "threshold",
    "pnp_dropout_rounds": "dropout_rounds",
    "pnp_dropout_patches": "dropout_patches",
    "pnp_presence": "presence",
    "pnp_presence_threshold": "presence_threshold",
    "pnp_blur": "blur",
    "pnp_refine": "refine",
}
PROPOSAL_FIELDS = {
    "proposals": "proposals",
    "proposal_source": "proposal_source",
    "short_side": "short_side",
    "max_long_side": "max_long_side",
    "templates": "templates",
    "background_words": "background_words",
    "score_threshold": "score_threshold",
    "proposal_logit_scale": "logit_scale",
    "mask_cells": "mask_cells",
    "superpixel_compactness": "superpixel_compactness",
    "cluster_iterations": "cluster_iterations",
}
DEOP_FIELDS = PROPOSAL_FIELDS | {
    "deop_pooling": "pooling",
    "severance_residual": "severance_residual",
}
TWOSTREAM_FIELDS = PROPOSAL_FIELDS | {"twostream_crop_batch": "crop_batch"}
# Dense-method settings that would do nothing under these methods: refused unless off.
DENSE_ONLY = {
    "refinement": "none",
    "pamr": False,
    "upsample": "bilinear",
    "area_threshold": 0.0,
    "crop": 0,
}


def method_fields(method: str) -> dict[str, str]:
    """EngineConfig field -> settings field of ``method`` (one of PIPELINE_METHODS)."""
    return {"pnp_ovss": PNP_FIELDS, "deop": DEOP_FIELDS, "twostream": TWOSTREAM_FIELDS}[method]


def method_settings(config: EngineConfig, method: str | None = None) -> object:
    """The settings object of ``method`` (default ``config.method``) that ``config`` describes
    (not validated): PnpOvssSettings, DeopSettings or TwoStreamSettings."""
    method = method or config.method
    values = {dst: getattr(config, src) for src, dst in method_fields(method).items()}
    if method == "pnp_ovss":
        return PnpOvssSettings(**values)
    values["background_words"] = tuple(values["background_words"])
    return {"deop": DeopSettings, "twostream": TwoStreamSettings}[method](**values)


def renamed(error: ValueError, names: dict[str, str]) -> ValueError:
    """The method's message with its settings' names replaced by the EngineConfig names that
    users set (``layer must be ...`` -> ``pnp_layer must be ...``)."""
    text = str(error)
    for engine_name, own in names.items():
        if engine_name != own:
            text = re.sub(rf"(?<!\w){own}(?!\w)", engine_name, text)
    return type(error)(text)


def check_pipeline_settings(config: EngineConfig) -> None:
    """Model-independent checks of the pnp_ovss / deop / twostream fields; ValueError.

    Every method's settings are checked whatever ``method`` is (so a bad value is refused when it
    is set, not when the method is switched to). With one of these methods selected: the dense
    methods' refinements must be off, pnp_ovss takes no background words, a ``deop_checkpoint``
    must be an existing file, and what needs a checkpoint (proposal_source learned, deop_pooling
    cal) needs one.
    """
    for method in PIPELINE_METHODS:
        names = method_fields(method)
        try:
            method_settings(config, method).validate()
        except ValueError as error:
            raise renamed(error, names) from None
    method = config.method
    if method not in PIPELINE_METHODS:
        return
    for name, off in DENSE_ONLY.items():
        if getattr(config, name) != off:
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
    checkpoint = config.deop_checkpoint.strip()
    if checkpoint:
        try:
            regular_file(checkpoint, "deop_checkpoint")
        except FileCheckError as error:
            raise ValueError(
                f"{error}: set it to a file made by ovss-train-deop, or to '' for training-free "
                "DeOP"
            ) from None
    if not checkpoint and config.proposal_source == "learned":
        raise ValueError(
            "proposal_source learned needs a deop_checkpoint with a proposal head: set "
            "deop_checkpoint, or proposal_source to auto, superpixels or clusters"
        )
    if not checkpoint and method == "deop" and config.deop_pooling == "cal":
        raise ValueError(
            "deop_pooling cal needs a deop_checkpoint with a CAL decoder: set deop_checkpoint, "
            "or deop_pooling to auto or mean"
        )
