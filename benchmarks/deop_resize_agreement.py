"""Published DeOP's input resize (torch, bilinear with antialiasing on float pixels) against the
release's (detectron2 ``ResizeShortestEdge``: PIL bilinear on the uint8 frame), and PIL bicubic.

    python benchmarks/deop_resize_agreement.py /tmp/release --images 3

``/tmp/release``: the folder ``deop_release_speed.py --write`` fills (random weights at the
release's sizes). Per VOC photo shipped with the tests: the mean and largest difference of the
resized input (0-255) and the share of pixels where the same MaskFormer proposal wins (the
argmax over the 100 soft masks) with either input. Labels are not compared: a random model gives
one label everywhere, so their agreement says nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "test"))
from conftest import voc_image_paths  # noqa: E402

from ovss_ros.core.clip.model_loading import load_clip  # noqa: E402
from ovss_ros.core.methods.deop.published import PublishedDeop  # noqa: E402
from ovss_ros.core.methods.deop.run_config import DeopConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("release", type=Path, help="folder with model_final.pth and clip.pt")
    parser.add_argument("--images", type=int, default=3)
    args = parser.parse_args(argv)
    clip = load_clip("ViT-B-16", str(args.release / "clip.pt"), "cpu")
    deop = PublishedDeop(
        clip, DeopConfig(templates="single"), checkpoint=str(args.release / "model_final.pth")
    )
    for path in voc_image_paths()[: args.images]:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        height, width = deop.network_size(*rgb.shape[:2])
        ours = deop.preprocess(rgb)
        with torch.no_grad():
            winner = deop.prepare_resized(ours, [rgb]).proposals.masks[0].argmax(0)
        parts = []
        for mode, name in ((Image.BILINEAR, "PIL bilinear"), (Image.BICUBIC, "PIL bicubic")):
            resized = np.asarray(Image.fromarray(rgb).resize((width, height), mode)).copy()
            theirs = torch.from_numpy(resized).permute(2, 0, 1)[None].float()
            with torch.no_grad():
                other = deop.prepare_resized(theirs, [rgb]).proposals.masks[0].argmax(0)
            difference = (ours - theirs).abs()
            parts.append(
                f"{name}: input difference mean {float(difference.mean()):.2f} max "
                f"{float(difference.max()):.0f}, same winning proposal "
                f"{float((winner == other).float().mean()):.4f}"
            )
        print(f"{path.name} -> {height}x{width}: " + "; ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
