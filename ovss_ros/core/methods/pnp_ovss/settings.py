"""PnP-OVSS's settings (``pnp.*``), checked without the VLM (no torch here).

The defaults are the released ones (``Run_seg.sh`` of the official PnP-OVSS code, Luo et al.
CVPR 2024: BLIP ITM large, 336 px, layer 8, head 10 (0-based 9), threshold 0.15, 4 dropout
rounds of 10 patches, blur 0.05, dense CRF); the limits that need the loaded VLM are
``PnpOvss.check``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ovss_ros.core.frame_budget import check_vlm_image_size, vlm_max_image_size
from ovss_ros.core.settings import Settings, setting

PRESENCE_MODES = ("clip", "all")
ROUND0_MODES = ("once", "release")
BACKGROUND_RULES = ("always", "fewer_than_3")
RESIZES = ("antialiased", "pil")
REFINES = ("auto", "crf", "pamr", "none")
VLM_MODELS = ("blip_itm",)  # architectures PnP-OVSS can run on
DEFAULT_VLM = "Salesforce/blip-itm-large-flickr"
RELEASE = "PnP-OVSS Run_seg.sh"
# The release's label-free tuning (``Search``): its judge CLIP, trials and min_att grid.
TUNING_CLIP = ("ViT-L-14-336", "openai")
TUNING_TRIALS = 34
TUNING_MIN_ATT = (0.05, 0.15, 0.25, 0.35, 0.45)  # np.arange(0.05, 0.5, 0.1)


def crf_available() -> bool:
    """Whether ``pydensecrf`` (the ``pydensecrf2`` package) imports here."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class PnpSettings(Settings):
    """Every PnP-OVSS setting (``method: pnp_ovss``); the VLM is chosen at start-up."""

    namespace: ClassVar[str] = "pnp"

    vlm_model: str = setting(
        "blip_itm",
        "architecture of the vision-language model (the second model)",
        runtime=False,
        choices=VLM_MODELS,
        source=RELEASE,
    )
    vlm_pretrained: str = setting(
        DEFAULT_VLM,
        "BLIP image-text-matching weights, a Hugging Face hub id (from the local cache when "
        "offline) or a directory written by save_pretrained; loaded when pnp_ovss is selected",
        runtime=False,
        source=RELEASE,
    )
    image_size: int = setting(
        336,
        "side of the square BLIP input in pixels",
        minimum=16,
        maximum=vlm_max_image_size(),
        unit="pixels",
        constraints="a multiple of the VLM's patch size; the VLM's attention map "
        "(heads x ((size / patch)^2 + 1)^2 x 4 bytes) within the per-frame budget",
        budget=check_vlm_image_size,
        source=RELEASE,
    )
    layer: int = setting(
        8,
        "BLIP text-encoder layer whose cross-attention is read (1-based)",
        minimum=1,
        maximum=1000,
        constraints="at most the VLM's text layers",
        source=RELEASE,
    )
    head: int = setting(
        10,
        "attention head of that layer (1-based; the release's 0-based 9)",
        minimum=1,
        maximum=1000,
        constraints="at most the VLM's attention heads",
        source=RELEASE,
    )
    threshold: float = setting(
        0.15,
        "a class is absent where its min-max normalised map is below this",
        minimum=0.0,
        maximum=1.0,
        source=RELEASE,
    )
    dropout_rounds: int = setting(
        4,
        "salience dropout rounds, one BLIP forward and gradient pass each (1 = plain GradCAM)",
        minimum=1,
        maximum=50,
        source=RELEASE,
    )
    dropout_patches: int = setting(
        10,
        "most salient patches zeroed after each round",
        minimum=1,
        maximum=100000,
        source=RELEASE,
    )
    presence: str = setting(
        "clip",
        "classes put in the prompt: clip (CLIP image-level probability at least "
        "pnp.presence_threshold) or all",
        choices=PRESENCE_MODES,
        source="ovss_ros (the release: GPT-4o class lists made offline, which ovss-segment, "
        "ovss-eval and ovss-tune read with --presence-lists)",
    )
    presence_threshold: float = setting(
        0.1,
        "CLIP probability over the vocabulary for a class to count as present",
        minimum=0.0,
        maximum=1.0,
        source="ovss_ros",
    )
    round0: str = setting(
        "once",
        "how often the first (undropped) round's map counts in the sum over dropout rounds: "
        "once, or release (twice, as the released code sums it)",
        choices=ROUND0_MODES,
        source=RELEASE + " (release); once is ovss_ros's",
    )
    background: str = setting(
        "always",
        "background channel (where no class map fires): always, or fewer_than_3 (only when "
        "fewer than 3 classes are in the prompt, else argmax over the classes alone: the "
        "release's rule on PASCAL Context, ADE20K and COCO-Stuff)",
        choices=BACKGROUND_RULES,
        source=RELEASE,
    )
    resize: str = setting(
        "antialiased",
        "how the frame is squashed to the BLIP input: antialiased (torch bicubic with "
        "antialiasing, on the device) or pil (PIL bicubic on the host, the release's "
        "torchvision Resize on a PIL image)",
        choices=RESIZES,
        source=RELEASE + " (pil); antialiased is ovss_ros's",
    )
    blur: float = setting(
        0.05,
        "Gaussian blur sigma as a share of the image's long side (0 = none)",
        minimum=0.0,
        maximum=1.0,
        source=RELEASE,
    )
    refine: str = setting(
        "auto",
        "final refinement: dense CRF (pydensecrf2), PAMR, none; auto = crf where pydensecrf2 "
        "imports, else pamr",
        choices=REFINES,
        source=RELEASE + " (dense CRF); the PAMR fallback is ovss_ros's",
    )

    def check(self) -> None:
        if self.refine == "crf" and not crf_available():
            raise ValueError(
                "pnp.refine crf needs pydensecrf2 (pip install pydensecrf2==1.1), which does not "
                "import here: use pnp.refine pamr or auto"
            )

    def refinement(self) -> str:
        """The refinement that runs: ``auto`` resolved to crf or pamr."""
        if self.refine == "auto":
            return "crf" if crf_available() else "pamr"
        return self.refine
