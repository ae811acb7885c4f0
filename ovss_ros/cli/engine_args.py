"""The engine's options as command-line flags, shared by every ovss_ros command-line tool.

``--params-file`` reads the engine settings of a node params file (``config/ovss.yaml``,
``config/dslo_paper.yaml``) as the flags' defaults; flags given on the command line override
them (``parse_engine_args``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from ovss_ros.cli.tool_parser import ToolParser
from ovss_ros.core.config import (
    DSLO_AFFINITIES,
    DSLO_MODES,
    METHODS,
    REFINEMENTS,
    UPSAMPLERS,
    EngineConfig,
)
from ovss_ros.core.file_checks import read_text
from ovss_ros.core.methods.dense.forward import POS_INTERPOLATIONS
from ovss_ros.core.methods.deop.settings import POOLINGS, PROPOSAL_SOURCES
from ovss_ros.core.methods.dslo.sd2_attention import LAYER_SETS, SD_PRECISIONS
from ovss_ros.core.methods.pnp_ovss.settings import PRESENCE_MODES, REFINES
from ovss_ros.core.methods.pnp_ovss.vlm_loading import VLM_MODELS
from ovss_ros.safe_yaml import MAX_PARAMS_FILE_BYTES, load_yaml, short_repr

# EngineConfig fields whose flag has another name (dest); every other field's dest is its name.
FLAG_DEST = {
    "short_side": "size",
    "score_threshold": "threshold",
    "background_words": "background",
}
# pnp_ovss, deop, twostream: EngineConfig field -> (choices or None, help); flag --field-name.
PIPELINE_FLAGS: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "vlm_model": (VLM_MODELS, "pnp_ovss: vision-language model architecture"),
    "vlm_pretrained": (None, "pnp_ovss: BLIP ITM hub id (cached) or save_pretrained directory"),
    "pnp_image_size": (None, "pnp_ovss: square BLIP input side in pixels"),
    "pnp_layer": (None, "pnp_ovss: text-encoder layer read (1-based)"),
    "pnp_head": (None, "pnp_ovss: attention head (1-based)"),
    "pnp_threshold": (None, "pnp_ovss: class absent below this normalised map value"),
    "pnp_dropout_rounds": (None, "pnp_ovss: salience dropout rounds (a gradient pass each)"),
    "pnp_dropout_patches": (None, "pnp_ovss: patches zeroed after each round"),
    "pnp_presence": (PRESENCE_MODES, "pnp_ovss: classes in the prompt"),
    "pnp_presence_threshold": (None, "pnp_ovss: CLIP probability to count as present"),
    "pnp_blur": (None, "pnp_ovss: blur sigma as a share of the long side (0 = none)"),
    "pnp_refine": (REFINES, "pnp_ovss: final refinement (auto: crf if available, else pamr)"),
    "deop_checkpoint": (None, "deop/twostream: ovss-train-deop file ('' = training-free)"),
    "proposals": (None, "deop/twostream: at most this many mask proposals"),
    "proposal_source": (("auto", *PROPOSAL_SOURCES), "deop/twostream: mask proposals"),
    "proposal_logit_scale": (None, "deop/twostream: proposal-text softmax temperature"),
    "mask_cells": (None, "deop/twostream: proposal mask cells per patch side"),
    "superpixel_compactness": (None, "deop/twostream: SLIC compactness"),
    "cluster_iterations": (None, "deop/twostream: k-means iterations (clusters)"),
    "deop_pooling": (POOLINGS, "deop: proposal embedding (auto: cal with a checkpoint)"),
    "severance_residual": (None, "deop: residual scale of the severed last block"),
    "twostream_crop_batch": (None, "twostream: masked crops per CLIP forward"),
}


def add_pipeline_arguments(parser: argparse.ArgumentParser, base: EngineConfig) -> None:
    """--vlm-pretrained, --pnp-layer, --deop-checkpoint, ...: one flag per PIPELINE_FLAGS."""
    group = parser.add_argument_group("pnp_ovss, deop, twostream")
    types = {f.name: type(getattr(base, f.name)) for f in fields(EngineConfig)}
    for name, (choices, text) in PIPELINE_FLAGS.items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=types[name],
            default=getattr(base, name),
            choices=list(choices) if choices else None,
            help=f"{text} (default {getattr(base, name)!r})",
        )


def pipeline_config(args: argparse.Namespace) -> dict[str, object]:
    """The EngineConfig fields of the PIPELINE_FLAGS, from parsed flags."""
    return {name: getattr(args, name) for name in PIPELINE_FLAGS}


def add_engine_arguments(parser: argparse.ArgumentParser, **defaults: object) -> None:
    """Add --model, --pretrained, ... with EngineConfig's defaults unless ``defaults`` override."""
    base = EngineConfig(**defaults)
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=base.model, help="open_clip model name or config JSON")
    group.add_argument(
        "--pretrained",
        default=base.pretrained,
        help="open_clip pretrained tag, local checkpoint file, or 'none' (random weights)",
    )
    group.add_argument("--device", default=base.device, help="auto, cpu, cuda or cuda:N")
    group.add_argument("--precision", default=base.precision, choices=["fp32", "fp16", "bf16"])
    group.add_argument("--method", default=base.method, choices=list(METHODS))
    group.add_argument(
        "--pos-interpolation",
        default=base.pos_interpolation,
        choices=list(POS_INTERPOLATIONS),
        help="positional grid for other sizes: official (the method's own code) or exact",
    )
    group.add_argument(
        "--size", type=int, default=base.short_side, help="short side in pixels (0 = keep)"
    )
    group.add_argument(
        "--max-long-side",
        type=int,
        default=base.max_long_side,
        help="never feed the network a side longer than this (pixels; scales the image down)",
    )
    group.add_argument("--crop", type=int, default=base.crop, help="sliding window (0 = whole)")
    group.add_argument("--stride", type=int, default=base.stride, help="window stride")
    group.add_argument(
        "--templates", default=base.templates, help="imagenet, single, or templates joined by |"
    )
    group.add_argument(
        "--background",
        default=";".join(base.background_words),
        help="background words separated by ';'",
    )
    group.add_argument(
        "--threshold", type=float, default=base.score_threshold, help="min class probability"
    )
    group.add_argument(
        "--logit-scale", type=float, default=base.logit_scale, help="softmax temperature"
    )
    group.add_argument(
        "--area-threshold",
        type=float,
        default=base.area_threshold,
        help="drop classes labelling at most this share of the labelled pixels (SCLIP; 0 = off)",
    )
    group.add_argument("--refinement", default=base.refinement, choices=list(REFINEMENTS))
    group.add_argument("--dslo-mode", default=base.dslo_mode, choices=list(DSLO_MODES))
    group.add_argument(
        "--affinity",
        default=base.affinity,
        choices=list(DSLO_AFFINITIES),
        help="DSLO affinity: CLIP's attention (naclip, keykey, mean) or Stable Diffusion 2's "
        "(sd2: a second model, --sd-model, one more model forward per frame)",
    )
    group.add_argument("--upsample", default=base.upsample, choices=list(UPSAMPLERS))
    group.add_argument(
        "--pamr",
        action=argparse.BooleanOptionalAction,
        default=base.pamr,
        help="PAMR refinement at the input size",
    )
    group.add_argument(
        "--freecp-redundancy", type=float, default=base.freecp_redundancy, help="FreeCP T_rp"
    )
    group.add_argument(
        "--freecp-ambiguity", type=float, default=base.freecp_ambiguity, help="FreeCP T_ap"
    )
    add_pipeline_arguments(parser, base)
    _add_dslo_arguments(group, base)
    group.add_argument(
        "--params-file",
        type=Path,
        help="node params file (e.g. config/dslo_paper.yaml) whose engine settings are the "
        "defaults of these flags; flags given override them",
    )


