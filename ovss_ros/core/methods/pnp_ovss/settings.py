"""PnP-OVSS's settings (``PnpOvssSettings``), checked without the VLM: the defaults are the
released ones (``Run_seg.sh`` of the official PnP-OVSS code, Luo et al. CVPR 2024); the limits
that need the loaded VLM are ``PnpOvss.check``'s."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovss_ros.core.frame_budget import check_vlm_image_size, vlm_max_image_size

PRESENCE_MODES = ("clip", "all")
REFINES = ("auto", "crf", "pamr", "none")


def crf_available() -> bool:
    """Whether ``pydensecrf`` (the ``pydensecrf2`` package) imports here."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class PnpOvssSettings:
    """Every PnP-OVSS setting; the defaults are the released ones (``Run_seg.sh``)."""

    image_size: int = 336  # BLIP input, square (the release resizes to 336 x 336)
    layer: int = 8  # text-encoder layer whose cross-attention is read, 1-based
    head: int = 10  # attention head of that layer, 1-based (the release's 0-based 9)
    threshold: float = 0.15  # per class min-max normalised map below this: class absent there
    dropout_rounds: int = 4  # salience dropout rounds; 1 = plain GradCAM
    dropout_patches: int = 10  # most salient patches dropped after each round
    presence: str = "clip"  # clip (image-level CLIP scores) | all (every class in the prompt)
    presence_threshold: float = 0.1  # CLIP probability over the vocabulary to count as present
    blur: float = 0.05  # Gaussian sigma as a fraction of the long image side; 0 = no blur
    refine: str = "auto"  # auto (crf if pydensecrf2 works, else pamr) | crf | pamr | none

    def validate(self) -> None:
        """Raise ValueError with the reason for the first bad value (model limits: PnpOvss)."""
        ranges = {
            # above the budget's limit: the cost is the reason (check_vlm_image_size below)
            "image_size": (16, max(vlm_max_image_size(), _int_or(self.image_size, 0))),
            "layer": (1, 1000),
            "head": (1, 1000),
            "dropout_rounds": (1, 50),
            "dropout_patches": (1, 100000),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
        for name in ("threshold", "presence_threshold", "blur"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        check_vlm_image_size(self.image_size)  # BLIP ITM large's; check(): the loaded VLM's
        if self.presence not in PRESENCE_MODES:
            raise ValueError(f"unknown presence {self.presence!r}: use one of {PRESENCE_MODES}")
        if self.refine not in REFINES:
            raise ValueError(f"unknown refine {self.refine!r}: use one of {REFINES}")
        if self.refine == "crf" and not crf_available():
            raise ValueError(
                "refine crf needs pydensecrf2 (pip install pydensecrf2==1.1), which does not "
                "import here: use refine pamr or auto"
            )

    def refinement(self) -> str:
        """The refinement that runs: ``auto`` resolved to crf or pamr."""
        if self.refine == "auto":
            return "crf" if crf_available() else "pamr"
        return self.refine


def _int_or(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
