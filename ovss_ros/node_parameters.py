"""The node's parameters: one table of names, defaults, ranges and descriptions, and their checks.

Every parameter is declared from ``PARAMETERS`` with a descriptor (description, range, read-only
flag), so ``ros2 param describe /ovss <name>`` tells a robot engineer what a value means and what
it may be. The same table drives the validation of a requested change: the node checks the
whole would-be configuration (all parameters after the change) before accepting anything, so a
rejected request changes nothing, and the worker thread never receives a configuration that the
engine would refuse.

Types are checked here, not by rclpy, for every parameter (all are declared with dynamic typing
and their descriptor's type is put back after each request): rclpy's own refusal ("expected '3'
got '2'", or a start-up failure "expecting type 'DOUBLE'") names neither the parameter nor what it
wanted. An integer is accepted wherever a floating-point number is expected, as ``ros2 param
set`` and ``-p`` type ``1`` as an integer, and stored as the float (``coerce``); every other
mismatch is refused with the parameter's name, the type given and the type expected.

Keep ``config/ovss.yaml`` in step with the defaults here (a test compares them).
"""

from __future__ import annotations

import array
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.validate_full_topic_name import validate_full_topic_name

from ovss_ros.core import ClassEntry, EngineConfig, check_query_count, parse_classes
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
from ovss_ros.core.frame_budget import (
    check_crop_batch,
    check_sd_size,
    check_vlm_image_size,
    max_crop_batch,
    vlm_max_image_size,
)
from ovss_ros.core.methods.dense.forward import POS_INTERPOLATIONS
from ovss_ros.core.methods.deop.settings import POOLINGS, PROPOSAL_SOURCES
from ovss_ros.core.methods.dslo.sd2_attention import LAYER_SETS, SD_MAX_SIZE, SD_PRECISIONS
from ovss_ros.core.methods.pnp_ovss.settings import PRESENCE_MODES, REFINES
from ovss_ros.core.methods.pnp_ovss.vlm_loading import VLM_MODELS
from ovss_ros.image_conversion import DEFAULT_MAX_INPUT_PIXELS

IMAGE_TRANSPORTS = ("raw", "compressed")
METHODS = tuple(ENGINE_METHODS)
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_CLASSES = ("person", "chair", "table", "floor", "wall", "door")
# A ROS name token: letters, digits and '_', not starting with a digit, no '__' (rcl's rules).
CAMERA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# rmw's RMW_TOPIC_MAX_NAME_LENGTH (255 - 8: the DDS "rt/" prefix and more): rcl refuses longer.
TOPIC_MAX_LENGTH = 255 - 8


class ParameterError(ValueError):
    """A parameter value was refused; ``str(error)`` is the reason given to the caller."""


@dataclass(frozen=True)
class ParameterSpec:
    """One node parameter: what it is, its default, and what values it may take."""

    name: str
    default: Any
    description: str
    read_only: bool = False
    minimum: float | None = None
    maximum: float | None = None
    constraints: str = ""
    # A maximum that the per-frame budget sets (``core.frame_budget``): a larger value is refused
    # by this check with its cost in the reason. rclpy would refuse it first with its own words
    # ("out of range") if the descriptor carried the range, so the range is in the constraints.
    budget: Callable[[Any], None] | None = None

    @property
    def type(self) -> Parameter.Type:
        if self.name in STRING_ARRAYS:
            return Parameter.Type.STRING_ARRAY
        return Parameter.Type.from_parameter_value(self.default)

    def descriptor(self) -> ParameterDescriptor:
        """The descriptor rclpy enforces (type, read-only, range) and tools display."""
        descriptor = ParameterDescriptor(
            name=self.name,
            type=self.type.value,
            description=self.description,
            additional_constraints=self.constraints,
            read_only=self.read_only,
            # Types are checked here (check_value), not by rclpy, whose refusal ("expected '3'
            # got '2'") names neither the parameter nor the types; restore_types puts the type
            # that rclpy overwrites with the requested one back.
            dynamic_typing=True,
        )
        if self.budget is not None:
            descriptor.additional_constraints = (
                f"{self.minimum} to {self.maximum} (the per-frame budget); " + self.constraints
            ).rstrip("; ")
        elif self.minimum is not None and isinstance(self.default, int):
            descriptor.integer_range = [
                IntegerRange(from_value=int(self.minimum), to_value=int(self.maximum), step=0)
            ]
        elif self.minimum is not None:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=self.minimum, to_value=self.maximum, step=0.0)
            ]
        return descriptor


