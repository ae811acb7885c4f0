"""What FreeCP's crop classifier costs per ambiguous group: before and after issue 13, one run.

    .venv/bin/python benchmarks/freecp_crop_classifier.py                # CPU, fp32
    .venv/bin/python benchmarks/freecp_crop_classifier.py --device cuda --precision fp16

Random weights at the real size (CLIP ViT-B/16, open_clip ``pretrained none``; the cost does not
depend on the weights), one 384 px window (FreeCP's slide_crop, a 24 x 24 patch grid).

- ``before``: ovss_ros up to issue 13: one crop per group, the union of the members' boxes,
  resized to the model's native 224 px and embedded by ``model.encode_image``.
- ``after``: the official convention: one crop per contour of the group's mean map (``k``
  crops; 1-4 is typical), each resized to 112 px and embedded in one batch by
  ``crop_embeddings`` (7 x 7 patch grid by the "+0.1" rule, class token).

The rows are timed interleaved (round-robin, after a warm-up) and reported as the median
milliseconds per group and the ratio to ``before``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.freecp.freecp import make_crop_classifier

PATCH = 16
BOXES = [(2, 3, 11, 14), (13, 1, 22, 9), (4, 15, 9, 21), (15, 12, 23, 23)]  # patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = load_clip("ViT-B-16", "none", args.device, args.precision)
    model, device, dtype = clip.model, clip.device, clip.dtype
    window = torch.randn(1, 3, 24 * PATCH, 24 * PATCH, device=device, dtype=dtype)
    descriptions = F.normalize(torch.randn(2, model.text_projection.shape[1], device=device), -1)
    native = model.visual.image_size
    native = native[0] if isinstance(native, tuple) else native

    @torch.no_grad()
    def before() -> torch.Tensor:
        x0, y0 = min(b[0] for b in BOXES), min(b[1] for b in BOXES)
        x1, y1 = max(b[2] for b in BOXES), max(b[3] for b in BOXES)
        crop = window[..., y0 * PATCH : y1 * PATCH, x0 * PATCH : x1 * PATCH]
        crop = F.interpolate(crop, size=(native, native), mode="bilinear", align_corners=False)
        return F.normalize(model.encode_image(crop).float(), dim=-1) @ descriptions.T

    classify = make_crop_classifier(model.visual, descriptions, window, PATCH)
    rows = {"before (1 union crop, 224 px)": before}
    for k in (1, 2, 4):
        rows[f"after ({k} contour crop{'s' if k > 1 else ''}, 112 px)"] = lambda k=k: classify(
            BOXES[:k], [0, 1]
        )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in rows}
    for repeat in range(args.repeats + 2):
        for name, run in rows.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            if repeat >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times[next(iter(rows))])
    print(f"FreeCP crop classifier per ambiguous group, ViT-B/16, {device} {args.precision}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<32} {1000 * median:8.2f} ms   x{median / base:5.2f}")


if __name__ == "__main__":
    main()
