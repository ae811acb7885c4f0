"""DSLO's settings (``dslo.*``) and those of its Stable Diffusion 2 affinity (``dslo.sd.*``).

No torch here: checked before any model loads. The paper's numbers (arXiv 2604.07723: Sinkhorn
50 iterations with epsilon 0.1, 15 IPF rounds, tau 0.3) are the defaults; the SD2 settings follow
M2N2 (timestep 100, the last up block's first two self-attention layers), which DSLO cites for
its affinity. What the limits that need the loaded SD model are: ``Sd2Attention``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ovss_ros.core.frame_budget import check_sd_size, sd_max_size
from ovss_ros.core.methods.dense.settings import AFFINITY_SOURCES
from ovss_ros.core.settings import Settings, group, setting

DSLO_AFFINITIES = (*AFFINITY_SOURCES, "sd2")
DSLO_MODES = ("ot", "velocity")
MAX_ITERATIONS = 1000  # sinkhorn_iterations, ipf_rounds: each one pass over the affinity
DEFAULT_SD_MODEL = "stabilityai/stable-diffusion-2-1-base"
SD_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SD_MAX_SIZE = sd_max_size()  # float32 SD2 VAE within the per-frame budget: 1448
SD_MAX_TEMPERATURE = 100.0
SD_SEED_LIMIT = 2**31 - 1  # a ROS integer parameter's range is wider; torch seeds are 64-bit
LAYER_SETS = ("m2n2", "up")


@dataclass(frozen=True)
class Sd2Settings(Settings):
    """The sd2 affinity's settings; ``model`` and ``precision`` choose the SD model (a change
    loads it anew, in the worker); all can change at runtime."""

    namespace: ClassVar[str] = "dslo.sd"

    model: str = setting(
        DEFAULT_SD_MODEL,
        "the Stable Diffusion model, a Hugging Face hub id (downloaded once, then cached; "
        "offline it must be cached) or a local directory written by a diffusers pipeline's "
        "save_pretrained; loaded only while refinement is dslo and dslo.affinity sd2",
        constraints="hub id owner/name | directory with unet, vae, scheduler, text_encoder, "
        "tokenizer",
        source="DSLO: Stable Diffusion 2",
    )
    precision: str = setting(
        "auto",
        "the SD model's precision; auto = fp16 on a GPU, fp32 on the CPU",
        choices=SD_PRECISIONS,
        source="ovss_ros",
    )
    size: int = setting(
        512,
        "SD input size in pixels: the frame's aspect ratio at about size^2 pixels",
        minimum=64,
        maximum=SD_MAX_SIZE,
        unit="pixels",
        constraints="the VAE's activation (size^2 x 128 x 4 bytes) within the per-frame budget",
        budget=check_sd_size,
        source="SD2-base's 512 px training size",
    )
    timestep: int = setting(
        100,
        "UNet timestep of the one denoising step, of the 1000 training steps",
        minimum=0,
        maximum=999,
        source="M2N2 (timestep 100)",
    )
    noise: bool = setting(
        False,
        "add the timestep's forward-process noise to the latents (one fixed-seed draw)",
        source="ovss_ros (M2N2 adds none)",
    )
    temperature: float = setting(
        1.0,
        "softmax(log A / T) per row before IPF; below 1 sharpens (1 = none)",
        minimum=0.0,
        maximum=SD_MAX_TEMPERATURE,
        open_minimum=True,
        source="ovss_ros (M2N2 sharpens with 0.65)",
    )
    layers: str = setting(
        "m2n2",
        "self-attention layers averaged: m2n2 = the first two of the last up block, up = every "
        "up-block layer",
        choices=LAYER_SETS,
        source="M2N2",
    )
    seed: int = setting(
        0, "seed of the noise draw", minimum=0, maximum=SD_SEED_LIMIT, source="ovss_ros"
    )


@dataclass(frozen=True)
class DsloSettings(Settings):
    """DSLO's settings (``refinement: dslo``); all can change at runtime."""

    namespace: ClassVar[str] = "dslo"

    affinity: str = setting(
        "naclip",
        "patch affinity the discrepancy is measured along: CLIP's own attention (naclip, "
        "keykey, mean) or Stable Diffusion 2 self-attention (sd2: a second model, dslo.sd.model, "
        "loaded when this is set, one more model forward per frame)",
        choices=DSLO_AFFINITIES,
        source="ovss_ros (the paper: sd2; CLIP's attention needs no second model)",
    )
    mode: str = setting(
        "velocity",
        "discrepancy measure: optimal transport (ot, Sinkhorn) or maximum velocity (Markov chain)",
        choices=DSLO_MODES,
        source="DSLO paper (both measures)",
    )
    sinkhorn_iterations: int = setting(
        50, "ot: Sinkhorn iterations", minimum=1, maximum=MAX_ITERATIONS, source="DSLO paper"
    )
    sinkhorn_epsilon: float = setting(
        0.1,
        "ot: entropic regularisation",
        minimum=0.0,
        maximum=100.0,
        open_minimum=True,
        source="DSLO paper",
    )
    ipf_rounds: int = setting(
        15,
        "iterative proportional fitting rounds for the transition matrix",
        minimum=1,
        maximum=MAX_ITERATIONS,
        source="DSLO paper",
    )
    velocity_tau: float = setting(
        0.3,
        "velocity: a patch stops when its class density is within tau of uniform",
        minimum=0.0,
        maximum=100.0,
        open_minimum=True,
        source="DSLO paper (tau 0.3, reused for ovss_ros's stopping rule)",
    )
    sd: Sd2Settings = group(Sd2Settings)

    def summary(self) -> str:
        """What sets this DSLO apart, for logs: ``dslo (velocity, naclip affinity)``."""
        return f"dslo ({self.mode}, {self.affinity} affinity)"
