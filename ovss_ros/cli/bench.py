"""ovss-bench: latency per stage and end to end, against the bare open_clip image-encoder forward.

    ovss-bench --pretrained none --combos naclip naclip+dslo naclip+freecp+pamr --device cpu

One frame goes through: decode (sensor_msgs/Image -> numpy, as the node does), preprocess,
encoder (dense CLIP forward), head (text logits and refinement), postprocess (upsampling,
softmax, labels back on the host), publish (label and overlay messages built and serialised, as
rclpy does before sending). Stages are timed with a device synchronisation after each, which adds
stalls; the end-to-end figure is timed separately without them. The bare forward is open_clip's
own ``VisionTransformer.forward`` at the same input size (positional embedding resized): the
floor that one CLIP forward per frame sets. All figures come from one process and one run.

The methods with their own pipeline fill the same columns with their own steps: pnp_ovss
(``--vlm-pretrained``): preprocess = both squashed inputs, encoder = CLIP's image-level presence
forward, head = the GradCAM rounds (one BLIP ITM forward and gradient pass per dropout round),
postprocess = threshold, blur, CRF/PAMR, argmax; deop and twostream: encoder = CLIP blocks
1..L-1 and the proposals, head = proposal embeddings and classification (deop: the severed last
block; twostream: one CLIP forward per proposal crop), postprocess = semantic inference at the
input size. ``deop+p50`` sets 50 proposals.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
from rclpy.serialization import serialize_message
from std_msgs.msg import Header

from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args
from ovss_ros.core import Segmenter, overlay
from ovss_ros.core.config import PIPELINE_METHODS
from ovss_ros.core.dense_clip import interpolate_pos_embed
from ovss_ros.core.proposal_segmentation import Frames, tokens_before_last_block
from ovss_ros.image_conversion import image_to_rgb8, mono8_to_image, rgb8_to_image

STAGES = ("decode", "preprocess", "encoder", "head", "postprocess", "publish")
VOC_SAMPLE = (
    "/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc/"
    "JPEGImages/2011_000003.jpg"
)
DEFAULT_CLASSES = ["person", "chair", "table", "floor", "wall", "door", "cup", "bottle"]


def parse_combo(combo: str) -> dict[str, object]:
    """``naclip+dslo-ot+pamr+jbu`` -> engine settings (base mode first, then refinements)."""
    base, *parts = combo.split("+")
    settings: dict[str, object] = {"method": base, "refinement": "none", "pamr": False}
    settings["upsample"] = "bilinear"
    for part in parts:
        if base in PIPELINE_METHODS and part[:1] == "p" and part[1:].isdigit():
            settings["proposals"] = int(part[1:])
        elif part.startswith("dslo"):
            settings["refinement"] = "dslo"
            if "-" in part:
                settings["dslo_mode"] = part.split("-", 1)[1]
        elif part == "freecp":
            settings["refinement"] = "freecp"
        elif part == "pamr":
            settings["pamr"] = True
        elif part == "jbu":
            settings["upsample"] = "jbu"
        else:
            raise ValueError(
                f"unknown part {part!r} in {combo!r}: dslo[-ot|-velocity], freecp, pamr, jbu "
                "(deop/twostream: pN, N proposals)"
            )
    return settings


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def summary(samples: list[float]) -> dict[str, float]:
    """Median and 95th percentile in milliseconds."""
    ms = sorted(1000.0 * s for s in samples)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {"median_ms": statistics.median(ms), "p95_ms": p95}


def bare_encoder(segmenter: Segmenter, size: tuple[int, int]) -> torch.nn.Module:
    """open_clip's image tower with its positional embedding resized to ``size``."""
    visual = copy.deepcopy(segmenter.clip.model.visual)
    patch = segmenter.clip.patch_size
    grid = (size[0] // patch, size[1] // patch)
    visual.positional_embedding = torch.nn.Parameter(interpolate_pos_embed(visual, grid))
    visual.grid_size = grid
    return visual


def time_combo(segmenter: Segmenter, message, iterations: int, warmup: int) -> dict[str, object]:
    """Per-stage times (synchronised) and end-to-end times (not) of one engine setting."""
    sync = synchronizer(segmenter.device)
    header = message.header
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    end_to_end: list[float] = []

    def publish(rgb, seg) -> None:
        serialize_message(mono8_to_image(seg.labels, header))
        serialize_message(rgb8_to_image(overlay(rgb, seg), header))

    with torch.inference_mode():
        for i in range(warmup + iterations):
            marks = [time.perf_counter()]
            rgb = image_to_rgb8(message)
            marks.append(time.perf_counter())
            pixels = segmenter.preprocess(rgb)
            sync()
            marks.append(time.perf_counter())
            encoded = segmenter.encode(pixels)
            sync()
            marks.append(time.perf_counter())
            logits, scores = segmenter.head(encoded)
            sync()
            marks.append(time.perf_counter())
            seg = segmenter.postprocess(encoded, logits, scores, rgb.shape[:2])
            marks.append(time.perf_counter())
            publish(rgb, seg)
            marks.append(time.perf_counter())
            if i >= warmup:
                for name, start, stop in zip(STAGES, marks, marks[1:], strict=False):
                    stages[name].append(stop - start)
        for i in range(warmup + iterations):
            start = time.perf_counter()
            rgb = image_to_rgb8(message)
            publish(rgb, segmenter.segment(rgb))
            if i >= warmup:
                end_to_end.append(time.perf_counter() - start)
    return {
        "stages": {name: summary(samples) for name, samples in stages.items()},
        "end_to_end": summary(end_to_end),
    }


def pipeline_stages(segmenter: Segmenter, rgb: np.ndarray) -> tuple[list[Callable], object]:
    """The steps of a pnp_ovss / deop / twostream frame for the columns preprocess, encoder,
    head, postprocess: callables each taking the previous one's result."""
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


def time_pipeline(segmenter: Segmenter, message, iterations: int, warmup: int) -> dict:
    """time_combo for pnp_ovss, deop and twostream (their steps: pipeline_stages)."""
    sync = synchronizer(segmenter.device)
    header = message.header
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    end_to_end: list[float] = []

    def publish(rgb, seg) -> None:
        serialize_message(mono8_to_image(seg.labels, header))
        serialize_message(rgb8_to_image(overlay(rgb, seg), header))

    for i in range(warmup + iterations):
        marks = [time.perf_counter()]
        rgb = image_to_rgb8(message)
        marks.append(time.perf_counter())
        value = None
        with torch.inference_mode(segmenter.pipeline.method != "pnp_ovss"):
            for step in pipeline_stages(segmenter, rgb):
                value = step(value)
                sync()
                marks.append(time.perf_counter())
        publish(rgb, value)
        marks.append(time.perf_counter())
        if i >= warmup:
            for name, start, stop in zip(STAGES, marks, marks[1:], strict=False):
                stages[name].append(stop - start)
    for i in range(warmup + iterations):
        start = time.perf_counter()
        rgb = image_to_rgb8(message)
        publish(rgb, segmenter.segment(rgb))
        if i >= warmup:
            end_to_end.append(time.perf_counter() - start)
    return {
        "stages": {name: summary(samples) for name, samples in stages.items()},
        "end_to_end": summary(end_to_end),
    }


def time_bare(segmenter: Segmenter, message, iterations: int, warmup: int) -> dict[str, float]:
    rgb = image_to_rgb8(message)
    pixels = segmenter.preprocess(rgb)
    visual = bare_encoder(segmenter, tuple(pixels.shape[-2:]))
    sync = synchronizer(segmenter.device)
    samples = []
    with torch.inference_mode():
        for i in range(warmup + iterations):
            start = time.perf_counter()
            visual(pixels)
            sync()
            if i >= warmup:
                samples.append(time.perf_counter() - start)
    return summary(samples)


def test_message(path: str, width: int, height: int):
    bgr = cv2.imread(path)
    if bgr is None:
        raise FileNotFoundError(f"image {path!r} not readable")
    rgb = cv2.cvtColor(cv2.resize(bgr, (width, height)), cv2.COLOR_BGR2RGB)
    return rgb8_to_image(np.ascontiguousarray(rgb), Header(frame_id="camera"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovss-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=VOC_SAMPLE, help="test image (resized to the size)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--classes", nargs="+", default=DEFAULT_CLASSES)
    parser.add_argument("--combos", nargs="+", default=None, help="e.g. naclip naclip+dslo+jbu")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--json", help="write the figures to this file")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    combos = args.combos or [config.method]
    try:
        settings = [parse_combo(c) for c in combos]
        segmenter = Segmenter(config)
        segmenter.set_classes(args.classes)
        message = test_message(args.image, args.width, args.height)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"ovss-bench: {error}", file=sys.stderr)
        return 2
    bare = time_bare(segmenter, message, args.iterations, args.warmup)
    results = {}
    for combo, changes in zip(combos, settings, strict=True):
        try:
            segmenter.reconfigure(**changes)
        except (ValueError, RuntimeError) as error:  # ModelLoadError, CheckpointError too
            print(f"ovss-bench: {combo}: {error}", file=sys.stderr)
            return 2
        timer = time_pipeline if segmenter.pipeline is not None else time_combo
        results[combo] = timer(segmenter, message, args.iterations, args.warmup)
    report = {
        "device": str(segmenter.device),
        "model": config.model,
        "input": [args.width, args.height],
        "short_side": config.short_side,
        "crop": config.crop,
        "threads": torch.get_num_threads(),
        "bare_forward": bare,
        "combos": results,
    }
    print_report(report)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    return 0


def print_report(report: dict) -> None:
    bare = report["bare_forward"]["median_ms"]
    first = next(iter(report["combos"].values()))["end_to_end"]["median_ms"]
    print(
        f"{report['model']} on {report['device']} ({report['threads']} threads), "
        f"{report['input'][0]}x{report['input'][1]} input, short side {report['short_side']}, "
        f"crop {report['crop'] or 'whole image'}"
    )
    print(
        f"bare open_clip forward: median {bare:.1f} ms, p95 {report['bare_forward']['p95_ms']:.1f}"
    )
    header = "combo".ljust(28) + "".join(s[:8].rjust(9) for s in STAGES)
    print(header + "   e2e med   e2e p95  /bare  /first")
    for combo, result in report["combos"].items():
        stages = "".join(f"{result['stages'][s]['median_ms']:9.1f}" for s in STAGES)
        e2e = result["end_to_end"]
        print(
            f"{combo[:28]:<28}{stages}{e2e['median_ms']:10.1f}{e2e['p95_ms']:10.1f}"
            f"{e2e['median_ms'] / bare:7.2f}{e2e['median_ms'] / first:8.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
