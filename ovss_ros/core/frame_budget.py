"""The per-frame budget: the largest map one frame may need, and the sizes that respects.

``FRAME_BUDGET_BYTES`` (1 GiB) bounds the largest single map (tensor) that one frame's work
allocates whole. Every size-like setting is checked against it before it is accepted, with the
cost computed from the architecture that runs it, and refused with that cost in the reason
(``dslo.sd.size 2048 needs a 2.15 GB VAE activation per frame; at most 1448``). A map that can be
computed in row chunks is computed so, in chunks of at most ``CHUNK_BYTES``, and then bounds
nothing: the last CLIP block's attention (each row's softmax times the values, never the whole
map), the mean attention of the earlier blocks (accumulated row by row), Stable Diffusion's
self-attention (pooled to the CLIP patch grid a chunk of query rows at a time), sliding-window
batches, FreeCP's crop batches. What has to exist whole, and so is budgeted:

- ``dslo.sd.size``: SD2's VAE encoder runs its first blocks at the full SD input resolution with
  128 channels (``AutoencoderKL.block_out_channels[0]``): ``size^2 x 128 x 4`` bytes in float32
  (the SD input keeps about ``size^2`` pixels, ``sd2_attention.sd_input_size``), one window at a
  time. The UNet's own attention runs in PyTorch's fused kernels (no map), its activations are 25x
  smaller than the VAE's;
- ``pnp.image_size``: BLIP's vision transformer forms its attention map whole,
  ``heads x L^2 x 4`` bytes with ``L = (size / patch)^2 + 1`` tokens (BLIP ITM large: ViT-L/16,
  16 heads), one layer at a time (no gradient flows through the vision tower);
- a patch affinity (DSLO's transition matrix, FreeCP's propagation): ``windows x (h w)^2 x 4``
  bytes for the ``h x w`` patch grid of each window (``short_side``, ``max_long_side``, ``crop``);
- proposal masks (DeOP, two-stream): ``proposals x (h cells) x (w cells) x 4`` bytes;
- two-stream crops: ``crop_batch x L x 4 width x 4`` bytes, the MLP activation of one CLIP
  forward over the batch of crops (``L`` tokens of a crop at CLIP's input size).

The node's parameter ranges (``node_parameters``) are these limits for the default models (SD 2,
BLIP ITM large, ViT-B/16); the engine checks the same formulas against the models it loaded.
"""

from __future__ import annotations

import math

FRAME_BUDGET_BYTES = 1 << 30  # the largest single map one frame may need whole (1 GiB)
CHUNK_BYTES = 1 << 27  # a chunk of a map computed in row chunks (128 MiB)
FLOAT_BYTES = 4  # maps are float32 (attention is computed in float32 even for half models)

# Upper bound of max_long_side (and short_side, crop, stride): a 4K UHD frame (3840 px) fits
# unscaled. The whole-image forward computes its attention in row chunks (frame_budget), so only
# the maps that must exist whole (DSLO's and FreeCP's patch affinity) bound the frame further.
MAX_LONG_SIDE_LIMIT = 4096
# Float32 elements of one chunk of class maps in postprocess (64 MiB): a frame's peak memory is a
# few such buffers (or a few input-sized maps, if larger) whatever the number of text queries.
POSTPROCESS_ELEMENTS = 1 << 24

# Architectures of the default models, for the node's static ranges.
SD2_VAE_CHANNELS = 128  # AutoencoderKL block_out_channels[0], SD 2.x (and 1.x)
BLIP_PATCH, BLIP_HEADS = 16, 16  # BLIP ITM large's vision transformer (ViT-L/16)
CLIP_B16_TOKENS, CLIP_B16_MLP = 197, 3072  # ViT-B/16 at 224 px: 14 x 14 + 1 tokens, 4 x 768


class FrameBudgetError(ValueError):
    """A setting whose frame would need a map larger than FRAME_BUDGET_BYTES."""


