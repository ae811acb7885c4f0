"""Dense CLIP: one forward of the image tower that keeps a text-aligned feature per patch.

Blocks 1..L-1 of the open_clip ViT run unchanged; the last block's attention is replaced by the
method's own (docs/methods.md). Written as plain tensor code in the spirit of NACLIP's
``custom_attn`` so each mode reads like its equation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from ovss_ros.core.frame_budget import rows_per_chunk
from ovss_ros.core.methods.dense.settings import (  # noqa: F401 (re-exported)
    AFFINITY_SOURCES,
    FREECP_VARIANTS,
    LAST_BLOCK_MODES,
    POS_INTERPOLATIONS,
)

# Last block without residual and FFN. ``maskclip`` as published (chongzhou96/MaskCLIP) keeps
# both around its identity attention; ``maskclip_reduced`` is ClearCLIP's "MaskCLIP" ablation.
REDUCED_MODES = ("naclip", "clearclip", "maskclip_reduced")
IDENTITY_MODES = ("maskclip", "maskclip_reduced")  # each token keeps its own value
NACLIP_SIGMA = 5.0


def official_pos_rule(mode: str) -> str:
    """The positional-grid rule of ``mode``'s official code: ``dino`` or ``exact``.

    NACLIP (``clip/model.py``), SCLIP (``clip/model.py``) and ClearCLIP
    (``open_clip/transformer.py``, also for its reduced MaskCLIP) use DINO's "+0.1" rule; the
    published MaskCLIP resizes to the grid size (``mmseg/models/backbones/vit.py``,
    ``resize_pos_embed``). FreeCP's variants use the "+0.1" rule too
    (``interpolate_pos_encoding``).
    """
    return "exact" if mode == "maskclip" else "dino"


def interpolate_pos_embed(
    visual: VisionTransformer, grid: tuple[int, int], rule: str = "exact"
) -> torch.Tensor:
    """Positional embedding (1 + h*w, C) for a ``grid`` (h, w) of patches.

    The trained (n_h, n_w) grid is resized bicubically (no antialiasing, corners not aligned);
    the native grid is returned unchanged. ``rule``:

    - ``exact``: ``F.interpolate(size=grid)``: output pixel centres map onto the trained grid
      with the ratio n / g;
    - ``dino``: ``F.interpolate(scale_factor=((h + 0.1) / n_h, (w + 0.1) / n_w))``, DINO's
      trick that the NACLIP, SCLIP and ClearCLIP code use: the output still has h x w entries
      (the floor of n * scale), but the sampling ratio is n / (g + 0.1), a slightly shrunk
      grid (differences of about 1e-3 in the features).

    The default, ``exact``, is what callers outside the engine were written against (DeOP's
    proposal pipeline, the benchmark's bare encoder); ``dense_forward`` picks per method.
    Raises ValueError for an unknown rule.
    """
    if rule not in ("dino", "exact"):
        raise ValueError(f"unknown positional interpolation rule {rule!r}: use dino or exact")
    pos = visual.positional_embedding
    native = tuple(visual.grid_size)
    if tuple(grid) == native:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, *native, -1).permute(0, 3, 1, 2).float()
    if rule == "exact":
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    else:
        scale = tuple((g + 0.1) / n for g, n in zip(grid, native, strict=True))
        patch_pos = F.interpolate(
            patch_pos,
            scale_factor=scale,
            mode="bicubic",
            align_corners=False,
            recompute_scale_factor=False,
        )
        if tuple(patch_pos.shape[-2:]) != tuple(grid):  # floor(n * (g + 0.1) / n) is g
            raise RuntimeError(f"dino rule gave {tuple(patch_pos.shape[-2:])}, not {grid}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos])


@lru_cache(maxsize=8)
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


def _split_qkv(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v of a block's attention, each (N, heads, L, head_dim), and the softmax scale."""
    attn = block.attn
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    return q, k, v, (width // heads) ** -0.5


def _plain_attention(block: nn.Module) -> bool:
    """Whether ``block`` is open_clip's ResidualAttentionBlock with a plain self-attention
    (packed q/k/v projection with bias, no extra key/value bias, no active dropout)."""
    attn = getattr(block, "attn", None)
    return (
        isinstance(block, ResidualAttentionBlock)
        and isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and not attn.add_zero_attn
        and not hasattr(block, "ln_1_kv")
        and not (attn.training and attn.dropout)
    )


def _add_linear(
    x: torch.Tensor, inputs: torch.Tensor, linear: nn.Module, scale: nn.Module
) -> torch.Tensor:
    """``x + scale(linear(inputs))`` for x (N, L, C) and inputs (N, L, C_in).

    Without a layer scale, ``x + bias`` is the accumulator of the matrix product (``addmm_``):
    one pass over x instead of a bias copy, the product and a separate residual add. The sum is
    the same up to the order of the float additions.
    """
    if not isinstance(scale, nn.Identity) or not isinstance(linear, nn.Linear):
        return x + scale(linear(inputs))
    out = (x.clone() if linear.bias is None else x + linear.bias).contiguous()
    out.view(-1, out.shape[-1]).addmm_(inputs.reshape(-1, inputs.shape[-1]), linear.weight.T)
    return out


def residual_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's residual attention block on x (N, L, C), with the same math, faster.

    ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` (Radford et al. 2021; open_clip
    ``ResidualAttentionBlock.forward``), with the attention as one
    ``F.scaled_dot_product_attention`` on strided views of the packed q/k/v projection (no
    copies; torch's fused kernels) instead of ``nn.MultiheadAttention``'s batch-first path, and
    the residual adds folded into the output projections (:func:`_add_linear`). Equal to
    ``block(x)`` up to float rounding (test/test_dense_clip_blocks.py); a block of any other
    structure runs as ``block(x)``. No attention weights are formed: where they are needed
    (the ``mean`` affinity) use :func:`block_forward`.
    """
    if not _plain_attention(block):
        return block(x)
    q, k, v, _ = _split_qkv(block, x)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (N, L, heads, head_dim)
    x = _add_linear(x, out.reshape(x.shape), block.attn.out_proj, block.ls_1)
    mlp = block.mlp
    if isinstance(mlp, nn.Sequential) and list(mlp._modules) == ["c_fc", "gelu", "c_proj"]:
        return _add_linear(x, mlp.gelu(mlp.c_fc(block.ln_2(x))), mlp.c_proj, block.ls_2)
    return x + block.ls_2(mlp(block.ln_2(x)))


def _omega_rows(grid: tuple[int, int], rows: slice, device, dtype) -> torch.Tensor:
    """Rows ``rows`` (token indices, class token 0) of NACLIP's Omega (``gaussian_window``)."""
    length = grid[0] * grid[1] + 1
    if rows.start == 0 and rows.stop >= length:
        return gaussian_window(grid, device=device).to(dtype)
    index = torch.arange(length - 1, device=device)  # patch i is token i + 1
    coords = torch.stack([index // grid[1], index % grid[1]], dim=1).float()
    first = max(rows.start, 1)
    part = coords[first - 1 : rows.stop - 1]
    omega = torch.exp(-torch.cdist(part, coords).square() / (2 * NACLIP_SIGMA**2))
    omega = F.pad(omega, (1, 0, 1 if rows.start == 0 else 0, 0))  # class token: zero
    return omega.to(dtype)


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    mode: str,
    grid: tuple[int, int],
    rows: slice,
) -> torch.Tensor:
    """Rows ``rows`` of the (N, heads, L, L) attention of a last-block mode: (N, heads, r, L).

    Each row is its own softmax, so any split into rows gives the whole map's rows exactly.
    """
    if mode == "naclip":
        omega = _omega_rows(grid, rows, q.device, q.dtype)
        return torch.softmax(k[:, :, rows] @ k.transpose(-2, -1) * scale + omega, dim=-1)
    if mode == "keykey":
        return torch.softmax(k[:, :, rows] @ k.transpose(-2, -1) * scale, dim=-1)
    if mode == "sclip":
        return torch.softmax(q[:, :, rows] @ q.transpose(-2, -1) * scale, dim=-1) + torch.softmax(
            k[:, :, rows] @ k.transpose(-2, -1) * scale, dim=-1
        )
    if mode == "clearclip":
        return torch.softmax(q[:, :, rows] @ q.transpose(-2, -1) * scale, dim=-1)
    if mode == "vanilla":
        return torch.softmax(q[:, :, rows] @ k.transpose(-2, -1) * scale, dim=-1)
    raise ValueError(f"unknown method {mode!r}: use one of {list(LAST_BLOCK_MODES)}")


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, scale: float, mode: str, grid: tuple[int, int]
) -> torch.Tensor:
    """The (N, heads, L, L) attention of a last-block mode (the identity modes excepted)."""
    return attention_rows(q, k, scale, mode, grid, slice(0, q.shape[2]))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    scale: float,
    mode: str,
    grid: tuple[int, int],
    mean: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``attention @ v`` (N, heads, L, d) (None without ``v``) and, with ``mean``, the head-mean
    attention between the patch tokens (N, L - 1, L - 1): the class token's row and column
    left out, never allocated.

    In row chunks of at most ``frame_budget.CHUNK_BYTES`` of attention (scores and weights):
    the (N, heads, L, L) map is never formed whole, so the attention costs no budget however
    many patches a window has (a 4096 x 4096 whole image at patch 16 would need 206 GB).
    """
    batch, heads, length, _ = q.shape
    rows = rows_per_chunk(2 * batch * heads * length * q.element_size(), length)
    out = None if v is None else torch.empty_like(v)
    average = q.new_empty((batch, length - 1, length - 1)) if mean else None
    for start in range(0, length, rows):
        part = slice(start, min(length, start + rows))
        weights = attention_rows(q, k, scale, mode, grid, part)
        if out is not None:
            out[:, :, part] = weights @ v
        if average is not None:
            patch_rows = weights[:, :, 1:] if start == 0 else weights  # class token row: no
            first = max(start, 1) - 1
            average[:, first : part.stop - 1] = patch_rows[..., 1:].mean(dim=1)
    return out, average


def block_forward(
    block: torch.nn.Module,
    x: torch.Tensor,
    mode: str,
    grid: tuple[int, int],
    mean: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A residual block with the attention of ``mode``, and with ``mean`` its head-mean
    attention between the patches (N, L - 1, L - 1) (None otherwise, and for the identity
    modes).

    REDUCED_MODES return the attention output alone (no residual, no FFN); FREECP_VARIANTS
    return the attention output plus the FFN on it (no residual); the others keep both, as
    SCLIP and the published MaskCLIP do. ``vanilla`` is the block unchanged; with its weights
    in hand, FreeCP's layer-mean affinity costs no second attention pass. The attention is
    computed in row chunks (``attend``).
    """
    attention = FREECP_VARIANTS.get(mode, mode)
    q, k, v, scale = _split_qkv(block, x)
    if attention in IDENTITY_MODES:
        out, average = v, None
    else:
        out, average = attend(q, k, v, scale, attention, grid, mean)
    out = block.ls_1(block.attn.out_proj(out.transpose(1, 2).reshape(x.shape)))
    if mode in REDUCED_MODES:
        return out, average
    if mode in FREECP_VARIANTS:
        return out + block.ls_2(block.mlp(block.ln_2(out))), average
    x = x + out
    return x + block.ls_2(block.mlp(block.ln_2(x))), average


def last_block(
    block: torch.nn.Module, x: torch.Tensor, mode: str, grid: tuple[int, int]
) -> torch.Tensor:
    """The last residual block with the attention of ``mode``; x is (N, 1 + h*w, C)."""
    return block_forward(block, x, mode, grid)[0]


@dataclass
class DenseOutput:
    """Patch features (N, h, w, D), and the patch affinity (N, h*w, h*w) when one was asked for.

    The affinity is the patch-to-patch block of the attention, averaged over heads (and layers
    for ``mean``); its rows sum to at most 1 because the class token's share is left out.
    """

    features: torch.Tensor
    affinity: torch.Tensor | None = None


def dense_forward(
    visual: VisionTransformer,
    pixels: torch.Tensor,
    mode: str = "naclip",
    affinity: str | None = None,
    pos_interpolation: str = "official",
) -> DenseOutput:
    """One forward of the image tower for normalised pixels (N, 3, H, W).

    The patch grid is (H // patch, W // patch): the patch embedding drops a remainder, as in
    the official code. ``pos_interpolation`` (POS_INTERPOLATIONS): ``official`` resizes the
    positional grid as ``mode``'s official code does (``official_pos_rule``), ``exact`` to
    exactly the grid. Raises ValueError for an unknown affinity source or interpolation.
    """
    if pos_interpolation not in POS_INTERPOLATIONS:
        raise ValueError(
            f"unknown pos_interpolation {pos_interpolation!r}: use one of {POS_INTERPOLATIONS}"
        )
    rule = official_pos_rule(mode) if pos_interpolation == "official" else "exact"
    if affinity is not None and affinity not in AFFINITY_SOURCES:
        raise ValueError(f"unknown affinity source {affinity!r}: use one of {AFFINITY_SOURCES}")
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(visual, grid, rule).to(x.dtype)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    patch_affinity = None
    for block in blocks[:-1]:
        if affinity == "mean":
            x, layer = block_forward(block, x, "vanilla", grid, mean=True)
            patch_affinity = layer if patch_affinity is None else patch_affinity.add_(layer)
        else:
            x = residual_block(block, x)
    if affinity == "mean":
        patch_affinity = patch_affinity.div_(len(blocks) - 1)
    elif affinity is not None:
        q, k, _, scale = _split_qkv(blocks[-1], x)
        patch_affinity = attend(q, k, None, scale, affinity, grid, mean=True)[1]
    x = last_block(blocks[-1], x, mode, grid)
    x = visual.ln_post(x[:, 1:]) @ visual.proj
    features = F.normalize(x.float(), dim=-1).reshape(x.shape[0], *grid, -1)
    return DenseOutput(features, None if patch_affinity is None else patch_affinity.float())


def patch_features(
    visual: VisionTransformer,
    pixels: torch.Tensor,
    mode: str = "naclip",
    pos_interpolation: str = "official",
) -> torch.Tensor:
    """Normalised patch features in text space (N, h, w, D) of normalised pixels (N, 3, H, W)."""
    return dense_forward(visual, pixels, mode, pos_interpolation=pos_interpolation).features
