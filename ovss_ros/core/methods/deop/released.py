"""DeOP's dense CLIP pass as released: learned positions and the severed last block driven by the
proposal network's 100 soft masks.

Source: ``ZeroShotClipfeatUpsample_addnorm_vit16Query2D_maskvit.forward`` (``mask_former/
zero_shot_clipfeat_upsample_vit16_query2D_maskvit.py``) and ``VisionTransformerLearnPosition``,
``ResidualAttentionBlockVitPosition``, ``multi_head_attention_forward_vit_softmax_noattn``
(``third_party/CLIP/clip/model.py``) of CongHan0808/DeOP, run by ``scripts/deop_train.sh`` and
``deop_verifycoco.sh`` (``LEARN_POSITION True``, ``POSITION_LAYERS [1,2,3,4,5]``,
``LAYERMASKVIT [11]``):

1. patch embedding, class token, CLIP's positional embedding and the *learned* input position
   (both resized bicubically to the patch grid, the class entry kept), ln_pre;
2. blocks 0..L-2, a learned position added to the tokens before each of blocks 1..5;
3. the last block severed (:func:`~ovss_ros.core.methods.deop.deop.severed_last_block`) with
   residual 1.0 (the released block's residual scaling is commented out) and token weights
   :func:`severance_weights`: the proposals' mask *logits* resized bilinearly to the patch grid,
   then the sigmoid, summed over the 100 proposals (the class token: 100);
4. ln_post, projection, L2 norm.

The CAL decoder then reads the proposals as :func:`decoder_masks`: the sigmoid first, then the
bilinear resize (the two uses resize in opposite orders in the release; both are kept).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ovss_ros.core.methods.dense.forward import interpolate_pos_embed, residual_block
from ovss_ros.core.methods.deop.deop import severed_last_block
from ovss_ros.core.methods.deop.maskformer import class_logits, prepare_images, semantic_inference

POSITION_LAYERS = (1, 2, 3, 4, 5)  # CLIP_ADAPTER.POSITION_LAYERS of the scripts
POSITION_GRID = 24  # INPUT.LEARNPOSITIONRES 384 / patch 16
RELEASED_RESIDUAL = 1.0


def resize_positions(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A (1 + n*n, C) position table for a (h, w) patch grid: (1 + h*w, C), the n x n part
    resized bicubically (corners not aligned, no antialiasing), the class entry kept."""
    side = round((table.shape[0] - 1) ** 0.5)
    if (side, side) == tuple(grid):
        return table
    patches = table[1:].T.reshape(1, -1, side, side)
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], patches.reshape(table.shape[1], -1).T])


class LearnedPositions(nn.Module):
    """DeOP's learned positional embeddings: ``input`` (added with CLIP's at the ViT input) and
    one per block of ``layers`` (added to the tokens before that block), each (1 + 24*24, width),
    initialised ``width**-0.5 * randn`` as released (``model.py`` ``learned_position``)."""

    def __init__(
        self, width: int, layers: Iterable[int] = POSITION_LAYERS, grid: int = POSITION_GRID
    ) -> None:
        super().__init__()
        scale = width**-0.5
        self.input = nn.Parameter(scale * torch.randn(1 + grid * grid, width))
        self.layers = tuple(layers)
        self.blocks = nn.ParameterList(
            nn.Parameter(scale * torch.randn(1 + grid * grid, width)) for _ in self.layers
        )

    def before_block(self, index: int, grid: tuple[int, int]) -> torch.Tensor | None:
        """The resized position added before block ``index`` (0-based), or None."""
        if index not in self.layers:
            return None
        return resize_positions(self.blocks[self.layers.index(index)], grid)


