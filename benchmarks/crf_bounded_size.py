"""PnP-OVSS's dense CRF at a bounded size against the full-size CRF, on 1920x1080 frames.

    .venv/bin/python benchmarks/crf_bounded_size.py

The CRF's cost grows with the pixels (23 s of GIL-holding work for a 1920x1080 frame, issue
18), so ``pnp_ovss.dense_crf`` solves frames above ``CRF_MAX_PIXELS`` at that many pixels and
upsamples the marginals. This measures what that costs in labels: the three PASCAL VOC samples
with ground truth (labelme-examples), upscaled to 1920x1080, with probabilities made the way
PnP-OVSS's postprocess makes them (a map per class present, here its ground-truth mask, plus
background; Gaussian blur with sigma 0.05 x the long side; min-max; softmax over the channels).
For each bound: the share of pixels whose label (argmax of the marginals) equals the full-size
CRF's, and the seconds, next to the full-size CRF's, all in one run (the same machine load).
The kernels' pixel widths are scaled with the image (``scaled``, what the node does) or kept
(``kept``, the release's numbers at the smaller size).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
from conftest import VOC_DIR  # noqa: E402

from ovss_ros.core.methods.pnp_ovss.crf_process import shared_crf_process  # noqa: E402
from ovss_ros.core.methods.pnp_ovss.steps import (  # noqa: E402
    CRF_BILATERAL,
    CRF_GAUSSIAN,
    CRF_ITERATIONS,
    CRF_MAX_PIXELS,
    gaussian_blur,
    minmax,
)

SIZE = (1920, 1080)  # width, height


def frame_and_probs(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A VOC sample at SIZE and PnP-OVSS-like probabilities (1 + classes present, H, W)."""
    bgr = cv2.imread(str(VOC_DIR / "JPEGImages" / f"{name}.jpg"))
    rgb = cv2.cvtColor(cv2.resize(bgr, SIZE, interpolation=cv2.INTER_CUBIC), cv2.COLOR_BGR2RGB)
    labels = np.load(VOC_DIR / "SegmentationClass" / f"{name}.npy").astype(np.int32)
    labels = cv2.resize(labels, SIZE, interpolation=cv2.INTER_NEAREST)
    present = [value for value in np.unique(labels) if 0 < value < 255]
    maps = np.stack([(labels == value).astype(np.float32) for value in present])
    background = (maps.max(axis=0, keepdims=True) <= 0).astype(np.float32)
    scores = np.concatenate([background, maps])
    blurred = gaussian_blur(scores, 0.05 * max(SIZE))
    probs = torch.softmax(minmax(torch.from_numpy(blurred)), dim=0).numpy()
    return rgb, probs


def crf_labels(rgb: np.ndarray, probs: np.ndarray, max_pixels: int, scaled: bool) -> np.ndarray:
    """Labels of the CRF solved at most ``max_pixels`` pixels, upsampled as ``dense_crf``."""
    labels, height, width = probs.shape
    scale = min(1.0, (max_pixels / (height * width)) ** 0.5)
    small_rgb, small = rgb, probs
    if scale < 1.0:
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        small_rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        small = np.stack([cv2.resize(c, size, interpolation=cv2.INTER_AREA) for c in probs])
        small /= np.maximum(small.sum(axis=0, keepdims=True), 1e-12)
    factor = scale if scaled else 1.0
    gaussian = {**CRF_GAUSSIAN, "sxy": CRF_GAUSSIAN["sxy"] * factor}
    bilateral = {**CRF_BILATERAL, "sxy": CRF_BILATERAL["sxy"] * factor}
    marginals = shared_crf_process().marginals(
        small_rgb, small, CRF_ITERATIONS, gaussian, bilateral
    )
    if scale < 1.0:
        marginals = np.stack(
            [cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in marginals]
        )
    return marginals.argmax(axis=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bounds",
        type=int,
        nargs="+",
        default=[CRF_MAX_PIXELS, 320 * 240, 1280 * 720],
        help="pixel bounds to compare with the full-size CRF",
    )
    args = parser.parse_args()
    names = sorted(path.stem for path in (VOC_DIR / "SegmentationClass").glob("*.npy"))
    print(f"{len(names)} VOC samples at {SIZE[0]}x{SIZE[1]}; CRF_MAX_PIXELS = {CRF_MAX_PIXELS}")
    rows: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    full_seconds = []
    for name in names:
        rgb, probs = frame_and_probs(name)
        start = time.perf_counter()
        full = crf_labels(rgb, probs, rgb.shape[0] * rgb.shape[1], True)
        full_seconds.append(time.perf_counter() - start)
        print(f"{name}: {probs.shape[0]} labels, full-size CRF {full_seconds[-1]:.1f} s")
        for bound in args.bounds:
            for scaled in (True, False):
                start = time.perf_counter()
                labels = crf_labels(rgb, probs, bound, scaled)
                seconds = time.perf_counter() - start
                agreement = float((labels == full).mean())
                rows.setdefault((bound, scaled), []).append((agreement, seconds))
    print(f"\nfull size: mean {np.mean(full_seconds):.2f} s per frame")
    print(
        f"{'bound (pixels)':>15} {'kernels':>8} {'agreement':>10} {'worst':>7} {'s/frame':>8}"
        f" {'speed-up':>9}"
    )
    for (bound, scaled), values in rows.items():
        agreements = [a for a, _ in values]
        seconds = float(np.mean([s for _, s in values]))
        print(
            f"{bound:>15} {'scaled' if scaled else 'kept':>8} {np.mean(agreements):>10.4f} "
            f"{min(agreements):>7.4f} {seconds:>8.2f} {np.mean(full_seconds) / seconds:>8.1f}x"
        )
    shared_crf_process().close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
