"""The node parameters of the PnP-OVSS (issue 9), DeOP and two-stream (issue 10) pipelines.

Part of the node's parameter table (``parameter_table.PARAMETERS`` places them after
``method``); defaults are the engine's (``EngineConfig``), ranges and choices the engine's
modules' own (``core.pnp_ovss``, ``core.proposals``, ``core.deop``, ``core.frame_budget``).
"""

from __future__ import annotations

from ovss_ros.core import EngineConfig
from ovss_ros.core.frame_budget import (
    check_crop_batch,
    check_vlm_image_size,
    max_crop_batch,
    vlm_max_image_size,
)
from ovss_ros.core.methods.deop.settings import POOLINGS, PROPOSAL_SOURCES
from ovss_ros.core.methods.pnp_ovss.settings import PRESENCE_MODES, REFINES
from ovss_ros.core.methods.pnp_ovss.vlm_loading import VLM_MODELS
from ovss_ros.ros.parameter_spec import ParameterSpec

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
