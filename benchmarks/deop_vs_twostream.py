"""DeOP's one-pass classification (one CLIP pass, proposals classified from the severed dense
features) against the two-stream baseline (one CLIP pass per masked proposal crop), in one run,
same proposals. Without a checkpoint the one-pass side is ``SuperpixelClip`` (DeOP's pipeline,
training-free: ``method: superpixel_clip``), the rows' "deop"; the trained heads add little.

    python benchmarks/deop_vs_twostream.py --device cpu --counts 25 50 100

Per frame: the median end-to-end ``segment`` time of each method at each proposal count, the
ratio two-stream / DeOP, and the share of the proposals (SLIC superpixels, training-free, the
same for both methods) in it. Random weights (``--pretrained none`` by default): speed does not
depend on the weights. DeOP reports 4.37 (DeOP) vs 1.11 (two-stream) FPS on COCO-Stuff on a GPU,
a ratio of 3.9.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import cv2
import numpy as np
import torch

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.deop.deop import DeopConfig, SuperpixelClip
from ovss_ros.core.methods.deop.twostream import TwoStream, TwoStreamConfig

VOC_SAMPLE = (
    "/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc/"
    "JPEGImages/2011_000003.jpg"
)
CLASSES = ["person", "chair", "table", "floor", "wall", "door", "cup", "bottle"]


def frame(width: int, height: int) -> np.ndarray:
    """The VOC sample resized to the camera size (noise when the sample is missing)."""
    bgr = cv2.imread(VOC_SAMPLE)
    if bgr is None:
        return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.cvtColor(cv2.resize(bgr, (width, height)), cv2.COLOR_BGR2RGB)


def median_ms(run, iterations: int, sync) -> float:
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        sync()
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--counts", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--twostream-iterations", type=int, default=1)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    clip = load_clip(args.model, args.pretrained, args.device)
    sync = torch.cuda.synchronize if clip.device.type == "cuda" else (lambda: None)
    rgb = frame(*args.size)
    common = {"short_side": args.short_side, "templates": "single"}
    deop = SuperpixelClip(clip, DeopConfig(**common))
    two = TwoStream(clip, TwoStreamConfig(**common))
    for method in (deop, two):
        method.set_classes(CLASSES)
    deop.segment(rgb)  # warm-up (allocations, first-call overheads)
    rows = []
    print(
        f"{args.model} pretrained={args.pretrained} {args.device} {args.size[0]}x{args.size[1]}, "
        f"short side {args.short_side}, {torch.get_num_threads()} threads, "
        f"{len(CLASSES)} classes"
    )
    print("proposals | deop ms | twostream ms | twostream/deop | proposals ms | crops")
    for count in args.counts:
        deop.reconfigure(proposals=count)  # DeopConfig's own field (methods/deop/run_config.py)
        two.reconfigure(proposals=count)
        with torch.inference_mode():
            frames = deop.prepare([rgb])
        crops = int(frames.proposals.count[0])
        propose = median_ms(lambda f=frames: deop.propose(f), args.iterations, sync)
        deop_ms = median_ms(lambda: deop.segment(rgb), args.iterations, sync)
        two_ms = median_ms(lambda: two.segment(rgb), args.twostream_iterations, sync)
        row = {
            "proposals": count,
            "crops": crops,
            "deop_ms": deop_ms,
            "twostream_ms": two_ms,
            "ratio": two_ms / deop_ms,
            "proposals_ms": propose,
        }
        rows.append(row)
        print(
            f"{count} | {deop_ms:.0f} | {two_ms:.0f} | {row['ratio']:.2f} | {propose:.0f} | "
            f"{crops}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
