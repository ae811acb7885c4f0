"""Positional-grid interpolation and last-block modes as the official code has them.

The reference values are computed here from the official formulas (NACLIP ``clip/model.py``
``interpolate_pos_encoding``, SCLIP the same, ClearCLIP ``open_clip/transformer.py``; MaskCLIP
``mmseg/models/backbones/vit.py``), not from ovss_ros code.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, TINY_VIT_B32

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.dense.forward import (
    LAST_BLOCK_MODES,
    dense_forward,
    interpolate_pos_embed,
    official_pos_rule,
    patch_features,
)


@pytest.fixture(scope="module")
def visual():
    torch.manual_seed(0)
    return load_clip(str(TINY_VIT_B32), "none", "cpu").model.visual  # native grid 7x7


def dino_positions(pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """NACLIP's interpolate_pos_encoding for an input of height x width pixels, patch 32."""
    n = int(math.sqrt(pos.shape[0] - 1))
    dim = pos.shape[1]
    h0, w0 = height // 32 + 0.1, width // 32 + 0.1
    grid = pos[1:].reshape(1, n, n, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        mode="bicubic",
        scale_factor=(h0 / math.sqrt(n * n), w0 / math.sqrt(n * n)),
        align_corners=False,
        recompute_scale_factor=False,
    )
    assert int(h0) == grid.shape[-2] and int(w0) == grid.shape[-1]
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, dim)])


def exact_positions(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """MaskCLIP's resize_pos_embed: bicubic to ``size=`` the grid."""
    n = int(math.sqrt(pos.shape[0] - 1))
    patch = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patch.flatten(2).transpose(1, 2)[0]])