STRING_ARRAYS = ("cameras", "classes", "background_words")

_ENGINE_DEFAULTS = EngineConfig()

# pnp_ovss (issue 9), deop and twostream (issue 10): their parameters, together.
PIPELINE_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec(
        "vlm_model",
        _ENGINE_DEFAULTS.vlm_model,
        "pnp_ovss: architecture of the vision-language model (the second model)",
        read_only=True,
        constraints=" | ".join(VLM_MODELS),
    ),
    ParameterSpec(
        "vlm_pretrained",
        _ENGINE_DEFAULTS.vlm_pretrained,
        "pnp_ovss: BLIP image-text-matching weights, a Hugging Face hub id (from the local "
        "cache when offline) or a directory written by save_pretrained; loaded when pnp_ovss "
        "is selected",
        read_only=True,
    ),
    ParameterSpec(
        "pnp_image_size",
        _ENGINE_DEFAULTS.pnp_image_size,
        "pnp_ovss: side of the square BLIP input in pixels",
        minimum=16,
        maximum=vlm_max_image_size(),
        constraints="a multiple of the VLM's patch size; the VLM's attention map "
        "(heads x ((size / patch)^2 + 1)^2 x 4 bytes) within the per-frame budget",
        budget=lambda size: check_vlm_image_size(size, setting="pnp_image_size"),
    ),
    ParameterSpec(
        "pnp_layer",
        _ENGINE_DEFAULTS.pnp_layer,
        "pnp_ovss: BLIP text-encoder layer whose cross-attention is read (1-based)",
        minimum=1,
        maximum=1000,
        constraints="at most the VLM's text layers",
    ),
    ParameterSpec(
        "pnp_head",
        _ENGINE_DEFAULTS.pnp_head,
        "pnp_ovss: attention head of that layer (1-based)",
        minimum=1,
        maximum=1000,
        constraints="at most the VLM's attention heads",
    ),
    ParameterSpec(
        "pnp_threshold",
        _ENGINE_DEFAULTS.pnp_threshold,
        "pnp_ovss: a class is absent where its min-max normalised map is below this",
        minimum=0.0,
        maximum=1.0,
    ),
    ParameterSpec(
        "pnp_dropout_rounds",
        _ENGINE_DEFAULTS.pnp_dropout_rounds,
        "pnp_ovss: salience dropout rounds, one BLIP forward and gradient pass each (1 = plain "
        "GradCAM)",
        minimum=1,
        maximum=50,
    ),
    ParameterSpec(
        "pnp_dropout_patches",
        _ENGINE_DEFAULTS.pnp_dropout_patches,
        "pnp_ovss: most salient patches zeroed after each round",
        minimum=1,
        maximum=100000,
    ),
    ParameterSpec(
        "pnp_presence",
        _ENGINE_DEFAULTS.pnp_presence,
        "pnp_ovss: classes put in the prompt: clip (CLIP image-level probability at least "
        "pnp_presence_threshold) or all",
        constraints=" | ".join(PRESENCE_MODES),
    ),
    ParameterSpec(
        "pnp_presence_threshold",
        _ENGINE_DEFAULTS.pnp_presence_threshold,
        "pnp_ovss: CLIP probability over the vocabulary for a class to count as present",
        minimum=0.0,
        maximum=1.0,
    ),
    ParameterSpec(
        "pnp_blur",
        _ENGINE_DEFAULTS.pnp_blur,
        "pnp_ovss: Gaussian blur sigma as a share of the image's long side (0 = none)",
        minimum=0.0,
        maximum=1.0,
    ),
    ParameterSpec(
        "pnp_refine",
        _ENGINE_DEFAULTS.pnp_refine,
        "pnp_ovss: final refinement: dense CRF (pydensecrf2), PAMR, none; auto = crf where "
        "pydensecrf2 imports, else pamr",
        constraints=" | ".join(REFINES),
    ),
    ParameterSpec(
        "deop_checkpoint",
        _ENGINE_DEFAULTS.deop_checkpoint,
        "deop/twostream: checkpoint file from ovss-train-deop (trained on this node's CLIP); "
        "empty = training-free DeOP (superpixel or cluster proposals, mean pooling)",
        constraints="an existing file, or empty",
    ),
    ParameterSpec(
        "proposals",
        _ENGINE_DEFAULTS.proposals,
        "deop/twostream: at most this many mask proposals per frame",
        minimum=1,
        maximum=1000,
    ),
    ParameterSpec(
        "proposal_source",
        _ENGINE_DEFAULTS.proposal_source,
        "deop/twostream: class-agnostic mask proposals: superpixels (SLIC), clusters (k-means "
        "of CLIP features), learned (the checkpoint's proposal head); auto = learned with such "
        "a checkpoint, else superpixels",
        constraints=" | ".join(("auto", *PROPOSAL_SOURCES)),
    ),
    ParameterSpec(
        "proposal_logit_scale",
        _ENGINE_DEFAULTS.proposal_logit_scale,
        "deop/twostream: softmax temperature of the proposal-text cosine similarities",
        minimum=0.0,
        maximum=1000.0,
        constraints="> 0",
    ),
    ParameterSpec(
        "mask_cells",
        _ENGINE_DEFAULTS.mask_cells,
        "deop/twostream: proposal mask cells per patch side",
        minimum=1,
        maximum=16,
        constraints="the checkpoint's, when its proposal head is used",
    ),
    ParameterSpec(
        "superpixel_compactness",
        _ENGINE_DEFAULTS.superpixel_compactness,
        "deop/twostream: SLIC compactness of the superpixels source (larger = squarer)",
        minimum=0.0,
        maximum=1000.0,
        constraints="> 0",
    ),
    ParameterSpec(
        "cluster_iterations",
        _ENGINE_DEFAULTS.cluster_iterations,
        "deop/twostream: k-means iterations of the clusters source",
        minimum=1,
        maximum=100,
    ),
    ParameterSpec(
        "deop_pooling",
        _ENGINE_DEFAULTS.deop_pooling,
        "deop: proposal embedding: cal (the checkpoint's anchor decoder) or mean (over the "
        "mask); auto = cal with a checkpoint, else mean",
        constraints=" | ".join(POOLINGS),
    ),
    ParameterSpec(
        "severance_residual",
        _ENGINE_DEFAULTS.severance_residual,
        "deop: residual scale of the severed last CLIP block (0.2 as released)",
        minimum=0.0,
        maximum=1.0,
    ),
    ParameterSpec(
        "twostream_crop_batch",
        _ENGINE_DEFAULTS.twostream_crop_batch,
        "twostream: masked proposal crops per CLIP forward",
        minimum=1,
        maximum=max_crop_batch(),
        constraints="the CLIP activation of the batch within the per-frame budget",
        budget=check_crop_batch,
    ),
)

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


