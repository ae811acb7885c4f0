"""Published DeOP against the two-stream baseline on the same MaskFormer proposals, in one run.

    python benchmarks/deop_release_speed.py --device cpu --rounds 3

Both run the DeOP release's architecture at its sizes with random weights (speed does not depend
on the weights; no weights can be downloaded here): the MaskFormer R101c proposal network (100
queries), CLIP ViT-B/16 with the learned positions, the slot-query decoder, the prompt context.
``deop``: one CLIP pass severed by the 100 masks (PublishedDeop); ``twostream``: one CLIP pass
per mask crop and the ensemble (PublishedTwoStream). Rounds are interleaved (deop, twostream,
deop, ...) so that a machine's load falls on both; the medians and their ratio are printed.
The paper: 4.37 (DeOP) vs 1.11 (two-stream) FPS on COCO-Stuff on a GPU, a ratio of 3.9.

    python benchmarks/deop_release_speed.py --write /tmp/release
    ovss-bench --model ViT-B-16 --pretrained /tmp/release/clip.pt --device cpu \
        --deop-checkpoint /tmp/release/model_final.pth --combos deop twostream \
        --templates single --width 640 --height 480 --warmup 1 --iterations 2

``--write DIR`` writes those random parts as a file in the release's layout
(``DIR/model_final.pth``, detectron2 names, as ``ovss-train-deop`` writes it) and the random
CLIP it was made with (``DIR/clip.pt``, the weights the file's CLIP must equal), so that the
tools run the release through their own loading: ``ovss-bench`` then times ``deop`` and
``twostream`` in interleaved rounds, and its ``/first`` column is the ratio to ``deop``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.deop.heads import DeopModules
from ovss_ros.core.methods.deop.maskformer import R101C, ProposalNetwork
from ovss_ros.core.methods.deop.published import PublishedDeop
from ovss_ros.core.methods.deop.published_twostream import PublishedTwoStream
from ovss_ros.core.methods.deop.release_writer import (
    clip_tensors,
    decoder_tensors,
    position_tensors,
    prompt_tensor,
    proposal_tensors,
    void_tensor,
    write_detectron2,
)
from ovss_ros.core.methods.deop.released import LearnedPositions
from ovss_ros.core.methods.deop.released_checkpoint import ReleasedDeop
from ovss_ros.core.methods.deop.run_config import DeopConfig, TwoStreamConfig

CLASSES = ["person", "chair", "table", "floor", "wall", "door", "cup", "bottle"]
SAMPLES = Path(__file__).resolve().parents[1] / "ovss_ros" / "data" / "demo_images"


def frame(width: int, height: int) -> np.ndarray:
    """A shipped demo scene resized to the camera size (noise when none is found)."""
    for path in sorted(SAMPLES.glob("*.*")):
        bgr = cv2.imread(str(path))
        if bgr is not None:
            return cv2.cvtColor(cv2.resize(bgr, (width, height)), cv2.COLOR_BGR2RGB)
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_release(clip) -> ReleasedDeop:
    """The release's parts at its sizes, random, on ``clip`` (its CLIP is ``clip`` itself)."""
    embed = int(clip.model.visual.output_dim)
    width = int(clip.model.visual.conv1.out_channels)
    text = int(clip.model.token_embedding.weight.shape[1])
    blocks = len(clip.model.visual.transformer.resblocks)  # 12: positions before 1-5
    layers = tuple(range(1, min(6, blocks - 1)))
    modules = DeopModules.create(
        embed,
        decoder={"heads": 8, "feedforward": 1024, "slots": 100},
        prompt={"width": text, "length": 16},
    )
    released = ReleasedDeop(
        "random weights in the release's layout",
        ProposalNetwork(replace(R101C, embedding_dim=embed)),
        LearnedPositions(width, layers),
        modules,
        {},
    )
    for module in (released.proposals, released.positions, modules):
        module.eval().requires_grad_(False)
    return released.to(clip.device)


def write_release(folder: Path, clip, released: ReleasedDeop) -> None:
    """``folder/model_final.pth`` (the release's layout) and ``folder/clip.pt`` (the CLIP's
    state dict, for ``--pretrained``)."""
    folder.mkdir(parents=True, exist_ok=True)
    modules = released.modules
    state = (
        proposal_tensors(released.proposals)
        | clip_tensors(clip.model)
        | position_tensors(released.positions)
        | decoder_tensors(modules.decoder)
        | void_tensor(modules.void)
        | prompt_tensor(modules.prompt.context)
    )
    write_detectron2(folder / "model_final.pth", state, 0)
    torch.save(clip.model.state_dict(), folder / "clip.pt")
    size = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    print(
        f"wrote {folder / 'model_final.pth'} ({len(state)} tensors, {size:.0f} MiB) and "
        f"{folder / 'clip.pt'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, help="write the release file and CLIP here; exit")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    clip = load_clip(args.model, args.pretrained, args.device)
    sync = torch.cuda.synchronize if clip.device.type == "cuda" else (lambda: None)
    released = random_release(clip)
    if args.write is not None:
        write_release(args.write, clip, released)
        return 0
    methods = {
        "deop": PublishedDeop(clip, DeopConfig(templates="single"), released=released),
        "twostream": PublishedTwoStream(
            clip, TwoStreamConfig(templates="single"), released=released
        ),
    }
    rgb = frame(*args.size)
    for method in methods.values():
        method.set_classes(CLASSES)
        method.segment(rgb)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            sync()
            start = time.perf_counter()
            method.segment(rgb)
            sync()
            times[name].append(time.perf_counter() - start)
    deop, two = (statistics.median(times[name]) for name in ("deop", "twostream"))
    print(
        f"{args.model} pretrained={args.pretrained} {args.device} {args.size[0]}x{args.size[1]} "
        f"(input short side 512), {torch.get_num_threads()} threads, {len(CLASSES)} classes, "
        f"{args.rounds} interleaved rounds"
    )
    print(f"deop       {deop:8.2f} s per frame (rounds: {[round(t, 2) for t in times['deop']]})")
    print(
        f"twostream  {two:8.2f} s per frame (rounds: {[round(t, 2) for t in times['twostream']]})"
    )
    print(f"twostream / deop = {two / deop:.2f} (the paper: 4.37 / 1.11 FPS = 3.9 on a GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
