"""The settings of one released stage of ``ovss-train-deop`` and the release's values for each
(importable without torch: the command checks its flags before any model library loads)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ovss_ros.training.training_config import check_batch

DEOP_SHORT_SIDES = (256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768)  # img512 yaml
PROPOSAL_SHORT_SIDES = tuple(range(320, 961, 64))  # Base-COCOStuff164K-171.yaml
STAGES = ("proposals", "prompt", "deop")


@dataclass
class StageConfig:
    """One released stage's run; :func:`released_defaults` gives each stage's values."""

    stage: str
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    crop: int  # proposals/deop: random crop side; prompt: crop side (0: the CLIP's input)
    pad: int  # proposals/deop: the padded (or cut) training input side
    short_sides: tuple[int, ...] = ()
    val_size: int = 512  # validation short side (proposals, deop)
    clip_norm: float = 0.01  # SOLVER.CLIP_GRADIENTS full_model CLIP_VALUE (0: off)
    warmup_steps: int = 100  # prompt: SOLVER.WARMUP_ITERS (constant factor 0.005)
    color_aug: bool = True
    per_class: int = 32  # prompt: DATASETS.SAMPLE_PER_CLASS
    prompt_length: int = 16  # PROMPT_SHAPE (16, 0)
    templates: str = "imagenet"  # the class texts without a learned prompt
    checkpoint_every: int = 1000
    validate_every: int = 5000
    log_every: int = 20
    val_images: int = 0  # 0: all
    workers: int = 0
    seed: int = 0
    progress: bool = True

    def validate(self) -> StageConfig:
        """Return self or raise ValueError naming the first bad value."""
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}: use one of {STAGES}")
        for name in ("steps", "batch_size", "log_every", "per_class", "prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        counts = ("checkpoint_every", "validate_every", "val_images", "workers", "crop")
        for name in counts + ("warmup_steps",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        for name in ("weight_decay", "clip_norm"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)}")
        if self.stage != "prompt":
            for name in ("crop", "pad", "val_size"):
                if not 32 <= getattr(self, name) <= 2048:
                    raise ValueError(f"{name} must be in 32..2048, got {getattr(self, name)}")
            if not self.short_sides or not all(32 <= s <= 2048 for s in self.short_sides):
                raise ValueError(f"short sides must be in 32..2048, got {self.short_sides}")
            check_batch(self.batch_size, self.pad)
            if self.stage == "proposals" and self.batch_size * math.ceil(self.pad / 32) ** 2 < 2:
                raise ValueError(
                    f"batch_size {self.batch_size} of pad {self.pad} leaves one value per channel "
                    "at the backbone's stride 32, where stage proposals' batch norms train on "
                    "batch statistics: raise batch_size or pad"
                )
        else:
            check_batch(self.batch_size, self.crop or 224)
        return self


def released_defaults(stage: str) -> dict:
    """The released configuration of ``stage`` (CongHan0808/DeOP ``scripts/`` and configs)."""
    common = {"stage": stage, "weight_decay": 1e-4}
    if stage == "proposals":  # train_learned_prompts_maskformer.sh, R101c yaml
        return common | {
            "steps": 60_000, "batch_size": 32, "lr": 1e-4, "crop": 640, "pad": 640,
            "short_sides": PROPOSAL_SHORT_SIDES, "val_size": 640,
        }  # fmt: skip
    if stage == "prompt":  # train_learn_prompts.sh, learn_prompt_bs32_10k yaml
        return common | {
            "steps": 16_000, "batch_size": 32, "lr": 0.02, "weight_decay": 5e-4, "crop": 0,
            "pad": 0, "validate_every": 3000,
        }  # fmt: skip
    if stage == "deop":  # deop_train.sh, img512 yaml
        return common | {
            "steps": 60_000, "batch_size": 16, "lr": 2e-4, "crop": 640, "pad": 512,
            "short_sides": DEOP_SHORT_SIDES, "val_size": 512,
        }  # fmt: skip
    raise ValueError(f"unknown stage {stage!r}: use one of {STAGES}")