@dataclass(frozen=True)
class Settings:
    """A validated configuration: what the engine gets and what the node itself uses."""

    engine: EngineConfig
    classes: list[ClassEntry]
    image_transport: str
    cameras: tuple[str, ...]  # empty: the single camera of the plain contract
    publish_masks: bool
    publish_overlay: bool
    publish_confidence: bool
    overlay_alpha: float
    overlay_legend: bool
    max_frame_age: float
    max_input_pixels: int


def defaults() -> dict[str, Any]:
    """Parameter name -> default value."""
    return {
        spec.name: list(spec.default) if isinstance(spec.default, list) else spec.default
        for spec in PARAMETERS
    }


def declare_parameters(node: Node) -> dict[str, Any]:
    """Declare every parameter (overrides from the command line or YAML apply) and return values.

    An integer given for a floating-point parameter is stored as the float (``coerce``); other
    values of the wrong type are declared as given and refused by ``validate``, which names the
    parameter and both types. Raises ParameterError, or rclpy's InvalidParameterValueException
    when an override of the right type is out of range.
    """
    values: dict[str, Any] = {}
    for spec in PARAMETERS:
        descriptor = spec.descriptor()
        descriptor.read_only = False  # made read-only once its value is final (typed, below)
        parameter = node.declare_parameter(spec.name, spec.default, descriptor)
        (typed,) = coerce([parameter])
        if spec.type == Parameter.Type.STRING_ARRAY and parameter.type_ == Parameter.Type.NOT_SET:
            typed = Parameter(spec.name, Parameter.Type.STRING_ARRAY, [])  # a YAML []
        if typed is not parameter:
            # A float given as an integer, or an empty list (rclpy makes [] a byte array, a YAML
            # [] is "not set"): store it as the value it means, range-checked as that.
            if spec.type == Parameter.Type.DOUBLE:
                check_value(spec, typed.value)
            result = node.set_parameters([typed])[0]
            if not result.successful:
                raise ParameterError(f"{spec.name}: {result.reason}")
            parameter = typed
        # rclpy hands out the stored descriptor (restore_types relies on that too).
        node.describe_parameter(spec.name).read_only = spec.read_only
        values[spec.name] = normalize(spec.name, parameter.value)
    restore_types(node)
    return values