def _add_dslo_arguments(group: argparse._ArgumentGroup, base: EngineConfig) -> None:
    """DSLO's numbers and its sd2 affinity's settings (the node's parameters of the same name)."""
    group.add_argument(
        "--sinkhorn-iterations", type=int, default=base.sinkhorn_iterations, help="DSLO ot"
    )
    group.add_argument(
        "--sinkhorn-epsilon", type=float, default=base.sinkhorn_epsilon, help="DSLO ot"
    )
    group.add_argument("--ipf-rounds", type=int, default=base.ipf_rounds, help="DSLO IPF rounds")
    group.add_argument(
        "--velocity-tau",
        type=float,
        default=base.velocity_tau,
        help="DSLO velocity: stop within tau of uniform density",
    )
    group.add_argument(
        "--sd-model",
        default=base.sd_model,
        help="affinity sd2: Stable Diffusion model, hub id or save_pretrained directory",
    )
    group.add_argument(
        "--sd-precision",
        default=base.sd_precision,
        choices=list(SD_PRECISIONS),
        help="affinity sd2: auto = fp16 on a GPU, fp32 on the CPU",
    )
    group.add_argument(
        "--sd-size", type=int, default=base.sd_size, help="affinity sd2: SD input ~size^2 px"
    )
    group.add_argument(
        "--sd-timestep", type=int, default=base.sd_timestep, help="affinity sd2: of 1000 steps"
    )
    group.add_argument(
        "--sd-noise",
        action=argparse.BooleanOptionalAction,
        default=base.sd_noise,
        help="affinity sd2: add the timestep's forward noise (fixed seed)",
    )
    group.add_argument(
        "--sd-temperature",
        type=float,
        default=base.sd_temperature,
        help="affinity sd2: softmax(log A / T) before IPF (1 = none)",
    )
    group.add_argument(
        "--sd-layers", default=base.sd_layers, choices=list(LAYER_SETS), help="affinity sd2"
    )
    group.add_argument("--sd-seed", type=int, default=base.sd_seed, help="affinity sd2: noise")


