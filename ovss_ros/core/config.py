"""EngineConfig: every setting that decides how a frame is segmented, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

from ovss_ros.core.dense_clip import AFFINITY_SOURCES, LAST_BLOCK_MODES, POS_INTERPOLATIONS
from ovss_ros.core.text_encoding import template_set
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
# Upper bound of max_long_side: a 4K UHD frame (3840 px) fits unscaled. The whole-image forward
# attends over all patches at once, so the bound is only affordable with sliding windows.
MAX_LONG_SIDE_LIMIT = 4096
# Sliding windows per frame, counted for a frame at the size bounds: every window is one more
# image in the forward batch. The official protocols need at most 72 (Cityscapes: 560 x 2048,
# 224/112); 224/112 windows on a kept-size 2048 x 2048 frame need 324. A stride of a few
# pixels, or a one-patch crop, would need thousands: refused.
MAX_WINDOWS = 512


@dataclass
class EngineConfig:
    """Everything that decides how a frame is segmented (node parameters map onto these).

    The defaults follow the official NACLIP / SCLIP / ClearCLIP code wherever ovss_ros could
    differ from it (methods.md section 0): mmcv's resize size and OpenCV's bilinear resize of
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
    # last-block attention: naclip | sclip | clearclip | maskclip | maskclip_reduced | vanilla;
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
    freecp_redundancy: float = 0.1  # keep a class iff its purification score is above this
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
            "affinity": AFFINITY_SOURCES,
            "dslo_mode": DSLO_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: use one of {allowed}")
        for name in ("short_side", "crop", "stride"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
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
        for name in ("logit_scale", "sinkhorn_epsilon", "velocity_tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("sinkhorn_iterations", "ipf_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.area_threshold and self.refinement != "none":
            raise ValueError(
                f"area_threshold applies to the base method's labels, not to refinement "
                f"{self.refinement!r}: set area_threshold to 0 or refinement to none"
            )
        check_background_words(self.background_words)
        template_set(self.templates)
        # pnp_ovss / deop / twostream settings; imported here: their modules import the engine
        from ovss_ros.core.method_pipelines import check_pipeline_settings

        check_pipeline_settings(self)

    def max_windows(self) -> int:
        """Sliding windows of the largest frame the size bounds allow (1 without ``crop``).

        Its sides: ``max_long_side`` and ``short_side`` (``max_long_side`` when ``short_side`` is
        0), the largest the engine's resize (``engine.resized_size``) gives unless a side is
        below one patch (then one window along it).
        """
        if self.crop <= 0:
            return 1
        stride = self.stride or max(1, self.crop // 2)
        short = min(self.short_side or self.max_long_side, self.max_long_side)

        def count(length: int) -> int:  # as engine.window_starts
            return 1 if length <= self.crop else -(-(length - self.crop) // stride) + 1

        return count(self.max_long_side) * count(short)
