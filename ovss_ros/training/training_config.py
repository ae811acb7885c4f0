"""What a DeOP training run is asked to do (``TrainingConfig``, defaults: DeOP's COCO-Stuff
run) and its checks. No torch here, so ``ovss-train-deop`` refuses a bad value before any model
library loads; the training itself (and where each step comes from) is
``ovss_ros.training.deop_training``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ovss_ros.core.methods.deop.run_config import DeopConfig
from ovss_ros.core.methods.deop.settings import PROPOSAL_SOURCES, SEVERANCE_RESIDUAL

CHECKPOINT_NAME = "checkpoint.pt"  # in the --output folder: what the node's deop.checkpoint takes
METRICS_NAME = "metrics.json"

LOSSES = ("deop", "ce")


# A training crop's side and a batch's pixels: DeOP trains 16 crops of 640 (6.6 MP a batch); a
# batch is one forward and backward of every crop at once, so its pixels bound its memory.
MAX_CROP = 2048
MAX_BATCH_PIXELS = 64 * 640 * 640


def check_batch(batch_size: int, crop: int) -> None:
    """Refuse a crop above MAX_CROP or a batch of more than MAX_BATCH_PIXELS pixels, naming
    what the batch would hold (ValueError): ``--batch-size 100000`` or ``--crop 100000`` asked
    for tens of GB before the first step."""
    if crop > MAX_CROP:
        raise ValueError(f"crop must be at most {MAX_CROP} pixels, got {crop}")
    pixels = batch_size * crop * crop
    if pixels > MAX_BATCH_PIXELS:
        raise ValueError(
            f"batch_size {batch_size} of {crop}x{crop} crops is {pixels / 1e6:.1f} MP a step "
            f"({pixels * 3 / 1e9:.1f} GB of input alone); at most {MAX_BATCH_PIXELS / 1e6:.1f} "
            "MP: lower batch_size or crop"
        )


@dataclass
class TrainingConfig:
    """Everything a run needs besides the data and CLIP (defaults: DeOP's COCO-Stuff run)."""

    steps: int = 60_000
    batch_size: int = 16
    lr: float = 2e-4
    prompt_lr: float = 2e-3  # the learned prompt context learns faster (DeOP trains it alone)
    weight_decay: float = 1e-4
    crop: int = 512
    scale_min: float = 0.5
    scale_max: float = 1.5
    proposal_source: str = "superpixels"  # superpixels | clusters | learned
    proposals: int = 100
    mask_cells: int = 4
    severance_residual: float = SEVERANCE_RESIDUAL  # DeOP as released: 1.0
    templates: str = "imagenet"  # the text side without a learned prompt
    prompt_length: int = 16  # learned context tokens (DeOP: 16); 0: the prompt templates
    decoder_layers: int = 1
    decoder_heads: int = 8
    decoder_feedforward: int = 1024
    decoder_dropout: float = 0.1
    head_queries: int = 100
    head_dim: int = 256
    head_layers: int = 2
    loss: str = "deop"  # deop (released focal BCE + Dice) | ce (per-pixel cross-entropy)
    ce_weight: float = 2.0
    dice_weight: float = 0.8
    output_sharpness: float = 3.0
    logit_scale: float = 100.0
    checkpoint_every: int = 1000
    validate_every: int = 5000
    log_every: int = 50  # training losses are kept as means over this many steps
    val_images: int = 0  # 0: all
    val_short_side: int = 0  # 0: the crop size
    workers: int = 0
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError with the reason for the first bad value."""
        positive = ("steps", "batch_size", "crop", "proposals", "mask_cells", "decoder_heads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "prompt_lr", "logit_scale", "scale_min", "output_sharpness"):
            if not 0 < getattr(self, name) < math.inf:  # False for NaN too
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        for name in ("weight_decay", "ce_weight", "dice_weight", "scale_max"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)}")
        if not 0 <= self.decoder_dropout < 1:
            raise ValueError(f"decoder_dropout must be in [0, 1), got {self.decoder_dropout}")
        check_batch(self.batch_size, self.crop)
        if self.scale_max < self.scale_min:
            raise ValueError(f"scale_max {self.scale_max} < scale_min {self.scale_min}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: use one of {LOSSES}")
        if self.proposal_source not in PROPOSAL_SOURCES:
            raise ValueError(
                f"unknown proposal_source {self.proposal_source!r}: use one of {PROPOSAL_SOURCES}"
            )
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        counts = ("checkpoint_every", "validate_every", "val_images", "prompt_length", "workers")
        for name in counts + ("val_short_side",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.val_short_side > MAX_CROP:
            raise ValueError(
                f"val_short_side must be at most {MAX_CROP} pixels, got {self.val_short_side}"
            )

    def inference_settings(self) -> DeopConfig:
        """The DeOP settings validation uses, stored in the checkpoint as its defaults."""
        return DeopConfig(
            proposals=self.proposals if self.proposal_source != "learned" else self.head_queries,
            proposal_source=self.proposal_source,
            short_side=self.val_short_side or self.crop,
            templates=self.templates,
            logit_scale=self.logit_scale,
            mask_cells=self.mask_cells,
            severance_residual=self.severance_residual,
            pooling="cal",
        )


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (a NaN IoU of a class without pixels) as None, so
    that ``json.dumps`` writes valid JSON (``null``, not ``NaN``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