def coerce(parameters: Sequence[Parameter]) -> list[Parameter]:
    """The parameters as they are meant: what rclpy's pre-set callback (and declaration) use.

    - an integer for a floating-point parameter becomes that float (``-p overlay_alpha:=1``);
    - an empty list of any type, or an unset value, for a string array becomes ``[]`` typed as a
      string array (``ros2 param set /ovss background_words '[]'``).

    Anything else is left as given, for ``validate`` to accept or refuse with a reason.
    """
    typed = []
    for parameter in parameters:
        spec = SPECS.get(parameter.name)
        kind = parameter.type_
        if (
            spec is not None
            and spec.type == Parameter.Type.DOUBLE
            and (kind == Parameter.Type.INTEGER)
        ):
            parameter = Parameter(parameter.name, Parameter.Type.DOUBLE, float(parameter.value))
        elif (
            spec is not None
            and spec.type == Parameter.Type.STRING_ARRAY
            and kind != Parameter.Type.STRING_ARRAY
            and kind.name.endswith("_ARRAY")
            and len(parameter.value) == 0
        ):
            parameter = Parameter(parameter.name, Parameter.Type.STRING_ARRAY, [])
        typed.append(parameter)
    return typed


def restore_types(node: Node) -> None:
    """Keep every parameter described with its own type.

    rclpy writes the type of a requested value into a dynamically typed parameter's descriptor
    before the set callbacks run, and leaves it there when they refuse the value.
    """
    for spec in PARAMETERS:
        if node.has_parameter(spec.name):
            node.describe_parameter(spec.name).type = spec.type.value


def normalize(name: str, value: Any) -> Any:
    """Plain Python values: arrays as lists; an unset string array is an empty list."""
    if name in STRING_ARRAYS:
        if value is None:
            return []
        if isinstance(value, list | tuple | array.array):  # rclpy gives numeric arrays as array
            return list(value)
    return value


def in_force(name: str, value: Any) -> Any:
    """An engine setting as the parameter's value (a tuple of background words as a list)."""
    return list(value) if isinstance(value, tuple) else value


def validate(values: Mapping[str, Any]) -> Settings:
    """Check a complete set of parameter values; raise ParameterError with the first reason."""
    missing = [spec.name for spec in PARAMETERS if spec.name not in values]
    if missing:
        raise ParameterError(f"missing parameters {missing}")
    for spec in PARAMETERS:
        check_value(spec, values[spec.name])
    if values["precision"] not in PRECISIONS:
        raise ParameterError(
            f"unknown precision {values['precision']!r}: use one of {list(PRECISIONS)}"
        )
    if values["image_transport"] not in IMAGE_TRANSPORTS:
        raise ParameterError(
            f"unknown image_transport {values['image_transport']!r}: "
            f"use one of {list(IMAGE_TRANSPORTS)}"
        )
    try:
        classes = parse_classes(values["classes"])
    except ValueError as error:  # VocabularyError: its text already names the problem
        raise ParameterError(str(error)) from error
    cameras = parse_cameras(values["cameras"])
    engine = engine_config(values)
    try:
        engine.validate()
        check_query_count(classes, engine.background_words)
    except ValueError as error:
        raise ParameterError(str(error)) from error
    return Settings(
        engine=engine,
        classes=classes,
        image_transport=values["image_transport"],
        cameras=cameras,
        publish_masks=values["publish_masks"],
        publish_overlay=values["publish_overlay"],
        publish_confidence=values["publish_confidence"],
        overlay_alpha=float(values["overlay_alpha"]),
        overlay_legend=values["overlay_legend"],
        max_frame_age=float(values["max_frame_age"]),
        max_input_pixels=values["max_input_pixels"],
    )


