"""Cost of a frame against the number of classes and the frame size, measured in one run.

    .venv/bin/python benchmarks/postprocess_cost.py            # ViT-B-16, random weights, CPU
    .venv/bin/python benchmarks/postprocess_cost.py --case classes --rounds 7

Two cases, each timed in interleaved rounds (the order rotates every round) so that slow phases
of a loaded machine hit every variant alike:

* ``classes``: ``Segmenter.segment`` of one 640x480 frame with 10, 100 and 1000 classes (single
  template); the vocabulary is set before each timing (its text is cached after the first round
  and not timed).
* ``size``: ``segment`` of 640x480, 1920x1080 and 4000x3000 frames with 10 classes; the network
  input has the same short side for all three (448), so for the two 4:3 frames the difference
  is the full-resolution post-processing and the resize of the frame; the 16:9 frame's network
  input is wider (448x796: 1.35x the patches), hence its own bare forward's column.

Every round also times the bare dense forward (``preprocess`` + ``encode`` of the 640x480 frame:
the network alone, no text head, no post-processing), and in the size case that of each frame.
Printed per variant: the median time, the median and interquartile range of the per-round
ratios to the round's first variant (10 classes, 640x480) and to the round's bare forward.
Ratios only mean something within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.methods.dense.candidates import candidate_queries, support_radius


def vocabulary(count: int) -> list[str]:
    return [f"object number {i}" for i in range(count)]


def quartiles(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return f"{median:.2f} [{low:.2f}, {high:.2f}]"


def bare_forward(segmenter: Segmenter, rgb: np.ndarray) -> float:
    method = segmenter.method
    start = time.perf_counter()
    with torch.inference_mode():
        method.encode(method.preprocess(rgb))
    return time.perf_counter() - start


def timed_segment(segmenter: Segmenter, rgb: np.ndarray) -> float:
    start = time.perf_counter()
    segmenter.segment(rgb)
    return time.perf_counter() - start


def candidates(segmenter: Segmenter, rgb: np.ndarray) -> int:
    """How many class queries get full-resolution argmax work for ``rgb`` (``candidates.py``)."""
    method = segmenter.method
    with torch.inference_mode():
        encoded = method.encode(method.preprocess(rgb))
        logits, _ = method.head(encoded)
    scaled = logits[0, : method._class_queries] * method.config.dense.logit_scale
    radius = support_radius(rgb.shape[:2], tuple(logits.shape[-2:]), False, False)
    return len(candidate_queries(scaled, radius))


def run_case(segmenter: Segmenter, case: str, rounds: int, rng: np.random.Generator) -> None:
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    if case == "classes":
        variants = {f"{n} classes": (n, frame) for n in (10, 100, 1000)}
    else:
        variants = {
            f"{w}x{h}": (10, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in ((640, 480), (1920, 1080), (4000, 3000))
        }
    names = list(variants)
    for count, rgb in variants.values():  # warm-up: text cache, allocator, kernels
        segmenter.set_classes(vocabulary(count))
        timed_segment(segmenter, rgb)
    times = {name: [] for name in names}
    forward = []
    own = {name: [] for name in names}  # size case: the bare forward of each frame's own input
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        forward.append(bare_forward(segmenter, frame))
        for name in order:
            count, rgb = variants[name]
            segmenter.set_classes(vocabulary(count))
            times[name].append(timed_segment(segmenter, rgb))
            if case == "size":
                own[name].append(bare_forward(segmenter, rgb))
    if case == "classes":
        for name, (count, rgb) in variants.items():
            segmenter.set_classes(vocabulary(count))
            print(f"{name}: {candidates(segmenter, rgb)} of {count} class queries can win")
    first = times[names[0]]
    print(f"\n{case}: {rounds} rounds, bare forward median {statistics.median(forward):.3f} s")
    extra = " | x its own bare forward" if case == "size" else ""
    print(f"| {case} | segment s (median) | x {names[0]} (median [IQR]) | x bare forward{extra} |")
    print("|---|---|---|---|" + ("---|" if extra else ""))
    for name in names:
        mine = times[name]
        to_first = [a / b for a, b in zip(mine, first, strict=True)]
        to_forward = [a / b for a, b in zip(mine, forward, strict=True)]
        line = f"| {name} | {statistics.median(mine):.3f} | {quartiles(to_first)} | "
        line += f"{quartiles(to_forward)} |"
        if extra:
            line += f" {quartiles([a / b for a, b in zip(mine, own[name], strict=True)])} |"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--case", choices=("classes", "size", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the random weights, so that runs prune the same candidates
    config = EngineConfig(model=args.model, pretrained="none", device="cpu", templates="single")
    segmenter = Segmenter(config)
    print(
        f"{args.model} random weights, CPU {args.threads} threads, short side "
        f"{config.short_side}, bilinear, no PAMR, logit scale {config.dense.logit_scale}"
    )
    rng = np.random.default_rng(0)
    for case in ("classes", "size") if args.case == "both" else (args.case,):
        run_case(segmenter, case, args.rounds, rng)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
