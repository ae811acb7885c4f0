"""Time of ovss_ros's dense forward against open_clip's stock forward and a sequence-first
reference forward written here (NACLIP's layout), on the same weights and input, in one run.

    .venv/bin/python benchmarks/dense_forward_speed.py   # ViT-B-16, random weights, 448x448

Four forwards of the same normalised pixels (1, 3, H, W):

* ``dense``: ``ovss_ros.core.methods.dense.forward.dense_forward`` (NACLIP last block; blocks
  1..L-1 by ``residual_block``: ``F.scaled_dot_product_attention``, residual adds folded into the
  output projections).
* ``openclip-blocks``: the same dense forward with open_clip's own blocks for 1..L-1
  (``block(x)``: batch-first ``nn.MultiheadAttention``), i.e. ovss_ros before this change.
* ``seq-first``: written here from NACLIP's ``clip/model.py`` layout: tokens permuted to (L, N, C),
  blocks 1..L-1 as ``x + attn(ln_1(x))`` with ``F.multi_head_attention_forward`` (what
  ``nn.MultiheadAttention(batch_first=False)`` runs) and ``x + mlp(ln_2(x))``, then NACLIP's
  last block (key-key attention plus the Gaussian window, no residual, no FFN), ln_post, proj.
* ``stock``: open_clip's stock transformer, all L blocks unchanged (``visual.transformer``),
  ln_post, proj: the plain forward's cost at this input size, for scale.

Rounds are interleaved (the order rotates each round) and each round's times are divided by
the same round's ``dense`` time, so slow phases of a loaded machine cancel out; the table gives
the median time, and the median and interquartile range of the per-round ratios ``other /
dense`` (above 1: ``dense`` is faster), for the wall time and for the process's CPU time (both
threads; steadier than the wall time when other processes compete for the cores). The first
three give the same features (checked before timing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch
import torch.nn.functional as F

from ovss_ros.core.methods.dense import forward as dense_clip
from ovss_ros.core.methods.dense.forward import (
    dense_forward,
    gaussian_window,
    interpolate_pos_embed,
    official_pos_rule,
)


def embed(visual, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embedding, class token, positions resized by NACLIP's rule, ln_pre:
    (N, 1 + h*w, C) and (h, w)."""
    x = visual.conv1(pixels)
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
    positions = interpolate_pos_embed(visual, grid, official_pos_rule("naclip"))
    return visual.ln_pre(x + positions.to(x.dtype)), grid


def head(visual, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, 1 + h*w, C) -> normalised patch features (N, h, w, D)."""
    x = visual.ln_post(x[:, 1:]) @ visual.proj
    return F.normalize(x.float(), dim=-1).reshape(x.shape[0], *grid, -1)


def sequence_first(visual, pixels: torch.Tensor) -> torch.Tensor:
    """NACLIP's layout: (L, N, C) tokens through nn.MultiheadAttention-style blocks."""
    x, grid = embed(visual, pixels)
    x = x.permute(1, 0, 2)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        attn, h = block.attn, block.ln_1(x)
        out = F.multi_head_attention_forward(
            h, h, h, attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias,
            None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias,
            training=False, need_weights=False,
        )[0]  # fmt: skip
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    block = blocks[-1]
    attn, (length, batch, width) = block.attn, x.shape
    heads = attn.num_heads
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    k = k.reshape(length, batch * heads, -1).transpose(0, 1)
    v = v.reshape(length, batch * heads, -1).transpose(0, 1)
    scale = (width // heads) ** -0.5
    weights = torch.softmax(k @ k.transpose(1, 2) * scale + gaussian_window(grid), dim=-1)
    out = (weights @ v).transpose(0, 1).reshape(length, batch, width)
    x = attn.out_proj(out).permute(1, 0, 2)
    return head(visual, x, grid)


def stock(visual, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip's own transformer, every block unchanged."""
    x, grid = embed(visual, pixels)
    return head(visual, visual.transformer(x), grid)


def openclip_blocks(visual, pixels: torch.Tensor) -> torch.Tensor:
    """The dense forward with open_clip's blocks 1..L-1 (``block(x)``)."""
    fast = dense_clip.residual_block
    dense_clip.residual_block = lambda block, x: block(x)
    try:
        return dense_forward(visual, pixels, "naclip").features
    finally:
        dense_clip.residual_block = fast


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, nargs=2, default=[448, 448], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    visual = open_clip.create_model(args.model, pretrained=None).visual
    visual = visual.to(args.device, dtype[args.precision]).eval()
    pixels = torch.randn(
        args.batch, 3, *args.size, device=args.device, dtype=visual.conv1.weight.dtype
    )
    forwards = {
        "dense": lambda: dense_forward(visual, pixels, "naclip").features,
        "openclip-blocks": lambda: openclip_blocks(visual, pixels),
        "seq-first": lambda: sequence_first(visual, pixels),
        "stock": lambda: stock(visual, pixels),
    }
    sync = torch.cuda.synchronize if pixels.is_cuda else lambda: None
    with torch.inference_mode():
        outputs = {name: run() for name, run in forwards.items()}  # also the warm-up
        for name in ("openclip-blocks", "seq-first"):
            gap = (outputs[name] - outputs["dense"]).abs().max().item()
            print(f"max |{name} - dense| of the features: {gap:.1e}")
            assert gap < (1e-4 if args.precision == "fp32" else 5e-2), name
        wall = {name: [] for name in forwards}
        cpu = {name: [] for name in forwards}
        names = list(forwards)
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                forwards[name]()
                sync()
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start)
    print(
        f"\n{args.model}, random weights, {args.batch}x3x{args.size[0]}x{args.size[1]}, "
        f"{args.device} {args.precision}, {args.threads} threads, {args.rounds} interleaved rounds"
    )
    print("| forward | wall s | wall / dense | IQR | CPU s | CPU / dense | IQR |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        cells = []
        for times in (wall, cpu):
            ratios = [a / b for a, b in zip(times[name], times["dense"], strict=True)]
            low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            cells += [
                f"{statistics.median(times[name]):.3f}",
                f"{statistics.median(ratios):.3f}",
                f"{low:.3f}-{high:.3f}",
            ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