def severance_weights(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Token weights (N, 1 + h*w) of the severed block from mask logits (N, Q, H/4, W/4):
    ``sigmoid(interpolate(logits, grid, bilinear))`` summed over the Q proposals; the class
    token's weight is Q (the release prepends a column of ones)."""
    masks = F.interpolate(mask_logits.float(), size=grid, mode="bilinear", align_corners=False)
    per_patch = masks.sigmoid().sum(dim=1).flatten(1)
    count = per_patch.new_full((per_patch.shape[0], 1), float(mask_logits.shape[1]))
    return torch.cat([count, per_patch], dim=1)


def decoder_masks(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The proposals as the CAL decoder reads them: ``interpolate(sigmoid(logits), grid,
    bilinear)``, (N, Q, h, w) in [0, 1]."""
    masks = mask_logits.float().sigmoid()
    return F.interpolate(masks, size=grid, mode="bilinear", align_corners=False)


def released_dense_features(
    visual: nn.Module,
    pixels: torch.Tensor,
    mask_logits: torch.Tensor,
    positions: LearnedPositions,
    residual: float = RELEASED_RESIDUAL,
) -> torch.Tensor:
    """Dense CLIP features (N, h, w, D), L2-normalised, of images (N, 3, H, W) as normalised for
    the proposal network, with the proposal mask logits (N, Q, H/4, W/4) (module docstring).

    ``visual``: an open_clip VisionTransformer (OpenAI CLIP's ViT-B/16 for the release).
    """
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(visual, grid).to(x.dtype)
    x = visual.ln_pre(x + resize_positions(positions.input, grid).to(x.dtype))
    blocks = visual.transformer.resblocks
    for index, block in enumerate(blocks[:-1]):
        learned = positions.before_block(index, grid)
        x = residual_block(block, x if learned is None else x + learned.to(x.dtype))
    weights = severance_weights(mask_logits, grid)
    x = severed_last_block(blocks[-1], x, weights, residual)
    x = visual.ln_post(x[:, 1:]) @ visual.proj
    return F.normalize(x.float(), dim=-1).reshape(x.shape[0], *grid, -1)


# DeOP's decoder (``TransformerDecoderLinear``: its layers and the output layer) -> AnchorDecoder.
_DECODER_NAMES = [
    (r"layers\.(\d+)\.self_attn\.", r"layers.\1.self_attn."),
    (r"layers\.(\d+)\.multihead_attn_my\.", r"layers.\1.cross_attn."),
    (r"layers\.(\d+)\.linear1\.", r"layers.\1.ffn.0."),
    (r"layers\.(\d+)\.linear2\.", r"layers.\1.ffn.3."),
    (r"layers\.(\d+)\.norm([123])\.", lambda m: f"layers.{m[1]}.norms.{int(m[2]) - 1}."),
    (r"outlayer\.self_attn\.", "out_attn."),
    (r"outlayer\.norm1\.", "out_norm."),
]


def released_decoder_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An :class:`~ovss_ros.core.methods.deop.heads.AnchorDecoder` (``slots=100``) state dict
    from a released DeOP file's ``decoder.*`` and ``query_embedding.weight``.

    The output layer's ``multihead_attn_my`` projects only queries and keys (its value slice and
    ``decoder.norm``, used for auxiliary losses, are unused at inference). Raises KeyError
    naming an official key that is missing; ``load_state_dict(strict=True)`` names the rest.
    """
    state = {}
    for key, value in tensors.items():
        if not key.startswith("decoder."):
            continue
        name = key[len("decoder.") :]
        for pattern, target in _DECODER_NAMES:
            match = re.match(pattern, name)
            if match:
                prefix = target(match) if callable(target) else match.expand(target)
                state[prefix + name[match.end() :]] = value
                break
    for name in ("weight", "bias"):
        packed = tensors[f"decoder.outlayer.multihead_attn_my.in_proj_{name}"]
        query, key, _ = packed.chunk(3)
        state[f"anchor_q.{name}"], state[f"anchor_k.{name}"] = query, key
    state["query_embedding.weight"] = tensors["query_embedding.weight"]
    return state


def released_scores(
    proposals: nn.Module,
    visual: nn.Module,
    positions: LearnedPositions,
    decoder: nn.Module,
    text: torch.Tensor,
    void: torch.Tensor,
    rgb: torch.Tensor,
) -> torch.Tensor:
    """Published DeOP's per-class scores (N, K, H, W) of 0-255 RGB frames (N, 3, H, W) (already
    resized: short side 512 in the release) for class text embeddings (K, D).

    Source: ``ZeroShotClipfeatUpsample_addnorm_vit16Query2D_maskvit.forward`` and
    ``semantic_inference``: the proposal network on the ImageNet-normalised frame padded to /32;
    the same tensor through CLIP (:func:`released_dense_features`); the CAL decoder on
    :func:`decoder_masks`; ``100 * cos`` against the texts and the "no object" row; the mask
    logits upsampled bilinearly to the padded size and cropped; ``softmax[..., :-1]`` x
    ``sigmoid(masks)`` summed over the proposals. ``proposals``: a ProposalNetwork; ``decoder``:
    an AnchorDecoder with one slot per proposal.
    """
    images, (height, width) = prepare_images(rgb)
    mask_logits = proposals(images).mask_logits
    features = released_dense_features(visual, images, mask_logits, positions)
    masks = decoder_masks(mask_logits, tuple(features.shape[1:3]))
    valid = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
    embeddings = decoder(features, masks, valid)
    logits = class_logits(embeddings, text.float(), void.float())
    full = F.interpolate(
        mask_logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False
    )
    return semantic_inference(logits, full[..., :height, :width])
