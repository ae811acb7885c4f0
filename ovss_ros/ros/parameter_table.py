"""The node's parameter table: every name, default, range, choices and description.

Every parameter is declared from ``PARAMETERS`` (``parameters.declare_parameters``) with a
descriptor (description, range, read-only flag), so ``ros2 param describe /ovss <name>`` tells a
robot engineer what a value means and what it may be; ``--help`` and the docs' tables are printed
from it. Defaults are the engine's (``EngineConfig``), ranges and choices the engine's own
(``core.config`` and the method modules); the PnP-OVSS / DeOP / two-stream part is in
``method_parameters``.

Keep ``config/ovss.yaml`` in step with the defaults here (a test compares them).
"""

from __future__ import annotations

from dataclasses import fields

from ovss_ros.core import EngineConfig
from ovss_ros.core.config import (
    DSLO_AFFINITIES,
    DSLO_MODES,
    MAX_ITERATIONS,
    MAX_LONG_SIDE_LIMIT,
    POSITIVE_LIMITS,
    REFINEMENTS,
    SD_SEED_LIMIT,
    UPSAMPLERS,
)
from ovss_ros.core.config import METHODS as ENGINE_METHODS
from ovss_ros.core.frame_budget import check_sd_size
from ovss_ros.core.methods.dense.forward import POS_INTERPOLATIONS
from ovss_ros.core.methods.dslo.sd2_attention import LAYER_SETS, SD_MAX_SIZE, SD_PRECISIONS
from ovss_ros.ros.image_conversion import DEFAULT_MAX_INPUT_PIXELS
from ovss_ros.ros.method_parameters import PIPELINE_PARAMETERS
from ovss_ros.ros.parameter_spec import ParameterSpec

IMAGE_TRANSPORTS = ("raw", "compressed")
METHODS = tuple(ENGINE_METHODS)
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_CLASSES = ("person", "chair", "table", "floor", "wall", "door")

_ENGINE_DEFAULTS = EngineConfig()

