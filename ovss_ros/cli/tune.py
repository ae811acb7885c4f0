"""ovss-tune: choose PnP-OVSS settings without segmentation labels, as the paper does.

    ovss-tune photos/ --classes person dog "tv; monitor" --image-labels labels.json -o tuned.yaml

The paper's and its release's procedure (ovss_ros/core/methods/pnp_ovss/release_tuning.py):
each trial is a layer, head and attention threshold (min_att); each image is prompted with its
classes (``--image-labels``, image-level labels; else ``--presence-lists``, class lists in the
release's JSON layout; else CLIP presence with the starting settings, ovss_ros's substitute),
one GradCAM round; each class's mask is judged by a second CLIP (``--reward-model``,
ViT-L-14-336 ``openai`` by default, from the local cache when offline: refused before any work
if missing): the reward is the number of classes CLIP finds more probable in the image masked
by the class's mask than in a black image. Random annealing over layers x heads x
``--thresholds`` (0.05..0.45), 34 trials (``--budget``). The starting settings are always the
first trial and always inside the search space
(``tune_space``). The best settings are printed and written as a ROS 2 params file
(``/**: ros__parameters:``, the PnP-OVSS settings nested under ``pnp:``) for the node
(``--params-file``) and the other tools (``--params-file``), with the classes tuned on and every
setting the node needs to run as the tuned run did (``node_parameters``). Exit status: 0 written,
1 the params file could not be written, 2 bad input (one line on stderr), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args
from ovss_ros.cli.input_limits import add_max_input_pixels_argument
from ovss_ros.cli.segment import image_files
from ovss_ros.cli.tool_parser import (
    BAD_INPUT,
    FAILED,
    INTERRUPTED,
    ToolParser,
    not_an_input,
    one_line,
    writable_folder,
)
from ovss_ros.cli.tune_release import label_source, search_release
from ovss_ros.cli.tune_space import (
    flag_texts,
    given_flags,
    int_list,
    refuse_start_outside,
    search_space,
    space_values,
    start_inside,
)
from ovss_ros.core.clip.errors import ModelLoadError
from ovss_ros.core.config import EngineConfig
from ovss_ros.core.methods.pnp_ovss.presence_lists import lists_argument
from ovss_ros.core.methods.pnp_ovss.settings import TUNING_CLIP, TUNING_TRIALS, PnpSettings
from ovss_ros.core.vocabulary import VocabularyError
from ovss_ros.ros.image_conversion import ImageConversionError, ImageTooLarge, image_file_to_rgb8

if TYPE_CHECKING:  # the model libraries are imported once the arguments are checked
    from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss
    from ovss_ros.core.methods.pnp_ovss.tuning import SearchSpace

__all__ = ["build_parser", "int_list", "main", "node_parameters"]

logger = logging.getLogger("ovss-tune")
THRESHOLDS = "0.05,0.15,0.25,0.35,0.45"  # the release's search grid (np.arange(0.05, 0.5, 0.1))
# The engine settings ovss-tune takes (flags from the schema): CLIP's, and every PnP-OVSS one.
SHARED = ("model", "pretrained", "device", "precision", "templates")
ENGINE_SETTINGS = SHARED + tuple(f"pnp.{name}" for name in asdict(PnpSettings()))
# Its flags before the settings were namespaced (ovss-tune --layer 8): refused with the new one.
OLD_FLAGS = {
    f"--{name.replace('_', '-')}": f"--pnp-{name.replace('_', '-')}"
    for name in asdict(PnpSettings())
    if not name.startswith("vlm")
}


# What a node needs besides CLIP's and PnP-OVSS's settings to run as the tuned run did: the
# scores were measured without a probability threshold and without background words (pnp_ovss
# makes its own background), whatever another params file loaded before this one sets.
RUN_AS_TUNED = {"score_threshold": 0.0, "background_words": []}


def node_parameters(
    config: EngineConfig, classes: Sequence[str] = ()
) -> dict[str, dict[str, dict[str, object]]]:
    """The params-file content that makes the node run the tuned settings as ovss-tune ran them:
    method pnp_ovss, CLIP's model, weights, precision and templates, ``RUN_AS_TUNED``, the
    ``classes`` tuned on (if any) and every PnP-OVSS setting of ``config`` (nested under ``pnp``,
    as ROS 2 nests ``pnp.layer``). The device is left to the node (``device: auto``)."""
    parameters: dict[str, object] = {
        "method": "pnp_ovss",
        "model": config.model,
        "pretrained": config.pretrained,
        "precision": config.precision,
        "templates": config.templates,
        **RUN_AS_TUNED,
    }
    if classes:
        parameters["classes"] = list(classes)
    parameters["pnp"] = asdict(config.pnp)
    return {"/**": {"ros__parameters": parameters}}


def local_paths_absolute(config: EngineConfig) -> EngineConfig:
    """``config`` with each of its model, weights and VLM that names an existing local file or
    folder as an absolute path: the node is started from another folder than the tool."""
    changes = {}
    for name in ("model", "pretrained", "pnp.vlm_pretrained"):
        value = str(config.flat()[name])
        path = Path(value).expanduser()
        if value not in ("", "none") and path.exists():
            changes[name] = str(path.absolute())
    return config.replace(changes) if changes else config


def build_parser() -> ToolParser:
    """ovss-tune's flags: its own, the search space, then its engine settings' (the schema's
    CLIP and PnP-OVSS settings; the ``pnp`` ones are the first trial, fixed unless searched)."""
    parser = ToolParser(prog="ovss-tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="unlabeled image files or folders")
    parser.add_argument("--classes", nargs="+", required=True, help="class names ('a; synonym')")
    parser.add_argument("--output", "-o", default="pnp_ovss_tuned.yaml", help="params file")
    parser.add_argument(
        "--budget", type=int, default=TUNING_TRIALS, help="number of settings to try"
    )
    parser.add_argument(
        "--image-labels",
        type=Path,
        help="JSON: image file stem -> its classes (names of --classes or 1-based positions)",
    )
    parser.add_argument(
        "--presence-lists",
        type=lists_argument,
        help="per-image class lists in the PnP-OVSS release's JSON layout (without "
        "--image-labels); default: CLIP presence",
    )
    parser.add_argument(
        "--reward-model", default=TUNING_CLIP[0], help="the CLIP that judges the masks"
    )
    parser.add_argument(
        "--reward-pretrained", default=TUNING_CLIP[1], help="its weights (tag or file)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random annealing seed")
    parser.add_argument("--max-images", type=int, default=0, help="use the first N (0 = all)")
    add_max_input_pixels_argument(parser)
    space = parser.add_argument_group(
        "search space (1-based layers and heads)",
        "The first trial is --pnp-layer, --pnp-head, --pnp-threshold: one "
        "given outside the space is refused; a default outside it becomes the searched value "
        "nearest to it.",
    )
    space.add_argument("--layers", default="", help="e.g. 6-10 (default: every text layer)")
    space.add_argument("--heads", default="", help="e.g. 1-12 (default: every head)")
    space.add_argument("--thresholds", default=THRESHOLDS, help="comma-separated")
    add_engine_arguments(parser, ENGINE_SETTINGS, params_file=False)
    parser.renamed_flags |= OLD_FLAGS
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        return tune(args, given_flags(argv))
    except KeyboardInterrupt:  # Ctrl-C: nothing written (the params file is the last step)
        print("ovss-tune: interrupted; no params file written", file=sys.stderr)
        return INTERRUPTED


def prepare(args: argparse.Namespace, given: set[str]) -> tuple[list[Path], PnpOvss, SearchSpace]:
    """Check the arguments, then load the models: the images to read, the pipeline with the
    first trial's settings (inside the search space) and its vocabulary, the search space.
    Raises what main reports as bad input (OSError, ModelLoadError, VocabularyError,
    ValueError)."""
    config = config_from_args(args)
    start = config.pnp
    if args.budget < 1:
        raise ValueError(f"--budget must be at least 1 (settings to try), got {args.budget}")
    if args.max_images < 0:
        raise ValueError(f"--max-images must be at least 0 (0 = all), got {args.max_images}")
    files = image_files(args.inputs)[: args.max_images or None]
    if not files:
        raise FileNotFoundError("no images found in the inputs")
    not_an_input(args.output, files, "--output")
    writable_folder(Path(args.output).expanduser().absolute().parent, "--output")
    # the search space's flags and the first trial in it, before the models load
    refuse_start_outside(start, space_values(args), given, flag_texts(args))
    start.validate()
    args.labels = label_source(args, files)
    from ovss_ros.core.clip.model_loading import load_clip  # arguments checked: the models
    from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss
    from ovss_ros.core.methods.pnp_ovss.vlm_loading import load_vlm

    clip = load_clip(config.model, config.pretrained, config.device, config.precision)
    vlm = load_vlm(start.vlm_model, start.vlm_pretrained, config.device, config.precision)
    space = search_space(args, vlm.num_layers, vlm.num_heads)
    start = start_inside(start, space, given)
    pipeline = PnpOvss(clip, vlm, start, templates=config.templates)
    pipeline.set_classes(args.classes)
    for candidate in space.candidates():  # refuse a bad space before any work
        pipeline.check(replace(start, **candidate))
    from ovss_ros.core.methods.pnp_ovss.release_tuning import RewardClip

    # the judge: a CLIP missing offline is refused before any work, as the other models
    args.judge = RewardClip.of(load_clip(args.reward_model, args.reward_pretrained, config.device))
    return files, pipeline, space


def tune(args: argparse.Namespace, given: set[str]) -> int:
    """The run after parsing: 0 written, 1 the params file could not be written, 2 bad input."""
    try:
        files, pipeline, space = prepare(args, given)
    except (OSError, ModelLoadError, VocabularyError, ValueError) as error:
        logger.error("%s", one_line(error))
        return BAD_INPUT
    images = []
    for path in files:  # bounded before decoding, stored pixel grid (EXIF ignored)
        try:
            images.append((path, image_file_to_rgb8(path, max_pixels=args.max_input_pixels)))
        except ImageTooLarge as error:
            logger.warning("skipping %s: %s", path, error)
        except (ImageConversionError, OSError) as error:
            logger.warning("skipping %s: not a readable image (%s)", path, error)
    if not images:
        logger.error("no readable images")
        return BAD_INPUT
    start = pipeline.settings
    present = [args.labels(pipeline, path, rgb) for path, rgb in images]
    images = [rgb for _, rgb in images]
    best, summary = search_release(args, pipeline, space, images, present)
    tuned = local_paths_absolute(replace(config_from_args(args), pnp=replace(start, **best)))
    return write_params(args, tuned, summary)


def write_params(args: argparse.Namespace, tuned: EngineConfig, result: str) -> int:
    """Write the params file: 0, or 1 when it cannot be written (one line on stderr)."""
    header = (
        f"# PnP-OVSS settings chosen by ovss-tune (the paper's CLIP reward, no segmentation "
        f"labels): {result}, tuned on device {args.device}\n"
        f"# ovss_node --ros-args --params-file {Path(args.output).name}\n"
    )
    content = yaml.safe_dump(node_parameters(tuned, args.classes), sort_keys=False)
    output = Path(args.output).expanduser()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(header + content)
    except OSError as error:  # checked writable before the work: a full disk, a lost mount
        logger.error("%s", one_line(f"--output {str(output)!r} not written: {error}"))
        return FAILED
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
