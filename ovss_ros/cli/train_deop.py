"""ovss-train-deop: train DeOP as released, stage by stage, with CLIP frozen.

    ovss-train-deop coco_stuff ~/data/coco_stuff164k --stage prompt -o runs/prompt
    ovss-train-deop coco_stuff ~/data/coco_stuff164k --stage proposals -o runs/proposals \
        --prompt runs/prompt/prompt.pth
    ovss-train-deop coco_stuff ~/data/coco_stuff164k --stage deop -o runs/deop \
        --proposal-network runs/proposals/proposal_model.pth --prompt runs/prompt/prompt.pth

Stages (the release's three steps, its schedules as defaults): ``prompt`` (the learned prompt
context alone on ground-truth-mask crops; writes ``prompt.pth``), ``proposals`` (the MaskFormer
proposal network on the seen classes; ``proposal_model.pth``), ``deop`` (learned positions, the
CAL decoder with slot queries and the prompt end to end, the proposal network frozen;
``model_final.pth`` in the release's layout, which ``method: deop`` loads as the published
system). ``head`` trains this project's earlier DeOP-style head (superpixels, clusters or a small
proposal head, one joint stage; ``checkpoint.pt``, which ``deop.checkpoint`` still loads: not
the published system). Trains on the seen classes of the zero-shot split (COCO-Stuff 156/15, VOC
15/5; a folder set may list its unseen classes in unseen.txt) and validates on all classes: mIoU
on seen, unseen and their harmonic mean (``metrics.json``). --resume continues a run from its
folder. Exit status 0 done, 2 bad arguments, data, model or checkpoint (one line on stderr; every
image and label is checked from its header before the model loads), 1 the run folder could not
be written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ovss_ros.cli.engine_args import add_engine_arguments
from ovss_ros.cli.input_limits import add_max_input_pixels_argument
from ovss_ros.cli.tool_parser import INTERRUPTED, ToolParser
from ovss_ros.core.clip.errors import ModelLoadError
from ovss_ros.core.methods.deop.settings import PROPOSAL_SOURCES
from ovss_ros.training.deop_data import DATASETS, training_data
from ovss_ros.training.stage_config import STAGES
from ovss_ros.training.training_config import (
    CHECKPOINT_NAME,
    LOSSES,
    TrainingConfig,
    json_safe,
)

logger = logging.getLogger("ovss-train-deop")


# The engine settings ovss-train-deop takes (flags from the schema): the frozen CLIP's, and the
# templates of the text side without a learned prompt (TrainingConfig.templates).
ENGINE_SETTINGS = ("model", "pretrained", "device", "precision", "templates")


HEAD_ONLY = ("prompt_lr", "scale", "proposal_source", "proposals", "loss")
RELEASED_ONLY = (
    "pad", "short_sides", "clip_norm", "warmup_steps", "per_class", "architecture",
    "proposal_network", "prompt",
)  # fmt: skip
PROMPT_ONLY = ("warmup_steps", "per_class")  # the released stages only stage prompt reads
NOT_PROMPT = ("pad", "short_sides", "val_size", "no_color_aug")  # ... and those it does not read


def refused_by(dest: str, stage: str) -> bool:
    """Whether ``--stage stage`` refuses the flag of ``dest`` (it does not read it): what
    ``check_stage_flags`` refuses and ``--help`` leaves out of the flag's defaults."""
    if stage == "head":
        return dest in RELEASED_ONLY or dest == "no_color_aug"
    if dest in HEAD_ONLY:
        return True
    return dest in (NOT_PROMPT if stage == "prompt" else PROMPT_ONLY)