def features_with_positions(visual, pixels, positions, mode):
    """The dense forward with ``positions`` swapped in: the patch grid then is native to it."""
    saved = visual.positional_embedding
    grid = (pixels.shape[-2] // 32, pixels.shape[-1] // 32)
    saved_grid = visual.grid_size
    try:
        visual.positional_embedding = torch.nn.Parameter(positions)
        visual.grid_size = grid
        with torch.no_grad():
            return patch_features(visual, pixels, mode, pos_interpolation="exact")
    finally:
        visual.positional_embedding = saved
        visual.grid_size = saved_grid


@pytest.mark.parametrize("size", [(320, 448), (224, 480), (96, 64), (1024, 64), (32, 32)])
def test_dino_rule_is_the_official_formula(visual, size):
    grid = (size[0] // 32, size[1] // 32)
    got = interpolate_pos_embed(visual, grid, "dino")
    want = dino_positions(visual.positional_embedding.detach(), *size)
    assert got.shape == want.shape == (1 + grid[0] * grid[1], visual.positional_embedding.shape[1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_exact_rule_is_a_resize_to_the_grid(visual):
    got = interpolate_pos_embed(visual, (10, 14), "exact")
    torch.testing.assert_close(
        got, exact_positions(visual.positional_embedding.detach(), (10, 14)), rtol=0, atol=1e-6
    )


def test_rules_differ_and_native_grid_is_untouched(visual):
    """Guards the tests above against both rules being one: they sample differently."""
    dino = interpolate_pos_embed(visual, (10, 14), "dino")
    exact = interpolate_pos_embed(visual, (10, 14), "exact")
    assert (dino - exact).abs().max() > 1e-3
    for rule in ("dino", "exact"):
        assert interpolate_pos_embed(visual, (7, 7), rule) is visual.positional_embedding


@pytest.mark.parametrize("mode", LAST_BLOCK_MODES)
def test_official_positions_per_mode(visual, mode):
    """``official`` = NACLIP/SCLIP/ClearCLIP's "+0.1" rule; the published MaskCLIP's size=."""
    torch.manual_seed(4)
    pixels = torch.randn(1, 3, 320, 448)
    with torch.no_grad():
        official = patch_features(visual, pixels, mode)
        exact = patch_features(visual, pixels, mode, pos_interpolation="exact")
    pos = visual.positional_embedding.detach()
    rule = "exact" if mode == "maskclip" else "dino"
    assert official_pos_rule(mode) == rule
    positions = (
        exact_positions(pos, (10, 14)) if rule == "exact" else dino_positions(pos, 320, 448)
    )
    want = features_with_positions(visual, pixels, positions, mode)
    torch.testing.assert_close(official, want, rtol=0, atol=1e-5)
    want_exact = features_with_positions(visual, pixels, exact_positions(pos, (10, 14)), mode)
    torch.testing.assert_close(exact, want_exact, rtol=0, atol=1e-5)


def test_patch_embedding_drops_the_remainder(visual):
    """An input that is not whole patches (330x470): grid 10x14, the last 10/22 px unused."""
    torch.manual_seed(5)
    pixels = torch.randn(1, 3, 330, 470)
    with torch.no_grad():
        got = patch_features(visual, pixels, "naclip")
        want = patch_features(visual, pixels[..., :320, :448].contiguous(), "naclip")
    assert got.shape[1:3] == (10, 14)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_unknown_rules_are_refused(visual):
    with pytest.raises(ValueError, match="unknown pos_interpolation 'nearest'"):
        dense_forward(visual, torch.randn(1, 3, 224, 224), pos_interpolation="nearest")
    with pytest.raises(ValueError, match="rule 'bilinear'"):
        interpolate_pos_embed(visual, (3, 3), "bilinear")


def maskclip_published(visual, pixels):
    """MaskCLIP's ViT (vit.py ``TransformerEncoderLayer.forward`` with return_qkv, then the
    final norm and MaskClipHead's projection): v = out_proj(v_proj(norm1(x))); v += x;
    v = ffn(norm2(v), identity=v); features = proj(norm(v))."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1)
    x = visual.ln_pre(x + visual.positional_embedding)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    block = visual.transformer.resblocks[-1]
    width = x.shape[-1]
    y = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
    v = F.linear(y[..., 2 * width :], block.attn.out_proj.weight, block.attn.out_proj.bias)
    v = v + x
    v = v + block.mlp(block.ln_2(v))
    return F.normalize(visual.ln_post(v[:, 1:]) @ visual.proj, dim=-1)


def maskclip_clearclip_ablation(visual, pixels):
    """ClearCLIP's ``custom_attn`` with model_type MaskCLIP and ignore_residual: the diagonal
    attention's output alone (out_proj of v), no residual, no FFN."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1)
    x = visual.ln_pre(x + visual.positional_embedding)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    block = visual.transformer.resblocks[-1]
    _, _, v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(
        3, -1
    )
    out = block.attn.out_proj(v)
    return F.normalize(visual.ln_post(out[:, 1:]) @ visual.proj, dim=-1)


@pytest.mark.parametrize("config", [TINY_VIT, TINY_VIT_B32], ids=["p16", "p32"])
def test_maskclip_is_the_published_one_and_the_ablation_has_its_own_name(config):
    torch.manual_seed(6)
    visual = load_clip(str(config), "none", "cpu").model.visual
    pixels = torch.randn(2, 3, *visual.image_size)
    grid = tuple(visual.grid_size)
    with torch.no_grad():
        published = patch_features(visual, pixels, "maskclip").flatten(1, 2)
        reduced = patch_features(visual, pixels, "maskclip_reduced").flatten(1, 2)
        want_published = maskclip_published(visual, pixels)
        want_reduced = maskclip_clearclip_ablation(visual, pixels)
    assert published.shape == (2, grid[0] * grid[1], visual.output_dim)
    torch.testing.assert_close(published, want_published, rtol=0, atol=1e-5)
    torch.testing.assert_close(reduced, want_reduced, rtol=0, atol=1e-5)
    assert (published - reduced).abs().max() > 1e-2
