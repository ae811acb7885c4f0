"""Blocks 1..L-1 of the dense forward: ``residual_block`` against open_clip's own blocks.

``residual_block`` computes the attention with ``F.scaled_dot_product_attention`` and folds the
residual adds into the output projections (benchmarks/dense_forward_speed.py says why); the
result must be open_clip's ``block(x)`` to float rounding (1e-5) on the tiny test configs,
ViT-B-16 random weights at a small input, and the block variants open_clip builds (layer scale,
QuickGELU). Blocks of another structure must fall back to ``block(x)`` itself.
"""

import open_clip
import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_B32
from open_clip.transformer import VisionTransformer

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.dense import forward as dense_clip
from ovss_ros.core.methods.dense.forward import (
    LAST_BLOCK_MODES,
    _plain_attention,
    dense_forward,
    residual_block,
)
from ovss_ros.core.methods.deop.proposal_segmentation import tokens_before_last_block

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def tiny(path):
    torch.manual_seed(0)
    return load_clip(str(path), "none", "cpu").model.visual


def vit_b16():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()


def layer_scale_vit():
    """open_clip's ViT with LayerScale and QuickGELU (the OpenAI weights' activation)."""
    torch.manual_seed(0)
    visual = VisionTransformer(
        image_size=64,
        patch_size=16,
        width=64,
        layers=3,
        heads=2,
        mlp_ratio=4.0,
        ls_init_value=0.5,
        output_dim=32,
        act_layer=open_clip.transformer.QuickGELU,
    )
    return visual.eval()


MODELS = {
    "tiny-vit": (lambda: tiny(TINY_VIT), 64),
    "tiny-vit-b32": (lambda: tiny(TINY_VIT_B32), 96),
    "vit-b-16": (vit_b16, 64),
    "layer-scale+quickgelu": (layer_scale_vit, 64),
}


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def model(request):
    build, side = MODELS[request.param]
    return build(), side


def tokens(visual, side, batch=2):
    """Realistic block inputs: the embedded tokens of random pixels (N, 1 + h*w, C)."""
    torch.manual_seed(1)
    pixels = torch.randn(batch, 3, side, side)
    with torch.no_grad():
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(batch, 1, -1), x], 1)
        grid = (side // visual.patch_size[0],) * 2
        return visual.ln_pre(x + dense_clip.interpolate_pos_embed(visual, grid)), pixels


def test_every_block_equals_open_clip(model):
    visual, side = model
    x, _ = tokens(visual, side)
    with torch.inference_mode():
        for block in visual.transformer.resblocks:
            assert _plain_attention(block)  # the fast path runs, not the fallback
            want = block(x)
            torch.testing.assert_close(residual_block(block, x), want, **TOLERANCE)
            x = want


def test_the_chain_of_blocks_equals_open_clip(model):
    """Rounding does not add up over the blocks: tokens before the last block, both ways."""
    visual, side = model
    x, pixels = tokens(visual, side)
    with torch.inference_mode():
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        got, grid = tokens_before_last_block(visual, pixels)
    assert grid == (side // visual.patch_size[0],) * 2
    torch.testing.assert_close(got, x, **TOLERANCE)


@pytest.mark.parametrize("mode", LAST_BLOCK_MODES)
def test_dense_forward_equals_open_clip_blocks(model, monkeypatch, mode):
    """The whole dense forward with open_clip's blocks 1..L-1 swapped back in."""
    visual, side = model
    _, pixels = tokens(visual, side)
    with torch.inference_mode():
        got = dense_forward(visual, pixels, mode).features
        monkeypatch.setattr(dense_clip, "residual_block", lambda block, x: block(x))
        want = dense_forward(visual, pixels, mode).features
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_gradients_equal_open_clip():
    """The in-place accumulation is autograd-safe: same input gradient as open_clip's block."""
    visual = tiny(TINY_VIT)
    x, _ = tokens(visual, 64)
    block = visual.transformer.resblocks[0]
    grads = []
    for run in (residual_block, lambda b, t: b(t)):
        leaf = x.clone().requires_grad_()
        (run(block, leaf) ** 2).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOLERANCE)


def test_other_blocks_run_as_they_are():
    """A block open_clip builds with a different attention (CustomResidualAttentionBlock, used
    for qk-norm / scaled-cosine models) is not rewritten: residual_block is block(x) exactly."""
    torch.manual_seed(0)
    visual = VisionTransformer(
        image_size=64,
        patch_size=16,
        width=64,
        layers=2,
        heads=2,
        mlp_ratio=4.0,
        output_dim=32,
        block_type="custom",
        qk_norm=True,
    ).eval()
    block = visual.transformer.resblocks[0]
    assert not _plain_attention(block)
    x, _ = tokens(visual, 64)
    with torch.inference_mode():
        assert torch.equal(residual_block(block, x), block(x))


def test_training_dropout_falls_back():
    """Attention dropout in training mode is open_clip's to apply, not ours."""
    block = open_clip.transformer.ResidualAttentionBlock(64, 2)
    block.attn.dropout = 0.1
    block.train()
    assert not _plain_attention(block)
    block.eval()
    assert _plain_attention(block)
