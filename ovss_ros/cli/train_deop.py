"""ovss-train-deop: train DeOP's CAL decoder (and prompt context, proposal head) with CLIP frozen.

    ovss-train-deop coco_stuff ~/data/coco_stuff164k --output runs/deop --device cuda
    ovss-train-deop voc ~/data/VOCdevkit/VOC2012 --steps 20000 --prompt-length 16
    ovss-train-deop folder my_set/ --steps 500 --device cpu

Trains on the seen classes of the zero-shot split (COCO-Stuff 156/15, VOC 15/5; a folder set
may list its unseen classes in unseen.txt) and validates on all classes: mIoU on seen, unseen and
their harmonic mean. Writes ``<output>/checkpoint.pt`` (the file ``deop.checkpoint`` takes, also
the resume point) every --checkpoint-every steps and at the end, and ``<output>/metrics.json``.
--resume continues from ``<output>/checkpoint.pt``. Exit status 0 done, 2 bad arguments, data,
model or checkpoint (one line on stderr; every image and label is checked from its header before
the model loads), 1 the run folder could not be written.
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


def build_parser() -> ToolParser:
    """ovss-train-deop's flags: its own, the training run's (``TrainingConfig``), and the
    engine settings it takes (``ENGINE_SETTINGS``, from the schema)."""
    base = TrainingConfig()
    parser = ToolParser(prog="ovss-train-deop", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=DATASETS, help="data set layout")
    parser.add_argument("root", help="data set root folder")
    parser.add_argument("--output", "-o", default="deop_run", help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder")
    add_engine_arguments(parser, ENGINE_SETTINGS, params_file=False)  # CLIP, frozen
    run = parser.add_argument_group("training")
    run.add_argument("--steps", type=int, default=base.steps)
    run.add_argument("--batch-size", type=int, default=base.batch_size)
    run.add_argument("--lr", type=float, default=base.lr)
    run.add_argument("--prompt-lr", type=float, default=base.prompt_lr)
    run.add_argument("--weight-decay", type=float, default=base.weight_decay)
    run.add_argument("--crop", type=int, default=base.crop, help="training crop (pixels)")
    run.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=(base.scale_min, base.scale_max),
        metavar=("MIN", "MAX"),
        help="random scale of the short side vs the crop",
    )
    run.add_argument("--proposal-source", default=base.proposal_source, choices=PROPOSAL_SOURCES)
    run.add_argument("--proposals", type=int, default=base.proposals)
    run.add_argument(
        "--prompt-length",
        type=int,
        default=base.prompt_length,
        help="learned prompt context tokens (0: the templates)",
    )
    run.add_argument("--loss", default=base.loss, choices=LOSSES)
    run.add_argument("--checkpoint-every", type=int, default=base.checkpoint_every)
    run.add_argument("--validate-every", type=int, default=base.validate_every)
    run.add_argument("--val-images", type=int, default=base.val_images, help="0: all")
    run.add_argument(
        "--val-size",
        type=int,
        default=base.val_short_side,
        help="validation short side (0: the crop)",
    )
    run.add_argument("--workers", type=int, default=base.workers, help="data loader processes")
    add_max_input_pixels_argument(parser)
    run.add_argument("--seed", type=int, default=base.seed)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    for action in run._group_actions:  # every training flag shows its default (TrainingConfig)
        if action.default not in (None, False) and "%(default)" not in (action.help or ""):
            action.help = f"{action.help or ''} (default: %(default)s)".strip()
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    return TrainingConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        prompt_lr=args.prompt_lr,
        weight_decay=args.weight_decay,
        crop=args.crop,
        scale_min=args.scale[0],
        scale_max=args.scale[1],
        proposal_source=args.proposal_source,
        proposals=args.proposals,
        prompt_length=args.prompt_length,
        templates=args.templates,
        loss=args.loss,
        checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every,
        val_images=args.val_images,
        val_short_side=args.val_size,
        workers=args.workers,
        seed=args.seed,
        progress=not args.no_progress,
    )


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
        config = config_from_args(args)
        config.validate()
        output = Path(args.output).expanduser()
        if os.path.lexists(output) and not output.is_dir():
            raise ValueError(f"--output {str(output)!r} exists and is not a folder")
        if (output / CHECKPOINT_NAME).exists() and not args.resume:
            raise ValueError(
                f"--output {str(output)!r} holds an earlier run's {CHECKPOINT_NAME}: --resume "
                "continues it; a new run needs another folder"
            )
        data = training_data(args.dataset, args.root)
        data.check(args.max_input_pixels)
        make_output_folder(output)
        import torch  # arguments and data checked: the model libraries

        from ovss_ros.core.clip.model_loading import load_clip
        from ovss_ros.training.deop_training import train

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
        summary = train(clip, data, config, args.output, resume=args.resume)
    except (FileNotFoundError, ModelLoadError, ValueError, FloatingPointError) as error:
        # ValueError: CheckpointError (a bad --resume checkpoint) too
        logger.error("%s", reason(error))
        return 2
    except OSError as error:  # writing the run folder (disk full, permissions): not the input
        logger.error("%s", reason(error))
        return 1
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written whole (renamed into place)
        saved = Path(args.output).expanduser() / CHECKPOINT_NAME
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
