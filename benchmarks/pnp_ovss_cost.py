"""Cost of PnP-OVSS per stage and end to end, next to the naclip Segmenter, in one run.

    .venv/bin/python benchmarks/pnp_ovss_cost.py --iterations 3 --device cpu

Both run on the same 640x480 frame (a VOC photo) with random weights: naclip with open_clip
ViT-B-16 at its defaults (short side 448, whole image), PnP-OVSS with a base-size BLIP ITM
(``BlipConfig`` defaults with 12 text heads: ViT-B/16 image tower, 12-layer BERT-base text
encoder, as ``Salesforce/blip-itm-base-coco``) at its released settings (336 px, 4 dropout
rounds, blur, CRF) and the same ViT-B-16 for the classes present. The CLIP presence forward
runs with threshold 0, so every class is in the prompt and random CLIP scores cannot change
its length between runs.
Stages are timed with a device synchronisation after each; end to end separately, one frame
of PnP-OVSS and one of naclip in turn, so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BlipConfig, BlipForImageTextRetrieval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
import ros_harness  # noqa: E402  (camera_frame: a VOC photo at camera size)
import tiny_blip  # noqa: E402  (a WordPiece vocabulary file with the class words)

from ovss_ros.core import EngineConfig, Segmenter  # noqa: E402
from ovss_ros.core.clip.model_loading import resolve_device  # noqa: E402
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss, PnpSettings  # noqa: E402
from ovss_ros.core.methods.pnp_ovss.vlm_loading import CLIP_MEAN, CLIP_STD, LoadedVlm  # noqa: E402

CLASSES = ["person", "chair", "table", "floor", "wall", "door", "dog", "bottle"]


def median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)


def base_blip(device: torch.device) -> LoadedVlm:
    """A base-size random BLIP ITM with a small real tokenizer (the embedding keeps 30524 rows)."""
    tokenizer = tiny_blip.tiny_tokenizer(Path(tempfile.mkdtemp()))
    config = BlipConfig(text_config={"num_attention_heads": 12})  # BERT-base, as the hub's
    model = BlipForImageTextRetrieval(config).eval().requires_grad_(False).to(device)
    return LoadedVlm(model, tokenizer, "random base BLIP", device, None, CLIP_MEAN, CLIP_STD, 6)


def time_pnp(pipeline: PnpOvss, rgb, iterations: int, warmup: int, sync) -> dict[str, float]:
    stages: dict[str, list[float]] = {"preprocess": [], "presence": [], "saliency": []}
    stages["postprocess"] = []
    for index in range(warmup + iterations):
        marks = [time.perf_counter()]
        pixels, clip_pixels = pipeline.preprocess(rgb)
        sync()
        marks.append(time.perf_counter())
        present = pipeline.present_classes(clip_pixels)
        sync()
        marks.append(time.perf_counter())
        maps = pipeline.saliency(pixels, present)
        sync()
        marks.append(time.perf_counter())
        pipeline.postprocess(maps, present, rgb, rgb.shape[:2])
        marks.append(time.perf_counter())
        if index >= warmup:
            for name, start, stop in zip(stages, marks, marks[1:], strict=False):
                stages[name].append(stop - start)
    return {name: median_ms(samples) for name, samples in stages.items()}


def interleaved_end_to_end(
    pipeline: PnpOvss, segmenter: Segmenter, rgb, iterations: int, warmup: int, sync
) -> tuple[float, float]:
    """Median ms of PnP-OVSS and naclip, one frame of each in turn (a busy machine's load
    changes slowly, so alternating keeps the ratio fair)."""
    pnp, naclip = [], []
    for index in range(warmup + iterations):
        start = time.perf_counter()
        pipeline.segment(rgb)
        sync()
        middle = time.perf_counter()
        with torch.inference_mode():
            segmenter.segment(rgb)
        sync()
        if index >= warmup:
            pnp.append(middle - start)
            naclip.append(time.perf_counter() - middle)
    return median_ms(pnp), median_ms(naclip)


def time_naclip(segmenter: Segmenter, rgb, iterations: int, warmup: int, sync) -> dict[str, float]:
    stages: dict[str, list[float]] = {"preprocess": [], "encode": [], "head": []}
    stages["postprocess"] = []
    with torch.inference_mode():
        for index in range(warmup + iterations):
            marks = [time.perf_counter()]
            pixels = segmenter.preprocess(rgb)
            sync()
            marks.append(time.perf_counter())
            encoded = segmenter.encode(pixels)
            sync()
            marks.append(time.perf_counter())
            logits, scores = segmenter.head(encoded)
            sync()
            marks.append(time.perf_counter())
            segmenter.postprocess(encoded, logits, scores, rgb.shape[:2])
            marks.append(time.perf_counter())
            if index >= warmup:
                for name, start, stop in zip(stages, marks, marks[1:], strict=False):
                    stages[name].append(stop - start)
    return {name: median_ms(samples) for name, samples in stages.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--refines", nargs="+", default=["crf", "pamr", "none"])
    args = parser.parse_args()
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rgb = ros_harness.camera_frame(640, 480)
    config = EngineConfig(pretrained="none", device=args.device, templates="single")
    segmenter = Segmenter(config)
    segmenter.set_classes(CLASSES)
    naclip = time_naclip(segmenter, rgb, args.iterations, args.warmup, sync)
    vlm = base_blip(device)
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, 640x480 frame, "
        f"{len(CLASSES)} classes"
    )
    print(
        "naclip (ViT-B-16, short side 448): "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in naclip.items())
    )
    settings = PnpSettings(presence_threshold=0.0)
    for refine in args.refines:
        pipeline = PnpOvss(
            segmenter.clip,
            vlm,
            PnpSettings(presence_threshold=0.0, refine=refine),
            templates="single",
            text=segmenter.text,
        )
        pipeline.set_classes(CLASSES)
        pnp = time_pnp(pipeline, rgb, args.iterations, args.warmup, sync)
        pnp_ms, naclip_ms = interleaved_end_to_end(
            pipeline, segmenter, rgb, args.iterations, args.warmup, sync
        )
        print(
            f"pnp_ovss (base BLIP, {settings.image_size} px, {settings.dropout_rounds} rounds, "
            f"refine {refine}): "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in pnp.items())
            + f" ({pnp['saliency'] / settings.dropout_rounds:.1f} ms per gradient round); "
            f"end to end {pnp_ms:.1f} ms against naclip {naclip_ms:.1f} ms in turn: "
            f"{pnp_ms / naclip_ms:.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
