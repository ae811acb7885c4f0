"""ovss-bench: latency per stage and end to end, against the bare open_clip image-encoder forward.

    ovss-bench --pretrained none --combos naclip naclip+dslo naclip+freecp+pamr --device cpu
    ovss-bench --pretrained none --dslo-sd-model DIR --combos vanilla+dslo:naclip vanilla+dslo:sd2

A combo is the base method, then refinements joined by '+': ``dslo[-ot|-velocity][:affinity]``
(affinity naclip, keykey, mean or sd2; default ``--dslo-affinity``), ``freecp``, ``pamr``,
``jbu``. With ``:sd2`` the Stable Diffusion model (``--dslo-sd-model``) is loaded for that
combo: its
attention forward counts in the encoder stage.

The methods with their own pipeline fill the same columns with their own steps: pnp_ovss
(``--pnp-vlm-pretrained``): preprocess = both squashed inputs, encoder = CLIP's image-level
presence forward, head = the GradCAM rounds (one BLIP ITM forward and gradient pass per dropout
round), postprocess = threshold, blur, CRF/PAMR, argmax; deop, twostream and superpixel_clip:
encoder = CLIP blocks 1..L-1 and the proposals, head = proposal embeddings and classification
(deop and superpixel_clip: the severed last block; twostream: one CLIP forward per proposal
crop), postprocess = semantic inference at the input size. ``superpixel_clip+p50`` sets 50
proposals (deop needs ``--deop-checkpoint``).

One frame goes through: decode (sensor_msgs/Image -> numpy, as the node does), preprocess,
encoder (dense CLIP forward), head (text logits and refinement), postprocess (upsampling,
softmax, labels back on the host), publish (label and overlay messages built and serialised, as
rclpy does before sending). Stages are timed with a device synchronisation after each (which adds
stalls on a GPU); the end-to-end time of a frame is the sum of its stages, so every end-to-end
figure is at least that of each of its stages. Rows (the bare forward and each combo) are
interleaved, one frame each per round, so that noise from the machine falls on all rows alike;
each row's spread (interquartile range) is printed with it, and a line per round shows progress
on stderr. The bare forward is open_clip's
own ``VisionTransformer.forward`` at the same input size (positional embedding resized): the
floor that one CLIP forward per frame sets. All figures come from one process and one run.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ovss_ros.cli.bench_report import STAGES, print_report, summary
from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args, parse_engine_args
from ovss_ros.cli.tool_parser import (
    INTERRUPTED,
    ToolParser,
    log_once_to_stderr,
    not_an_input,
    one_line,
    writable_folder,
)
from ovss_ros.core.config import PIPELINE_METHODS, EngineConfig
from ovss_ros.ros.image_conversion import (
    DEFAULT_MAX_INPUT_PIXELS,
    image_file_to_rgb8,
    image_to_rgb8,
    mono8_to_image,
    rgb8_to_image,
)

if TYPE_CHECKING:  # the model libraries are imported once the arguments are checked
    import torch

    from ovss_ros.core.segmenter import Segmenter

VOC_SAMPLE = (
    "/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc/"
    "JPEGImages/2011_000003.jpg"
)
DEFAULT_CLASSES = ["person", "chair", "table", "floor", "wall", "door", "cup", "bottle"]


def parse_combo(combo: str, affinity: str = EngineConfig().dslo.affinity) -> dict[str, object]:
    """``naclip+dslo-ot:sd2+pamr+jbu`` -> engine settings by full dotted name (base mode first,
    then refinements), as ``Segmenter.reconfigure`` takes them.

    ``affinity``: DSLO's affinity where a ``dslo`` part names none.
    """
    base, *parts = combo.split("+")
    settings: dict[str, object] = {"method": base, "refinement": "none", "dense.pamr": False}
    settings["dense.upsample"] = "bilinear"
    settings["dslo.affinity"] = affinity
    for part in parts:
        if base in PIPELINE_METHODS and part[:1] == "p" and part[1:].isdigit():
            settings["deop.proposals"] = int(part[1:])
        elif part.startswith("dslo"):
            settings["refinement"] = "dslo"
            part, _, named = part.partition(":")
            if named:
                settings["dslo.affinity"] = named
            if "-" in part:
                settings["dslo.mode"] = part.split("-", 1)[1]
        elif part == "freecp":
            settings["refinement"] = "freecp"
        elif part == "pamr":
            settings["dense.pamr"] = True
        elif part == "jbu":
            settings["dense.upsample"] = "jbu"
        else:
            raise ValueError(
                f"unknown part {part!r} in {combo!r}: dslo[-ot|-velocity][:affinity], freecp, "
                "pamr, jbu (deop/twostream/superpixel_clip: pN, N proposals)"
            )
    return settings


def synchronizer(device: torch.device) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def bare_encoder(segmenter: Segmenter, size: tuple[int, int]) -> torch.nn.Module:
    """open_clip's image tower with its positional embedding resized to ``size``."""
    import torch

    from ovss_ros.core.methods.dense.forward import interpolate_pos_embed

    visual = copy.deepcopy(segmenter.clip.model.visual)
    patch = segmenter.clip.patch_size
    grid = (size[0] // patch, size[1] // patch)
    visual.positional_embedding = torch.nn.Parameter(interpolate_pos_embed(visual, grid))
    visual.grid_size = grid
    return visual


def publish(rgb: np.ndarray, segmentation, header) -> None:
    """The publish stage: label and overlay messages built and serialised, as rclpy sends."""
    from rclpy.serialization import serialize_message

    from ovss_ros.core.drawing import overlay

    serialize_message(mono8_to_image(segmentation.labels, header))
    serialize_message(rgb8_to_image(overlay(rgb, segmentation), header))


def time_frame(segmenter: Segmenter, message) -> list[float]:
    """Seconds of each stage (STAGES order) of one frame, each ended by a device sync."""
    sync = synchronizer(segmenter.device)
    header = message.header
    marks = [time.perf_counter()]
    rgb = image_to_rgb8(message)
    marks.append(time.perf_counter())
    pixels = segmenter.method.preprocess(rgb)
    sync()
    marks.append(time.perf_counter())
    encoded = segmenter.method.encode(pixels)
    sync()
    marks.append(time.perf_counter())
    logits, scores = segmenter.method.head(encoded)
    sync()
    marks.append(time.perf_counter())
    seg = segmenter.method.postprocess(encoded, logits, scores, rgb.shape[:2])
    marks.append(time.perf_counter())
    publish(rgb, seg, header)
    marks.append(time.perf_counter())
    return [stop - start for start, stop in zip(marks, marks[1:], strict=False)]


def pipeline_stages(segmenter: Segmenter, rgb: np.ndarray) -> tuple[list[Callable], object]:
    """The steps of a pnp_ovss / deop / twostream / superpixel_clip frame for the columns
    preprocess, encoder, head, postprocess: callables each taking the previous one's result."""
    from ovss_ros.core.methods.deop.proposal_segmentation import Frames, tokens_before_last_block
    from ovss_ros.core.methods.deop.published import ReleaseFrames

    core = segmenter.pipeline.core
    if segmenter.pipeline.method == "pnp_ovss":
        state: dict[str, object] = {}

        def presence(inputs):
            state["pixels"], clip_pixels = inputs
            state["present"] = core.present_classes(clip_pixels)

        def saliency(_):
            return core.saliency(state["pixels"], state["present"])

        def post(maps):
            return core.postprocess(maps, state["present"], rgb, rgb.shape[:2])

        return [lambda _: core.preprocess(rgb), presence, saliency, post]

    def encoder(pixels):
        if isinstance(core, ReleaseFrames):  # the release's MaskFormer gives the proposals
            return core.prepare_resized(pixels, [rgb])
        grid = (pixels.shape[-2] // core.patch, pixels.shape[-1] // core.patch)
        frames = Frames([rgb], pixels, None, grid)
        if core.needs_tokens():
            frames.tokens, frames.grid = tokens_before_last_block(core.clip.model.visual, pixels)
        frames.proposals = core.propose(frames)
        return frames

    return [
        lambda _: core.preprocess(rgb),
        encoder,
        core.scores,
        lambda scores: core.postprocess(scores[0], rgb.shape[:2]),
    ]


def time_pipeline_frame(segmenter: Segmenter, message) -> list[float]:
    """time_frame for the pipeline methods (their steps: pipeline_stages)."""
    sync = synchronizer(segmenter.device)
    header = message.header
    marks = [time.perf_counter()]
    rgb = image_to_rgb8(message)
    marks.append(time.perf_counter())
    value = None
    for step in pipeline_stages(segmenter, rgb):
        value = step(value)
        sync()
        marks.append(time.perf_counter())
    publish(rgb, value, header)
    marks.append(time.perf_counter())
    return [stop - start for start, stop in zip(marks, marks[1:], strict=False)]


def time_rows(
    segmenter: Segmenter,
    message,
    combos: dict[str, dict[str, object]],
    iterations: int,
    warmup: int,
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, dict[str, object]]]:
    """Bare forward and every combo, interleaved: round r times one frame of each row in turn,
    so that machine noise (other processes, clocks, heat) falls on every row alike.

    A combo's end-to-end time is the sum of its stages in the same iteration, so each of its
    figures (median, p95, quartiles) is at least that of any of its stages. ``progress``: one
    line per round on stderr. Returns (bare forward summary, combo -> figures).
    """
    import torch

    from ovss_ros.core.methods.dense.method import DenseMethod

    rgb = image_to_rgb8(message)
    # the dense preprocessing, whichever method is in force (the bare forward's input)
    dense = DenseMethod(segmenter.clip, segmenter.text, segmenter.config)
    pixels = dense.preprocess(rgb)
    visual = bare_encoder(segmenter, tuple(pixels.shape[-2:]))
    sync = synchronizer(segmenter.device)
    bare: list[float] = []
    stages = {combo: [] for combo in combos}  # combo -> per iteration, seconds per stage
    rounds = warmup + iterations
    for round_index in range(rounds):
        timed = round_index >= warmup
        started = time.perf_counter()
        with torch.inference_mode():
            visual(pixels)
        sync()
        figures = {"bare": time.perf_counter() - started}
        for combo, changes in combos.items():
            segmenter.reconfigure(changes)
            pipeline = segmenter.pipeline
            # PnP-OVSS needs gradients (its GradCAM); everything else runs without autograd.
            with torch.inference_mode(pipeline is None or pipeline.method != "pnp_ovss"):
                timer = time_frame if pipeline is None else time_pipeline_frame
                frame = timer(segmenter, message)
            figures[combo] = sum(frame)
            if timed:
                stages[combo].append(frame)
        if timed:
            bare.append(figures["bare"])
        if progress:
            kind = "timed" if timed else "warm-up"
            rows = ", ".join(f"{row} {1000 * t:.0f} ms" for row, t in figures.items())
            print(f"round {round_index + 1}/{rounds} ({kind}): {rows}", file=sys.stderr)
            sys.stderr.flush()
    results = {}
    for combo, frames in stages.items():
        per_stage = np.array(frames).T  # (stages, iterations)
        results[combo] = {
            "stages": {name: summary(list(t)) for name, t in zip(STAGES, per_stage, strict=True)},
            "end_to_end": summary(list(per_stage.sum(axis=0))),
        }
    return summary(bare), results


MAX_FRAME = DEFAULT_MAX_INPUT_PIXELS  # the benchmark frame is bounded like a camera frame


def test_message(path: str, width: int, height: int):
    """The benchmark frame: the image file resized to width x height, as a sensor_msgs/Image."""
    from std_msgs.msg import Header

    rgb = image_file_to_rgb8(Path(path))
    rgb = cv2.resize(rgb, (width, height))
    return rgb8_to_image(np.ascontiguousarray(rgb), Header(frame_id="camera"))


def build_parser() -> ToolParser:
    """ovss-bench's flags: its own, then every engine setting's (``engine_args``)."""
    parser = ToolParser(prog="ovss-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=VOC_SAMPLE, help="test image (resized to the size)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--classes", nargs="+", default=DEFAULT_CLASSES)
    parser.add_argument("--combos", nargs="+", default=None, help="e.g. naclip naclip+dslo+jbu")
    parser.add_argument("--iterations", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--json", help="write the figures to this file")
    add_engine_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_engine_args(parser, argv)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be at least 1 and --warmup at least 0")
    if args.threads < 0:
        parser.error(f"--threads must be at least 0 (0 = torch's default), got {args.threads}")
    if not (1 <= args.width and 1 <= args.height and args.width * args.height <= MAX_FRAME):
        parser.error(
            f"--width and --height must be at least 1 and make at most {MAX_FRAME} pixels "
            f"(the node's default max_input_pixels), got {args.width}x{args.height}"
        )
    if args.json is not None:
        try:
            not_an_input(args.json, [args.image, *filter(None, [args.params_file])], "--json")
            writable_folder(Path(args.json).expanduser().absolute().parent, "--json")
        except ValueError as error:
            parser.error(str(error))
    handler = log_once_to_stderr()
    try:
        return run(args, config_from_args(args))
    except KeyboardInterrupt:  # Ctrl-C: figures of a part of the rounds would mislead
        print("ovss-bench: interrupted; nothing reported", file=sys.stderr)
        return INTERRUPTED
    finally:
        logging.getLogger().removeHandler(handler)


def run(args, config: EngineConfig) -> int:
    """The benchmark for checked arguments: 0, or 2 with one line on stderr for what cannot
    run (a combo, the image, the model)."""
    combos = args.combos or [config.method]
    try:  # everything checkable without the model first: a typo should not cost its import
        settings = [parse_combo(c, config.dslo.affinity) for c in combos]
        config.validate()
        message = test_message(args.image, args.width, args.height)
        import torch

        from ovss_ros.core.segmenter import Segmenter

        if args.threads:
            torch.set_num_threads(args.threads)
        segmenter = Segmenter(config)
        segmenter.set_classes(args.classes)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"ovss-bench: error: {one_line(error)}", file=sys.stderr)
        return 2
    rows = dict(zip(combos, settings, strict=True))
    release_rows = []  # run on the DeOP release's file: its own input size
    for combo, changes in rows.items():  # refuse a combo that cannot run before timing any
        try:
            segmenter.reconfigure(changes)
        except (ValueError, RuntimeError) as error:  # ModelLoadError, CheckpointError too
            print(f"ovss-bench: error: combo {combo}: {one_line(error)}", file=sys.stderr)
            return 2
        release_rows += [combo] * hasattr(getattr(segmenter.pipeline, "core", 0), "released")
    print(
        f"ovss-bench: {args.warmup} warm-up and {args.iterations} timed rounds of "
        f"{len(rows) + 1} rows (bare forward, {', '.join(rows)}), interleaved",
        file=sys.stderr,
    )
    bare, results = time_rows(segmenter, message, rows, args.iterations, args.warmup)
    report = {
        "device": str(segmenter.device),
        "model": config.model,
        "input": [args.width, args.height],
        "short_side": config.short_side,
        "dense.crop": config.dense.crop,
        "dslo.sd.model": config.dslo.sd.model,  # for the combos with the sd2 affinity
        "dslo.sd.size": config.dslo.sd.size,
        "threads": torch.get_num_threads(), "release_rows": release_rows,
        "bare_forward": bare,
        "combos": results,
    }
    print_report(report)
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as file:
                json.dump(report, file, indent=2)
        except OSError as error:  # the figures are printed above: a failure while running
            print(f"ovss-bench: error: --json not written: {one_line(error)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
