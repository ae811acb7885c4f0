"""Peak memory of one frame against the number of text queries: chunked postprocess vs the whole
softmax at once (what the engine did before), each measured in a fresh process.

    .venv/bin/python benchmarks/query_memory.py            # 640x480, CPU, tiny model

Every query needs a logit map at the input size before the softmax; done at once that is
``3 x queries x H x W x 4`` bytes (logits, scaled logits, probabilities). The engine reduces a
chunk of maps at a time (``POSTPROCESS_ELEMENTS``). The model does not matter for this stage:
the tiny test model keeps the run short. Figures: peak RSS growth of one ``segment`` call (after
a warm-up on a small frame) and its time, as ratios to 8 queries in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TINY = Path(__file__).resolve().parents[1] / "test" / "data" / "tiny-vit.json"


def whole_softmax(segmenter, rgb: np.ndarray) -> None:
    """The former postprocess: every query map at the input size, one softmax."""
    with torch.inference_mode():
        encoded = segmenter.encode(segmenter.preprocess(rgb))
        logits = segmenter.to_image(segmenter.head(encoded)[0], encoded, False)
        logits = F.interpolate(logits[None], rgb.shape[:2], mode="bilinear")[0]
        probs = torch.softmax(segmenter.config.logit_scale * logits, dim=0)
        owner = segmenter._query_owner.view(-1, 1, 1).expand_as(probs)
        per_label = probs.new_zeros((len(segmenter.classes) + 1, *rgb.shape[:2]))
        per_label.scatter_reduce_(0, owner, probs, reduce="amax", include_self=True)
        per_label.max(dim=0)


def measure(queries: int, mode: str, height: int, width: int) -> dict:
    from ovss_ros.core import EngineConfig, Segmenter

    config = EngineConfig(model=str(TINY), pretrained="none", device="cpu", templates="single")
    segmenter = Segmenter(config)
    per_class = 2 if queries > 1000 else 1
    segmenter.set_classes(
        [";".join(f"thing {i} {s}" for s in range(per_class)) for i in range(queries // per_class)]
    )
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    run = segmenter.segment if mode == "chunked" else lambda x: whole_softmax(segmenter, x)
    run(rgb[:16, :16])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    run(rgb)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mib": (peak - before) / 1024, "s": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, nargs="+", default=[8, 80, 500, 2000])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--modes", nargs="+", default=["chunked", "whole"])
    parser.add_argument("--child", nargs=2, metavar=("QUERIES", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1], *args.size)))
        return 0
    print(f"{args.size[0]}x{args.size[1]} frame, CPU; peak RSS growth of one segment call")
    print("| queries | " + " | ".join(f"{m} MiB | {m} s" for m in args.modes) + " |")
    print("|---|" + "---|---|" * len(args.modes))
    for queries in args.queries:
        cells = []
        for mode in args.modes:
            command = [sys.executable, __file__, "--child", str(queries), mode, "--size"]
            command += [str(side) for side in args.size]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            figures = json.loads(out.strip().splitlines()[-1])
            cells += [f"{figures['mib']:.0f}", f"{figures['s']:.2f}"]
        print(f"| {queries} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