def params_file_defaults(path: Path) -> dict[str, Any]:
    """Flag defaults (argparse dests) from the engine settings of a node params file.

    The file is a ROS params file (``/**: ros__parameters: {...}`` or ``<node>:
    ros__parameters``); its node-only parameters (classes, topics, publishing) are left out.
    Raises ValueError naming the problem: missing, not a regular file, larger than
    MAX_PARAMS_FILE_BYTES, not YAML, no ros__parameters, an unknown parameter, a value of the
    wrong type.
    """
    try:
        document = load_yaml(read_text(path, "params file", MAX_PARAMS_FILE_BYTES))
    except yaml.YAMLError as error:
        raise ValueError(
            f"params file {str(path)!r} cannot be read: {' '.join(str(error).split())}"
        ) from None
    sections = (
        [
            entry["ros__parameters"]
            for entry in (document or {}).values()
            if isinstance(entry, dict) and isinstance(entry.get("ros__parameters"), dict)
        ]
        if isinstance(document, dict)
        else []
    )
    if len(sections) != 1:
        raise ValueError(
            f"params file {str(path)!r} must hold one node's ros__parameters (/**: "
            "ros__parameters: ...)"
        )
    from ovss_ros.ros.parameters import SPECS  # the node's names (imports rclpy)

    engine = {field.name: field.default for field in fields(EngineConfig)}
    defaults = {}
    for name, value in sections[0].items():
        if name not in SPECS:
            raise ValueError(f"params file {str(path)!r}: unknown parameter {short_repr(name)}")
        if name not in engine:
            continue  # a node-only parameter
        expected = type(engine[name])
        if expected is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(
                    f"params file: {name} must be a list of strings, got {short_repr(value)}"
                )
            value = ";".join(value)
        elif expected is float and type(value) is int:
            value = float(value)
        elif type(value) is not expected:
            raise ValueError(
                f"params file: {name} must be {expected.__name__}, got {type(value).__name__} "
                f"{short_repr(value)}"
            )
        defaults[FLAG_DEST.get(name, name)] = value
    return defaults


def parse_engine_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the ``--params-file`` settings as the defaults."""
    first = ToolParser(add_help=False, prog=parser.prog)
    first.add_argument("--params-file", type=Path)
    known, _ = first.parse_known_args(argv)
    if known.params_file is not None:
        try:
            parser.set_defaults(**params_file_defaults(known.params_file))
        except ValueError as error:
            parser.error(str(error))
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed flags; EngineConfig.validate reports bad combinations."""
    return EngineConfig(
        model=args.model,
        pretrained=args.pretrained,
        device=args.device,
        precision=args.precision,
        short_side=args.size,
        max_long_side=args.max_long_side,
        crop=args.crop,
        stride=args.stride,
        method=args.method,
        pos_interpolation=args.pos_interpolation,
        templates=args.templates,
        background_words=tuple(w.strip() for w in args.background.split(";") if w.strip()),
        score_threshold=args.threshold,
        logit_scale=args.logit_scale,
        area_threshold=args.area_threshold,
        refinement=args.refinement,
        dslo_mode=args.dslo_mode,
        affinity=args.affinity,
        upsample=args.upsample,
        pamr=args.pamr,
        freecp_redundancy=args.freecp_redundancy,
        freecp_ambiguity=args.freecp_ambiguity,
        **dslo_from_args(args),
        **pipeline_config(args),
    )


def dslo_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """DSLO's numbers and the sd2 settings (EngineConfig fields) from parsed flags."""
    names = ("sinkhorn_iterations", "sinkhorn_epsilon", "ipf_rounds", "velocity_tau")
    names += ("sd_model", "sd_precision", "sd_size", "sd_timestep", "sd_noise")
    names += ("sd_temperature", "sd_layers", "sd_seed")
    return {name: getattr(args, name) for name in names}