def validate_update(current: Mapping[str, Any], changes: Mapping[str, Any]) -> Settings:
    """Validate ``current`` with ``changes`` applied, refusing read-only and unknown names."""
    for name in changes:
        if name not in SPECS:
            raise ParameterError(f"unknown parameter {name!r}")
        if SPECS[name].read_only and changes[name] != current.get(name):
            raise ParameterError(f"{name} is read-only: restart the node to change it")
    merged = dict(current)
    merged.update({name: normalize(name, value) for name, value in changes.items()})
    return validate(merged)


def parse_cameras(names: Sequence[str]) -> tuple[str, ...]:
    """Check the camera names: each becomes a topic namespace, so it must be one ROS name token.

    Raises ParameterError with the first problem (the node does not start).
    """
    for index, name in enumerate(names):
        if not name:
            raise ParameterError(f"cameras: entry {index} is empty; name every camera")
        if not CAMERA_NAME.fullmatch(name) or "__" in name:
            raise ParameterError(
                f"cameras: {name!r} is not a valid ROS name token: use letters, digits and "
                "single '_', not starting with a digit (e.g. front, rear_left)"
            )
    duplicates = sorted({name for name in names if list(names).count(name) > 1})
    if duplicates:
        raise ParameterError(f"cameras: duplicate names {duplicates}; name each camera once")
    return tuple(names)


def mask_topic(prefix: str, slug: str) -> str:
    """A camera's mask topic, relative: ``~/masks/chair``, ``~/front/masks/chair``."""
    return f"{prefix}masks/{slug}"


def check_mask_topics(
    classes: Sequence[ClassEntry], prefixes: Sequence[str], resolve: Callable[[str], str]
) -> None:
    """Refuse a vocabulary whose mask topics could not be created.

    Every class of every camera gets ``<prefix>masks/<slug>``; each is resolved as the node will
    resolve it (``resolve``: the node's ``resolve_topic_name``: namespace, node name, remapping)
    and checked with rclpy's topic-name rules (at most TOPIC_MAX_LENGTH characters).
    ``prefixes``: each camera's relative output prefix (``~/`` or ``~/front/``).
    Raises ParameterError naming the class and the problem.
    """
    for prefix in prefixes:
        for index, entry in enumerate(classes):
            problem = _topic_problem(mask_topic(prefix, entry.slug), resolve)
            if problem:
                raise ParameterError(f"classes: entry {index} {quoted(entry.name, 60)}: {problem}")


def check_node_topics(
    relatives: Sequence[str], resolve: Callable[[str], str], what: str = "cameras"
) -> None:
    """Refuse start-up when one of the node's fixed topics (outputs, inputs; ``relatives`` as
    the node creates them, e.g. ``~/front/label_info``) could not be created once resolved
    (namespace, node name, camera names, remapping). Raises ParameterError naming the topic."""
    for relative in relatives:
        problem = _topic_problem(
            relative, resolve, "topic", "shorten the namespace, the node name or the camera names"
        )
        if problem:
            raise ParameterError(f"{what}: {problem}")


def _topic_problem(
    relative: str,
    resolve: Callable[[str], str],
    kind: str = "mask topic",
    fix: str = "shorten the class name (its first synonym) or the node's namespace",
) -> str | None:
    """Why ``relative`` cannot be a topic of this node, or None."""
    try:
        validate_full_topic_name(resolve(relative))
        return None
    except Exception as error:  # rcl refuses some names while resolving them (RCLError)
        reason = str(error).splitlines()[0].split(", at /")[0]
    # rcl refuses a name that resolves too long without saying how long: measure it.
    head, _, tail = relative.rpartition("/")
    try:
        stem = resolve(f"{head}/x")[:-1]
    except Exception:
        stem = None
    if stem is not None and len(stem) + len(tail) > TOPIC_MAX_LENGTH:
        return (
            f"its {kind} {stem}{tail[:20]}... would be {len(stem) + len(tail)} characters "
            f"long, more than the {TOPIC_MAX_LENGTH} that ROS allows: {fix}"
        )
    return f"its {kind} {relative!r} is not a valid ROS topic name ({reason})"


