"""Cost of extreme frame shapes with the long-side bound, against an ordinary 640x480 frame.

    .venv/bin/python benchmarks/frame_bounds.py     # ViT-B-16, random weights, CPU

For each shape: the network input the engine builds (``Segmenter.network_size``), its patch
count, the attention memory one last-block head map of that many patches needs, what the shape
cost before the bound (short side scaled only), and the measured time of ``segment`` (median of
``--iterations`` after one warm-up), as a ratio to the 640x480 frame measured in the same run.
The old sizes are computed, never run: the 16x1 one needs gigabytes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.segmenter import resized_size

SHAPES = [(480, 640), (16, 1), (4, 1), (1, 16), (1, 100000), (100000, 1), (1, 1), (1080, 5760)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--max-long-side", type=int, default=EngineConfig.max_long_side)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = EngineConfig(
        model=args.model,
        pretrained="none",
        device=args.device,
        short_side=args.short_side,
        max_long_side=args.max_long_side,
        templates="single",
    )
    segmenter = Segmenter(config)
    segmenter.set_classes(["person", "chair", "table", "floor", "wall", "door", "cup", "bottle"])
    patch, heads = segmenter.patch, segmenter.clip.model.visual.transformer.resblocks[-1].attn
    heads = heads.num_heads
    rng = np.random.default_rng(0)
    print(
        f"{args.model} {args.device} short side {args.short_side}, long side <= "
        f"{args.max_long_side}, {heads} heads, fp32"
    )
    print(
        "| frame | network input (before) | patches (before) | attention GB (before) | "
        "segment ms | x 640x480 |"
    )
    print("|---|---|---|---|---|---|")
    baseline = None
    for height, width in SHAPES:
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        new = segmenter.method.network_size(height, width)
        old = resized_size(height, width, args.short_side, patch, max_long_side=10**9)
        patches = [(h // patch) * (w // patch) for h, w in (new, old)]
        gigabytes = [n * n * heads * 4 / 1e9 for n in patches]
        segmenter.segment(rgb)
        times = []
        for _ in range(args.iterations):
            start = time.perf_counter()
            segmenter.segment(rgb)
            times.append(time.perf_counter() - start)
        ms = 1000 * statistics.median(times)
        baseline = baseline or ms
        print(
            f"| {height}x{width} | {new[0]}x{new[1]} ({old[0]}x{old[1]}) | {patches[0]} "
            f"({patches[1]}) | {gigabytes[0]:.2f} ({gigabytes[1]:.2f}) | {ms:.0f} | "
            f"{ms / baseline:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