PARAMETERS: tuple[ParameterSpec, ...] = (
    # Chosen at start-up: they decide which model is loaded or which topic is read.
    ParameterSpec(
        "model",
        _ENGINE_DEFAULTS.model,
        "open_clip model name (e.g. ViT-B-16) or path to an open_clip model-config JSON",
        read_only=True,
    ),
    ParameterSpec(
        "pretrained",
        _ENGINE_DEFAULTS.pretrained,
        "open_clip pretrained tag, a local checkpoint file, or 'none' (random weights)",
        read_only=True,
    ),
    ParameterSpec(
        "device",
        _ENGINE_DEFAULTS.device,
        "inference device: auto picks CUDA when present",
        read_only=True,
        constraints="auto | cpu | cuda | cuda:N",
    ),
    ParameterSpec(
        "precision",
        _ENGINE_DEFAULTS.precision,
        "weights and activations precision; half precision on a GPU only",
        read_only=True,
        constraints=" | ".join(PRECISIONS),
    ),
    ParameterSpec(
        "image_transport",
        "raw",
        "subscribe to 'image' (raw) or 'image/compressed' (compressed)",
        read_only=True,
        constraints=" | ".join(IMAGE_TRANSPORTS),
    ),
    ParameterSpec(
        "cameras",
        [],
        "camera names: camera 'front' reads front/image and front/camera_info and publishes "
        "~/front/labels etc.; one model segments all (frames ready together share a forward "
        "pass); empty = one camera: image -> ~/labels",
        read_only=True,
        constraints="unique ROS name tokens (letters, digits, '_'; not starting with a digit)",
    ),
    # Runtime: validated atomically, applied by the worker before the next frame.
    ParameterSpec(
        "classes",
        list(DEFAULT_CLASSES),
        "vocabulary: one entry per class, synonyms after ';' (the first names the class), "
        "descriptions after '|'; label value = index in this list",
        constraints="non-empty, unique names, at most 1000 entries of 200 characters",
    ),
    ParameterSpec(
        "background_words",
        [],
        "texts that mean 'none of the classes' (e.g. sky, wall); pixels they win are unlabeled",
    ),
    ParameterSpec(
        "method",
        _ENGINE_DEFAULTS.method,
        "dense CLIP last-block attention (naclip ... vanilla), or a method with its own "
        "pipeline: pnp_ovss (BLIP cross-attention GradCAM; a gradient pass per dropout round, not "
        "camera rate), deop (proposals classified from one CLIP pass), twostream (one CLIP pass "
        "per proposal crop); switching to pnp_ovss loads the VLM, to deop/twostream the "
        "deop_checkpoint, in the worker: a failed load keeps the old method and puts it back",
        constraints=" | ".join(METHODS),
    ),
    *PIPELINE_PARAMETERS,
    ParameterSpec(
        "pos_interpolation",
        _ENGINE_DEFAULTS.pos_interpolation,
        "positional grid at other input sizes: official = as the method's own code (DINO's "
        "'+0.1' rule of NACLIP/SCLIP/ClearCLIP), exact = bicubic to exactly the patch grid",
        constraints=" | ".join(POS_INTERPOLATIONS),
    ),
    ParameterSpec(
        "area_threshold",
        _ENGINE_DEFAULTS.area_threshold,
        "SCLIP's area filter: a class labelling at most this share of the labelled pixels gives "
        "them to the next best class (0 = off; base method only, refinement none)",
        minimum=0.0,
        maximum=1.0,
    ),
    ParameterSpec(
        "refinement",
        _ENGINE_DEFAULTS.refinement,
        "how labels are decided after the base method",
        constraints=" | ".join(REFINEMENTS),
    ),
    ParameterSpec(
        "pamr",
        _ENGINE_DEFAULTS.pamr,
        "pixel-adaptive mask refinement of the final scores (10 iterations, dilations 8 and 16)",
    ),
    ParameterSpec(
        "upsample",
        _ENGINE_DEFAULTS.upsample,
        "patch scores to pixels: bilinear, or joint bilateral guided by the image",
        constraints=" | ".join(UPSAMPLERS),
    ),
    ParameterSpec(
        "affinity",
        _ENGINE_DEFAULTS.affinity,
        "DSLO: patch affinity the discrepancy is measured along: CLIP's own attention "
        "(naclip, keykey, mean) or Stable Diffusion 2 self-attention (sd2: a second model, "
        "sd_model, loaded when this is set, one more model forward per frame)",
        constraints=" | ".join(DSLO_AFFINITIES),
    ),
    ParameterSpec(
        "dslo_mode",
        _ENGINE_DEFAULTS.dslo_mode,
        "DSLO: optimal transport (Sinkhorn) or maximum velocity (Markov chain)",
        constraints=" | ".join(DSLO_MODES),
    ),
    ParameterSpec(
        "sinkhorn_iterations",
        _ENGINE_DEFAULTS.sinkhorn_iterations,
        "DSLO ot: Sinkhorn iterations",
        minimum=1,
        maximum=MAX_ITERATIONS,
    ),
    ParameterSpec(
        "sinkhorn_epsilon",
        _ENGINE_DEFAULTS.sinkhorn_epsilon,
        "DSLO ot: entropic regularisation",
        minimum=0.0,
        maximum=POSITIVE_LIMITS["sinkhorn_epsilon"],
        constraints="> 0",
    ),
    ParameterSpec(
        "ipf_rounds",
        _ENGINE_DEFAULTS.ipf_rounds,
        "DSLO: iterative proportional fitting rounds for the transition matrix",
        minimum=1,
        maximum=MAX_ITERATIONS,
    ),
    ParameterSpec(
        "velocity_tau",
        _ENGINE_DEFAULTS.velocity_tau,
        "DSLO velocity: a patch stops when its class density is within tau of uniform",
        minimum=0.0,
        maximum=POSITIVE_LIMITS["velocity_tau"],
        constraints="> 0",
    ),
    # DSLO's sd2 affinity (Stable Diffusion 2 self-attention): changeable at runtime; a new
    # sd_model or sd_precision is loaded by the worker, and refused (old settings kept) if it
    # cannot be loaded.
    ParameterSpec(
        "sd_model",
        _ENGINE_DEFAULTS.sd_model,
        "DSLO sd2: the Stable Diffusion model, a Hugging Face hub id (downloaded once, then "
        "cached; offline it must be cached) or a local directory written by a diffusers "
        "pipeline's save_pretrained; loaded only while refinement is dslo and affinity sd2",
        constraints="hub id owner/name | directory with unet, vae, scheduler, text_encoder, "
        "tokenizer",
    ),
    ParameterSpec(
        "sd_precision",
        _ENGINE_DEFAULTS.sd_precision,
        "DSLO sd2: the SD model's precision; auto = fp16 on a GPU, fp32 on the CPU",
        constraints=" | ".join(SD_PRECISIONS),
    ),
    ParameterSpec(
        "sd_size",
        _ENGINE_DEFAULTS.sd_size,
        "DSLO sd2: SD input size in pixels: the frame's aspect ratio at about sd_size^2 pixels",
        minimum=64,
        maximum=SD_MAX_SIZE,
        constraints="the VAE's activation (sd_size^2 x 128 x 4 bytes) within the per-frame budget",
        budget=check_sd_size,
    ),
    ParameterSpec(
        "sd_timestep",
        _ENGINE_DEFAULTS.sd_timestep,
        "DSLO sd2: UNet timestep of the one denoising step, of the 1000 training steps",
        minimum=0,
        maximum=999,
    ),
    ParameterSpec(
        "sd_noise",
        _ENGINE_DEFAULTS.sd_noise,
        "DSLO sd2: add the timestep's forward-process noise to the latents (one fixed-seed draw)",
    ),
    ParameterSpec(
        "sd_temperature",
        _ENGINE_DEFAULTS.sd_temperature,
        "DSLO sd2: softmax(log A / T) per row before IPF; below 1 sharpens (1 = none)",
        minimum=0.0,
        maximum=100.0,
        constraints="> 0",
    ),
    ParameterSpec(
        "sd_layers",
        _ENGINE_DEFAULTS.sd_layers,
        "DSLO sd2: self-attention layers averaged: m2n2 = the first two of the last up block, "
        "up = every up-block layer",
        constraints=" | ".join(LAYER_SETS),
    ),
    ParameterSpec(
        "sd_seed",
        _ENGINE_DEFAULTS.sd_seed,
        "DSLO sd2: seed of the sd_noise draw",
        minimum=0,
        maximum=SD_SEED_LIMIT,
    ),
    ParameterSpec(
        "freecp_redundancy",
        _ENGINE_DEFAULTS.freecp_redundancy,
        "FreeCP: keep a class only if its purification score is above this",
        minimum=0.0,
        maximum=1.0,
    ),
    ParameterSpec(
        "freecp_ambiguity",
        _ENGINE_DEFAULTS.freecp_ambiguity,
        "FreeCP: soft IoU above which overlapping classes are resolved with image crops",
        minimum=0.0,
        maximum=1.0,
    ),
    ParameterSpec(
        "templates",
        _ENGINE_DEFAULTS.templates,
        "prompt templates: imagenet (80), single ('a photo of a {}.'), or custom joined by '|'",
        constraints="imagenet | single | 'template with {}|...'",
    ),
    ParameterSpec(
        "short_side",
        _ENGINE_DEFAULTS.short_side,
        "resize the input so its short side has this many pixels before inference (0 = keep)",
        minimum=0,
        maximum=MAX_LONG_SIDE_LIMIT,
    ),
    ParameterSpec(
        "max_long_side",
        _ENGINE_DEFAULTS.max_long_side,
        "bound on the network input's long side in pixels, whatever the frame's aspect ratio "
        "(a wide or tall strip is scaled down to it), so the patch count stays bounded",
        minimum=1,
        maximum=MAX_LONG_SIDE_LIMIT,
        constraints="at least one patch of the model",
    ),
    ParameterSpec(
        "crop",
        _ENGINE_DEFAULTS.crop,
        "sliding-window size in pixels, a multiple of the patch size (0 = whole image)",
        minimum=0,
        maximum=MAX_LONG_SIDE_LIMIT,
    ),
    ParameterSpec(
        "stride",
        _ENGINE_DEFAULTS.stride,
        "sliding-window stride in pixels, at most crop (0 = crop / 2)",
        minimum=0,
        maximum=MAX_LONG_SIDE_LIMIT,
    ),
    ParameterSpec(
        "score_threshold",
        _ENGINE_DEFAULTS.score_threshold,
        "pixels whose best class probability is below this are unlabeled (255)",
        minimum=0.0,
        maximum=1.0,
    ),
    ParameterSpec(
        "logit_scale",
        _ENGINE_DEFAULTS.logit_scale,
        "softmax temperature applied to the patch-text cosine similarities",
        minimum=0.0,
        maximum=POSITIVE_LIMITS["logit_scale"],
        constraints="> 0",
    ),
    ParameterSpec(
        "publish_masks",
        True,
        "publish ~/masks/<class> (mono8 0/255), computed only while someone subscribes",
    ),
    ParameterSpec(
        "publish_overlay",
        True,
        "publish ~/overlay (rgb8), computed only while someone subscribes",
    ),
    ParameterSpec(
        "publish_confidence",
        True,
        "publish ~/confidence (32FC1), computed only while someone subscribes",
    ),
    ParameterSpec(
        "overlay_alpha",
        0.5,
        "weight of the class colour in ~/overlay",
        minimum=0.0,
        maximum=1.0,
    ),
    ParameterSpec(
        "overlay_legend",
        True,
        "draw a legend on ~/overlay, top left: each class present in the frame with its colour",
    ),
    ParameterSpec(
        "max_input_pixels",
        DEFAULT_MAX_INPUT_PIXELS,
        "frames with more pixels (width x height; for compressed frames the size the data "
        "declares) are rejected before they are decoded or converted, and counted as rejected",
        minimum=1,
        maximum=2**31 - 1,
    ),
    ParameterSpec(
        "max_frame_age",
        0.0,
        "drop frames whose header stamp is older than this many seconds (0 = keep all)",
        minimum=0.0,
        maximum=3600.0,
    ),
)

SPECS: dict[str, ParameterSpec] = {spec.name: spec for spec in PARAMETERS}
ENGINE_FIELDS = tuple(field.name for field in fields(EngineConfig))
READ_ONLY = tuple(spec.name for spec in PARAMETERS if spec.read_only)
# Engine settings the worker applies with Segmenter.reconfigure.
RUNTIME_ENGINE_FIELDS = tuple(name for name in ENGINE_FIELDS if name not in READ_ONLY)