def engine_config(values: Mapping[str, Any]) -> EngineConfig:
    """The engine configuration that the parameter values describe (not yet validated)."""
    config = {name: values[name] for name in ENGINE_FIELDS if name in values}
    for name, value in config.items():  # an integer given for a float: the float it means
        if SPECS[name].type == Parameter.Type.DOUBLE and type(value) is int:
            config[name] = float(value)
    if "background_words" in config:
        config["background_words"] = tuple(
            normalize("background_words", config["background_words"])
        )
    return EngineConfig(**config)


# How a refusal names a type: as ROS users type and see them (ros2 param describe).
_TYPE_NAMES = {
    Parameter.Type.NOT_SET: "nothing (unset)",
    Parameter.Type.BOOL: "boolean",
    Parameter.Type.INTEGER: "integer",
    Parameter.Type.DOUBLE: "floating-point number",
    Parameter.Type.STRING: "string",
    Parameter.Type.BYTE_ARRAY: "byte array",
    Parameter.Type.BOOL_ARRAY: "list of booleans",
    Parameter.Type.INTEGER_ARRAY: "list of integers",
    Parameter.Type.DOUBLE_ARRAY: "list of floating-point numbers",
    Parameter.Type.STRING_ARRAY: "list of strings",
}
_EXPECTED = {
    Parameter.Type.BOOL: "a boolean (true or false)",
    Parameter.Type.INTEGER: "an integer",
    Parameter.Type.DOUBLE: "a floating-point number",
    Parameter.Type.STRING: "a string",
    Parameter.Type.STRING_ARRAY: "a list of strings (e.g. ['cat', 'dog'])",
}


def type_name(value: Any) -> str:
    """The ROS parameter type of a Python value, in words: ``1`` -> ``integer``."""
    if isinstance(value, array.array):
        value = list(value)
    try:
        return _TYPE_NAMES[Parameter.Type.from_parameter_value(value)]
    except TypeError:  # not a ROS parameter value (a list of mixed types, built in Python)
        return type(value).__name__


def quoted(value: Any, limit: int = 80) -> str:
    """``repr`` of user-given text for messages and logs: control and format characters escaped
    (a newline cannot forge a log line), long values cut with an ellipsis."""
    text = repr(list(value) if isinstance(value, array.array) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_value(spec: ParameterSpec, value: Any) -> None:
    """Type and range check; raise ParameterError naming the parameter, given and expected."""
    expected = spec.type
    if expected == Parameter.Type.STRING_ARRAY:
        if value is None:
            value = []
        if isinstance(value, array.array) or not isinstance(value, list | tuple):
            raise ParameterError(
                f"{spec.name} must be {_EXPECTED[expected]}, got {type_name(value)} "
                f"{quoted(value)}"
            )
        whole = type_name(list(value))
        if value and whole.startswith("list of") and whole != "list of strings":
            raise ParameterError(
                f"{spec.name} must be {_EXPECTED[expected]}, got {whole} {quoted(value)}"
            )
        for index, entry in enumerate(value):  # a list of mixed types (from Python)
            if not isinstance(entry, str):
                raise ParameterError(
                    f"{spec.name} must be {_EXPECTED[expected]}: entry {index} is "
                    f"{type_name(entry)} {quoted(entry)}"
                )
        return
    if (
        expected == Parameter.Type.DOUBLE
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        value = float(value)
    python_type = {
        Parameter.Type.BOOL: bool,
        Parameter.Type.INTEGER: int,
        Parameter.Type.DOUBLE: float,
        Parameter.Type.STRING: str,
    }[expected]
    wrong = not isinstance(value, python_type) or (python_type is int and isinstance(value, bool))
    if wrong:
        raise ParameterError(
            f"{spec.name} must be {_EXPECTED[expected]}, got {type_name(value)} {quoted(value)}"
        )
    if spec.budget is not None and value > spec.maximum:
        try:
            spec.budget(value)
        except ValueError as error:  # FrameBudgetError: the cost of the value and the limit
            raise ParameterError(str(error)) from None
    if spec.minimum is not None and not spec.minimum <= value <= spec.maximum:
        raise ParameterError(
            f"{spec.name} must be in [{spec.minimum}, {spec.maximum}], got {value}"
        )
