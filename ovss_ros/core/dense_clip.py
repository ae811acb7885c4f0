"""Dense CLIP: one forward of the image tower that keeps a text-aligned feature per patch.

Blocks 1..L-1 of the open_clip ViT run unchanged; the last block's attention is replaced by the
method's own (methods.md section 0). Written as plain tensor code in the spirit of NACLIP's
``custom_attn`` so each mode reads like its equation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

LAST_BLOCK_MODES = ("naclip", "sclip", "clearclip", "maskclip", "vanilla")
REDUCED_MODES = ("naclip", "clearclip", "maskclip")  # last block without residual and FFN
NACLIP_SIGMA = 5.0


def interpolate_pos_embed(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """Positional embedding for a ``grid`` of patches: bicubic resize of the trained grid."""
    pos = visual.positional_embedding
    native = tuple(visual.grid_size)
    if tuple(grid) == native:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, *native, -1).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos])


def gaussian_window(
    grid: tuple[int, int], sigma: float = NACLIP_SIGMA, device=None
) -> torch.Tensor:
    """NACLIP's Omega: exp(-d^2 / 2 sigma^2) between patches, zero for the class token."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()
    omega = torch.exp(-torch.cdist(coords, coords).square() / (2 * sigma**2))
    return F.pad(omega, (1, 0, 1, 0))  # class token row and column stay zero


def last_block(
    block: torch.nn.Module, x: torch.Tensor, mode: str, grid: tuple[int, int]
) -> torch.Tensor:
    """The last residual block with the attention of ``mode``; x is (N, 1 + h*w, C)."""
    attn = block.attn
    batch, length, width = x.shape
    heads = attn.num_heads
    scale = (width // heads) ** -0.5
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)

    if mode == "maskclip":
        out = v
    else:
        if mode == "naclip":
            omega = gaussian_window(grid, device=x.device).to(q.dtype)
            weights = torch.softmax(k @ k.transpose(-2, -1) * scale + omega, dim=-1)
        elif mode == "sclip":
            weights = torch.softmax(q @ q.transpose(-2, -1) * scale, dim=-1)
            weights = weights + torch.softmax(k @ k.transpose(-2, -1) * scale, dim=-1)
        elif mode == "clearclip":
            weights = torch.softmax(q @ q.transpose(-2, -1) * scale, dim=-1)
        elif mode == "vanilla":
            weights = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
        else:
            raise ValueError(f"unknown method {mode!r}: use one of {LAST_BLOCK_MODES}")
        out = weights @ v
    out = block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(batch, length, width)))
    if mode in REDUCED_MODES:
        return out
    x = x + out
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def patch_features(
    visual: VisionTransformer, pixels: torch.Tensor, mode: str = "naclip"
) -> torch.Tensor:
    """Normalised patch features in text space (N, h, w, D) of normalised pixels (N, 3, H, W)."""
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(visual, grid).to(x.dtype)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    x = last_block(visual.transformer.resblocks[-1], x, mode, grid)
    x = visual.ln_post(x[:, 1:]) @ visual.proj
    return F.normalize(x.float(), dim=-1).reshape(x.shape[0], *grid, -1)
