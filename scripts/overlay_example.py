"""Write the README's overlay picture: a PASCAL VOC sample photo with its ground-truth labels
drawn by ovss_ros.core.drawing (the colours and legend of the node, ovss-segment and ovss-bag).

Ground truth, not a model's output: no CLIP weights are needed, and the picture shows the
drawing (palette, legend) on real regions. The samples come with Debian's labelme-examples.

    python scripts/overlay_example.py [--voc DIR] [--image 2011_000006] [-o docs/images/...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from ovss_ros.core import Segmentation, overlay

VOC_DIR = Path("/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc")
OUTPUT = Path(__file__).parents[1] / "docs" / "images" / "overlay_voc.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voc", type=Path, default=VOC_DIR, help="labelme's VOC sample folder")
    parser.add_argument("--image", default="2011_000006", help="sample id")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    names = [line.strip() for line in (args.voc / "class_names.txt").read_text().splitlines()]
    rgb = np.asarray(Image.open(args.voc / "JPEGImages" / f"{args.image}.jpg").convert("RGB"))
    truth = np.asarray(Image.open(args.voc / "SegmentationClassPNG" / f"{args.image}.png"))
    # VOC: 0 background, 255 void (object borders); both stay unlabeled, as no class claims them.
    labels = np.where((truth == 0) | (truth == 255), 255, truth.astype(int) - 1).astype(np.uint8)
    segmentation = Segmentation(labels, np.ones(labels.shape, np.float32), names[1:])
    drawn = overlay(rgb, segmentation, 0.5)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours keep the file small (about a third) and look the same at this size.
    Image.fromarray(drawn).quantize(256).save(args.output, optimize=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