def build_parser() -> ToolParser:
    """ovss-train-deop's flags: its own, the training run's (per stage: ``TrainingConfig`` for
    ``head``, ``released_defaults`` for the released stages), and the engine settings it takes
    (``ENGINE_SETTINGS``, from the schema)."""
    parser = ToolParser(prog="ovss-train-deop", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=DATASETS, help="data set layout")
    parser.add_argument("root", help="data set root folder")
    parser.add_argument(
        "--stage", required=True, choices=(*STAGES, "head"), help="what to train (see above)"
    )
    parser.add_argument("--output", "-o", default="deop_run", help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder")
    add_engine_arguments(parser, ENGINE_SETTINGS, params_file=False)  # CLIP, frozen
    run = parser.add_argument_group("training (defaults: the stage's released values)")
    run.add_argument("--steps", type=int)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--lr", type=float)
    run.add_argument("--weight-decay", type=float)
    run.add_argument("--crop", type=int, help="training crop (pixels)")
    run.add_argument("--checkpoint-every", type=int)
    run.add_argument("--validate-every", type=int)
    run.add_argument("--val-images", type=int, help="0: all")
    run.add_argument("--val-size", type=int, help="validation short side")
    run.add_argument("--prompt-length", type=int, help="learned prompt context tokens")
    run.add_argument("--workers", type=int, help="data loader processes")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    released = parser.add_argument_group("stages proposals, prompt, deop")
    released.add_argument("--pad", type=int, help="padded training input side")
    released.add_argument("--short-sides", type=int, nargs="+", help="training short sides")
    released.add_argument("--clip-norm", type=float, help="full-model gradient clipping (0: off)")
    released.add_argument(
        "--no-color-aug", action="store_true", help="proposals, deop: no SSD colour jitter"
    )
    released.add_argument("--warmup-steps", type=int, help="prompt: constant warm-up steps")
    released.add_argument("--per-class", type=int, help="prompt: mask crops per class")
    released.add_argument(
        "--architecture", help="proposals: r101c (default), r50 or a JSON file of its sizes"
    )
    released.add_argument("--proposal-network", help="deop: the trained proposal network")
    released.add_argument("--prompt", help="proposals, deop: stage prompt's prompt.pth")
    head = parser.add_argument_group("stage head")
    head.add_argument("--prompt-lr", type=float)
    head.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"))
    head.add_argument("--proposal-source", choices=PROPOSAL_SOURCES)
    head.add_argument("--proposals", type=int)
    head.add_argument("--loss", choices=LOSSES)
    add_max_input_pixels_argument(parser)
    for action in [*run._group_actions, *released._group_actions, *head._group_actions]:
        defaults = stage_defaults(action.dest)
        if defaults:
            action.help = f"{action.help or ''} (default: {defaults})".strip()
    return parser


def stage_defaults(dest: str) -> str:
    """``head X; proposals Y; ...`` for a training flag's destination ('' for none)."""
    from dataclasses import fields

    from ovss_ros.training.stage_config import StageConfig, released_defaults

    head = {f.name: f.default for f in fields(TrainingConfig)}
    head["val_size"], head["scale"] = (
        head["val_short_side"],
        (head["scale_min"], head["scale_max"]),
    )
    released = {f.name: f.default for f in fields(StageConfig)}
    parts = []
    if dest in head and not refused_by(dest, "head") and dest != "seed":
        parts.append(f"head {head[dest]}")
    if dest in released and dest not in ("seed", "stage"):
        for stage in STAGES:
            if refused_by(dest, stage):
                continue
            value = released_defaults(stage).get(dest, released[dest])
            if isinstance(value, tuple):
                value = " ".join(str(v) for v in value) or "-"
            parts.append(f"{stage} {value}")
    return "; ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_stage_flags(args: argparse.Namespace) -> None:
    """ValueError for a flag the chosen stage does not read (``refused_by``)."""
    for name in (*HEAD_ONLY, *RELEASED_ONLY, *NOT_PROMPT, *PROMPT_ONLY):
        value = getattr(args, name)
        if value not in (None, False) and refused_by(name, args.stage):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does not apply to --stage {args.stage}")


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The head stage's run: TrainingConfig's defaults where a flag is not given."""
    base = TrainingConfig()
    pick = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "prompt_lr": args.prompt_lr, "weight_decay": args.weight_decay, "crop": args.crop,
        "proposal_source": args.proposal_source, "proposals": args.proposals,
        "prompt_length": args.prompt_length, "loss": args.loss,
        "checkpoint_every": args.checkpoint_every, "validate_every": args.validate_every,
        "val_images": args.val_images, "val_short_side": args.val_size,
        "workers": args.workers,
    }  # fmt: skip
    values = {k: v for k, v in pick.items() if v is not None}
    scale = args.scale or (base.scale_min, base.scale_max)
    return TrainingConfig(
        **values,
        scale_min=scale[0],
        scale_max=scale[1],
        templates=args.templates,
        seed=args.seed,
        progress=not args.no_progress,
    )


def stage_config_from_args(args: argparse.Namespace):
    """A released stage's StageConfig (ValueError for a bad value)."""
    from ovss_ros.training.stage_runner import stage_config

    names = (
        "steps", "batch_size", "lr", "weight_decay", "crop", "checkpoint_every",
        "validate_every", "val_images", "prompt_length", "workers", "pad", "short_sides",
        "clip_norm", "warmup_steps", "per_class",
    )  # fmt: skip
    overrides = {name: getattr(args, name) for name in names}
    overrides |= {
        "val_size": args.val_size,
        "templates": args.templates,
        "seed": args.seed,
        "progress": not args.no_progress,
        "color_aug": False if args.no_color_aug else None,
    }
    return stage_config(args.stage, overrides)


def reason(error: BaseException) -> str:
    """An error as one line; an error raised in a data loader worker carries the worker's
    traceback in its text (PyTorch's ``ExceptionWrapper``): only its last line is the reason."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return " ".join(lines)


def make_output_folder(output: Path) -> None:
    """Create the run folder ``output`` (and its parents) before the model loads: ValueError
    naming the path when it cannot be one (a file on its path, a read-only or missing place):
    bad input like any other, not a failure half-way through training."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocking = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
        why = (
            f"{str(blocking)!r} is not a folder"
            if blocking is not None
            else (error.strerror or str(error))
        )
        raise ValueError(f"--output {str(output)!r} cannot be made a folder: {why}") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        check_stage_flags(args)
        head = args.stage == "head"
        config = config_from_args(args) if head else stage_config_from_args(args)
        config.validate()
        output = Path(args.output).expanduser()
        if os.path.lexists(output) and not output.is_dir():
            raise ValueError(f"--output {str(output)!r} exists and is not a folder")
        if head and (output / CHECKPOINT_NAME).exists() and not args.resume:
            raise ValueError(
                f"--output {str(output)!r} holds an earlier run's {CHECKPOINT_NAME}: --resume "
                "continues it; a new run needs another folder"
            )
        if not head:
            from ovss_ros.training.stage_runner import check_stage_inputs

            check_stage_inputs(
                args.stage,
                output,
                args.resume,
                args.proposal_network,
                args.prompt,
                args.architecture,
            )
        data = training_data(args.dataset, args.root)
        data.check(args.max_input_pixels)
        make_output_folder(output)
        import torch  # arguments and data checked: the model libraries

        from ovss_ros.core.clip.model_loading import load_clip

        torch.manual_seed(args.seed)  # the same random CLIP weights for pretrained none
        clip = load_clip(args.model, args.pretrained, args.device, args.precision)
        logger.info(
            "%s: %d training images, %d validation images, %d classes (%d unseen)",
            data.name,
            len(data.train),
            len(data.val),
            len(data.classes),
            len(data.unseen),
        )
        if head:
            from ovss_ros.training.deop_training import train

            summary = train(clip, data, config, args.output, resume=args.resume)
        else:
            from ovss_ros.training.stage_runner import run_released

            summary = run_released(
                clip,
                data,
                config,
                output,
                args.resume,
                args.proposal_network,
                args.prompt,
                args.architecture,
            )
    except (FileNotFoundError, ModelLoadError, ValueError, FloatingPointError) as error:
        # ValueError: CheckpointError (a bad --resume checkpoint) too
        logger.error("%s", reason(error))
        return 2
    except OSError as error:  # writing the run folder (disk full, permissions): not the input
        logger.error("%s", reason(error))
        return 1
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written whole (renamed into place)
        saved = Path(args.output).expanduser() / (
            CHECKPOINT_NAME if args.stage == "head" else "training_state.pt"
        )
        kept = (
            f"the last checkpoint is {saved} (continue with --resume)"
            if saved.is_file()
            else "no checkpoint was written"
        )
        print(f"ovss-train-deop: interrupted; {kept}", file=sys.stderr)
        return INTERRUPTED
    logger.info("done: %s", json.dumps(json_safe(summary["validation"]), allow_nan=False))
    print(json.dumps(json_safe(summary), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