def gigabytes(count: float) -> str:
    """A byte count for a message, in decimal units as the issue and ``df -H`` write them:
    ``17179869184`` -> ``17.2 GB``, ``1073741824`` -> ``1.07 GB``, ``521800`` -> ``521.8 kB``."""
    if count < 1e6:
        return f"{count / 1e3:.1f} kB"
    if count < 1e9:
        return f"{count / 1e6:.1f} MB"
    return f"{count / 1e9:.2f} GB" if count < 1e10 else f"{count / 1e9:.1f} GB"


def refuse(setting: str, value: object, cost: int, what: str, most: object) -> FrameBudgetError:
    """The refusal of ``setting value``: its cost per frame, the largest value that fits."""
    return FrameBudgetError(
        f"{setting} {value} needs a {gigabytes(cost)} {what} per frame; at most {most} "
        f"(the per-frame budget is {gigabytes(FRAME_BUDGET_BYTES)} for the largest map)"
    )


def frame_grid(short_side: int, max_long_side: int, patch: int) -> tuple[int, int]:
    """The patch grid of the largest frame the size settings allow: ``max_long_side`` by
    ``short_side`` (square at ``max_long_side`` when ``short_side`` is 0), in patches."""
    short = min(short_side or max_long_side, max_long_side)
    return max(1, short // patch), max(1, max_long_side // patch)


def rows_per_chunk(bytes_per_row: int, rows: int) -> int:
    """Rows of a map computed together so that a chunk holds at most CHUNK_BYTES (at least
    one row; all of them when the whole map fits)."""
    return max(1, min(rows, CHUNK_BYTES // max(1, bytes_per_row)))


# --- Stable Diffusion (DSLO's sd2 affinity) --------------------------------------------------


def sd_map_bytes(size: int, vae_channels: int = SD2_VAE_CHANNELS, itemsize: int = 4) -> int:
    """The largest whole map of one SD forward: the VAE's first activation, ``size^2`` pixels of
    ``vae_channels`` channels (the SD input keeps at most ``size^2`` pixels)."""
    return size * size * vae_channels * itemsize


def sd_max_size(vae_channels: int = SD2_VAE_CHANNELS, itemsize: int = 4) -> int:
    """The largest ``dslo.sd.size`` within the budget (SD2, float32: 1448)."""
    return math.isqrt(FRAME_BUDGET_BYTES // (vae_channels * itemsize))


def check_sd_size(size: int, vae_channels: int = SD2_VAE_CHANNELS, itemsize: int = 4) -> None:
    """FrameBudgetError when ``dslo.sd.size`` needs a VAE activation beyond the budget."""
    cost = sd_map_bytes(size, vae_channels, itemsize)
    if cost > FRAME_BUDGET_BYTES:
        most = sd_max_size(vae_channels, itemsize)
        raise refuse("dslo.sd.size", size, cost, "VAE activation", most)


# --- the VLM of PnP-OVSS -----------------------------------------------------------------------


def vlm_attention_bytes(image_size: int, patch: int = BLIP_PATCH, heads: int = BLIP_HEADS) -> int:
    """One vision-transformer layer's attention map: ``heads x L^2`` float32, ``L`` tokens."""
    tokens = (image_size // patch) ** 2 + 1
    return heads * tokens * tokens * FLOAT_BYTES


def vlm_max_image_size(patch: int = BLIP_PATCH, heads: int = BLIP_HEADS) -> int:
    """The largest square VLM input (a multiple of ``patch``) within the budget (BLIP large:
    1008, a 63 x 63 grid)."""
    tokens = math.isqrt(FRAME_BUDGET_BYTES // (heads * FLOAT_BYTES))
    return math.isqrt(tokens - 1) * patch


def check_vlm_image_size(
    size: int, patch: int = BLIP_PATCH, heads: int = BLIP_HEADS, setting: str = "pnp.image_size"
) -> None:
    """FrameBudgetError when the VLM's attention map at ``size`` exceeds the budget."""
    cost = vlm_attention_bytes(size, patch, heads)
    if cost > FRAME_BUDGET_BYTES:
        raise refuse(setting, size, cost, "attention map", vlm_max_image_size(patch, heads))


# --- dense CLIP: patch affinities -------------------------------------------------------------


def affinity_bytes(windows: int, patches: int) -> int:
    """A patch affinity of ``windows`` windows of ``patches`` patches each (float32)."""
    return windows * patches * patches * FLOAT_BYTES


def check_affinity(windows: int, grid: tuple[int, int], settings: str) -> None:
    """FrameBudgetError naming ``settings`` (what decides the grid) when the affinity of
    ``windows`` windows of a ``grid`` of patches exceeds the budget."""
    patches = grid[0] * grid[1]
    cost = affinity_bytes(windows, patches)
    if cost > FRAME_BUDGET_BYTES:
        most = math.isqrt(FRAME_BUDGET_BYTES // (windows * FLOAT_BYTES))
        raise FrameBudgetError(
            f"{settings} give {windows} window(s) of {grid[0]}x{grid[1]} patches, whose patch "
            f"affinity needs a {gigabytes(cost)} map per frame; at most {most} patches a window "
            f"(the per-frame budget is {gigabytes(FRAME_BUDGET_BYTES)} for the largest map): "
            "lower short_side or max_long_side, or use sliding windows (crop)"
        )


# --- proposals (DeOP, two-stream) -------------------------------------------------------------


def proposal_mask_bytes(proposals: int, grid: tuple[int, int], cells: int) -> int:
    """Soft proposal masks on the mask grid: ``proposals x (h cells) x (w cells)`` float32."""
    return proposals * grid[0] * cells * grid[1] * cells * FLOAT_BYTES


def check_proposal_masks(proposals: int, grid: tuple[int, int], cells: int) -> None:
    """FrameBudgetError when the proposal masks of the largest frame exceed the budget."""
    cost = proposal_mask_bytes(proposals, grid, cells)
    if cost > FRAME_BUDGET_BYTES:
        most = FRAME_BUDGET_BYTES // proposal_mask_bytes(1, grid, cells)
        raise FrameBudgetError(
            f"deop.proposals {proposals} with deop.mask_cells {cells} on a {grid[0]}x{grid[1]} "
            f"patch grid need {gigabytes(cost)} of proposal masks per frame; at most {most} "
            f"proposals (the per-frame budget is {gigabytes(FRAME_BUDGET_BYTES)} for the largest "
            "map): lower deop.proposals, deop.mask_cells, short_side or max_long_side"
        )


def crop_batch_bytes(crops: int, tokens: int = CLIP_B16_TOKENS, mlp: int = CLIP_B16_MLP) -> int:
    """The MLP activation of one CLIP forward over ``crops`` crops of ``tokens`` tokens."""
    return crops * tokens * mlp * FLOAT_BYTES


def max_crop_batch(tokens: int = CLIP_B16_TOKENS, mlp: int = CLIP_B16_MLP) -> int:
    """The largest crop batch within the budget (ViT-B/16 at 224 px: 443)."""
    return max(1, FRAME_BUDGET_BYTES // crop_batch_bytes(1, tokens, mlp))


def check_crop_batch(
    crops: int,
    tokens: int = CLIP_B16_TOKENS,
    mlp: int = CLIP_B16_MLP,
    setting: str = "twostream.crop_batch",
) -> None:
    """FrameBudgetError when one CLIP forward over ``crops`` crops exceeds the budget."""
    cost = crop_batch_bytes(crops, tokens, mlp)
    if cost > FRAME_BUDGET_BYTES:
        raise refuse(setting, crops, cost, "CLIP activation", max_crop_batch(tokens, mlp))


__all__ = [
    "frame_grid",
    "CHUNK_BYTES",
    "FRAME_BUDGET_BYTES",
    "FrameBudgetError",
    "affinity_bytes",
    "check_affinity",
    "check_crop_batch",
    "check_proposal_masks",
    "check_sd_size",
    "check_vlm_image_size",
    "crop_batch_bytes",
    "max_crop_batch",
    "proposal_mask_bytes",
    "rows_per_chunk",
    "sd_map_bytes",
    "sd_max_size",
    "vlm_attention_bytes",
    "vlm_max_image_size",
]
