"""Peak memory and time of one frame against the number of classes: the engine's chunked
postprocess against the whole-softmax formula (what the engine did before), in one run.

    .venv/bin/python benchmarks/query_memory.py      # 10/100/1000 classes, 640x480 and 4000x3000
    .venv/bin/python benchmarks/query_memory.py --set dense.upsample=jbu --set dense.pamr=true

Every class needs a logit map at the input size before the softmax; the old formula holds them
all at once (the upsampled logits, the scaled logits, the probabilities and the per-label
maximum: about ``4 x queries x H x W x 4`` bytes). The engine reduces a chunk of maps at a time
(``POSTPROCESS_ELEMENTS``) with a running log-sum-exp and argmax. The model does not matter for
this stage, so the tiny test model keeps the run short. Each cell is one ``segment`` call in a
fresh process after a warm-up on a 16x16 frame: the growth of the peak resident memory
(``ru_maxrss``) and the wall time. ``old`` cells whose estimate exceeds ``--max-gib`` are not
run (the estimate is printed instead), so the machine is never pushed into swap.
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
SIZES = ["480x640", "3000x4000"]


def whole_softmax(segmenter, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The former postprocess (README, conventions): every query map at the input size, one
    softmax over all queries, max over each class's synonyms, argmax over classes, background
    where a background word beats the best class. JBU / PAMR / windows as configured."""
    config, size = segmenter.config, rgb.shape[:2]
    with torch.inference_mode():
        encoded = segmenter.method.encode(segmenter.method.preprocess(rgb))
        logits = segmenter.method.to_image(
            segmenter.method.head(encoded)[0], encoded, config.dense.upsample == "jbu"
        )
        if config.dense.pamr:
            from ovss_ros.core.methods.dense.pamr import pamr

            logits = pamr(segmenter.method._full_resolution(encoded), logits[None])[0]
        logits = F.interpolate(logits[None].float(), size, mode="bilinear")[0]
        probs = torch.softmax(config.dense.logit_scale * logits, dim=0)
        del logits
        owner = segmenter.method._query_owner.view(-1, 1, 1).expand_as(probs)
        classes = len(segmenter.classes)
        per_label = probs.new_zeros((classes + 1, *size))
        per_label.scatter_reduce_(0, owner, probs, reduce="amax", include_self=True)
        confidence, labels = per_label[:classes].max(dim=0)
        background = per_label[classes] > confidence
        unlabeled = background | (confidence < config.score_threshold)
        return labels.masked_fill(unlabeled, -1), confidence


def old_bytes(classes: int, height: int, width: int) -> int:
    """The old formula's class maps: four float32 (queries, H, W) tensors."""
    return 4 * classes * height * width * 4


def measure(classes: int, mode: str, height: int, width: int, settings: dict) -> dict:
    from ovss_ros.core import EngineConfig, Segmenter

    torch.set_num_threads(2)
    base = {"model": str(TINY), "pretrained": "none", "device": "cpu", "templates": "single"}
    config = EngineConfig.from_flat(base | settings)
    segmenter = Segmenter(config)
    segmenter.set_classes([f"thing {i}" for i in range(classes)])
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    run = segmenter.segment if mode == "new" else lambda x: whole_softmax(segmenter, x)
    run(rgb[:16, :16])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    run(rgb)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mib": (peak - before) / 1024, "s": seconds}


def parse_settings(pairs: list[str]) -> dict:
    """``key=value`` pairs -> settings by full dotted name (``dense.pamr=true``; ints, floats,
    booleans, text), as ``EngineConfig.from_flat`` takes them."""
    settings = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        lowered = text.lower()
        if lowered in ("true", "false"):
            settings[key] = lowered == "true"
            continue
        for kind in (int, float):
            try:
                settings[key] = kind(text)
                break
            except ValueError:
                continue
        else:
            settings[key] = text
    return settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sizes", nargs="+", default=SIZES, metavar="HxW")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-gib", type=float, default=8.0, help="skip old cells above this")
    parser.add_argument("--child", nargs=4, metavar=("CLASSES", "MODE", "H", "W"))
    args = parser.parse_args()
    settings = parse_settings(args.set)
    if args.child:
        classes, mode, height, width = args.child
        figures = measure(int(classes), mode, int(height), int(width), settings)
        print(json.dumps(figures))
        return 0
    print(f"tiny model, CPU, 2 threads, settings {settings or 'default'}")
    print("peak RSS growth of one segment call, and its time; old = whole softmax at once")
    print("| size | classes | old MiB | old s | new MiB | new s | new/old MiB | new/old s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        height, width = (int(side) for side in size.split("x"))
        for classes in args.classes:
            cells = {}
            for mode in ("old", "new"):
                need = old_bytes(classes, height, width) / 2**30
                if mode == "old" and need > args.max_gib:
                    cells[mode] = None
                    continue
                command = [sys.executable, __file__, "--child", str(classes), mode]
                command += [str(height), str(width)] + [f"--set={pair}" for pair in args.set]
                out = subprocess.run(command, capture_output=True, text=True, check=True)
                cells[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            new, old = cells["new"], cells["old"]
            if old is None:
                row = [f"not run (needs ~{need:.0f} GiB)", "-"]
                ratios = ["-", "-"]
            else:
                row = [f"{old['mib']:.0f}", f"{old['s']:.2f}"]
                ratios = [f"{new['mib'] / max(old['mib'], 1):.3f}", f"{new['s'] / old['s']:.2f}"]
            row += [f"{new['mib']:.0f}", f"{new['s']:.2f}"] + ratios
            print(f"| {height}x{width} | {classes} | " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
