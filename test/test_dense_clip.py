"""Every last-block mode against an independent reference written from the papers' equations."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, TINY_VIT_B32
from open_clip.model import resize_pos_embed

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.dense.forward import LAST_BLOCK_MODES, dense_forward, patch_features


@pytest.fixture(scope="module", params=[TINY_VIT, TINY_VIT_B32], ids=["p16", "p32"])
def visual(request):
    torch.manual_seed(0)
    return load_clip(str(request.param), "none", "cpu").model.visual


def reference_features(visual, pixels, mode):
    """Straight from the equations, one head at a time; positions must be the native grid."""
    x = F.conv2d(pixels, visual.conv1.weight, stride=visual.conv1.stride)
    grid_h, grid_w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1)
    x = visual.ln_pre(x + visual.positional_embedding)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    width = x.shape[-1]
    heads = attn.num_heads
    head_dim = width // heads
    h = block.ln_1(x)
    w_q, w_k, w_v = attn.in_proj_weight.split(width)
    b_q, b_k, b_v = attn.in_proj_bias.split(width)
    q, k, v = h @ w_q.T + b_q, h @ w_k.T + b_k, h @ w_v.T + b_v
    tokens = x.shape[1]
    omega = torch.zeros(tokens, tokens)
    for i in range(1, tokens):
        for j in range(1, tokens):
            ri, ci = divmod(i - 1, grid_w)
            rj, cj = divmod(j - 1, grid_w)
            omega[i, j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * 5.0**2))
    s = head_dim**-0.5
    freecp = mode.endswith("_freecp")  # FreeCP's forward_all: the base's attention ...
    mode = mode.removesuffix("_freecp")
    outs = []
    for head in range(heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        qh, kh, vh = q[..., cols], k[..., cols], v[..., cols]
        if mode == "naclip":
            a = torch.softmax(kh @ kh.transpose(1, 2) * s + omega, -1)
        elif mode == "sclip":
            a = torch.softmax(qh @ qh.transpose(1, 2) * s, -1)
            a = a + torch.softmax(kh @ kh.transpose(1, 2) * s, -1)
        elif mode == "clearclip":
            a = torch.softmax(qh @ qh.transpose(1, 2) * s, -1)
        elif mode in ("maskclip", "maskclip_reduced"):
            a = torch.eye(tokens).expand(x.shape[0], -1, -1)
        else:
            a = torch.softmax(qh @ kh.transpose(1, 2) * s, -1)
        outs.append(a @ vh)
    o = torch.cat(outs, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
    if mode in ("naclip", "clearclip", "maskclip_reduced"):
        x = o
    elif freecp:  # ... then the FFN on the attention output, without the residual stream
        x = o + block.mlp(block.ln_2(o))
    else:  # SCLIP, vanilla, and MaskCLIP as published (vit.py: v += x; v = ffn(norm2(v), v))
        x = x + o
        x = x + block.mlp(block.ln_2(x))
    features = visual.ln_post(x) @ visual.proj
    return F.normalize(features[:, 1:], dim=-1).reshape(x.shape[0], grid_h, grid_w, -1)


@pytest.mark.parametrize("mode", LAST_BLOCK_MODES)
def test_mode_matches_reference(visual, mode):
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, *visual.image_size)
    with torch.no_grad():
        got = patch_features(visual, pixels, mode)
        want = reference_features(visual, pixels, mode)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_modes_differ(visual):
    """Guards the reference test against modes that silently fall back to one another."""
    pixels = torch.randn(1, 3, *visual.image_size)
    with torch.no_grad():
        outputs = [patch_features(visual, pixels, mode) for mode in LAST_BLOCK_MODES]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert (outputs[i] - outputs[j]).abs().max() > 1e-3


def test_vanilla_equals_open_clip_tokens():
    torch.manual_seed(2)
    visual = load_clip(str(TINY_VIT_B32), "none", "cpu").model.visual
    pixels = torch.randn(1, 3, 224, 224)
    visual.output_tokens = True
    with torch.no_grad():
        _, tokens = visual(pixels)
        ours = patch_features(visual, pixels, "vanilla")
    want = F.normalize(tokens @ visual.proj, dim=-1).reshape(1, 7, 7, -1)
    assert (ours - want).abs().max().item() <= 1e-5


def test_exact_positions_match_open_clip_resize():
    """With ``pos_interpolation="exact"`` a 320x448 input (10x14 grid) matches open_clip's own
    bicubic positional resize to the grid size (without antialiasing). The official NACLIP /
    SCLIP / ClearCLIP rule ("+0.1") differs from it: test_conventions_positions.py."""
    torch.manual_seed(3)
    visual = load_clip(str(TINY_VIT_B32), "none", "cpu").model.visual
    pixels = torch.randn(1, 3, 320, 448)
    with torch.no_grad():
        ours = patch_features(visual, pixels, "naclip", pos_interpolation="exact")
    resized = open_clip.create_model(TINY_VIT_B32.stem, pretrained=None).visual
    resized.load_state_dict(visual.state_dict())
    resized.eval()
    state = {"visual.positional_embedding": visual.positional_embedding.detach().clone()}

    class Holder(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.visual = v

    holder = Holder(resized)
    holder.visual.grid_size = (10, 14)
    resize_pos_embed(state, holder, antialias=False)
    resized.positional_embedding = torch.nn.Parameter(state["visual.positional_embedding"])
    with torch.no_grad():
        want = reference_features(resized, pixels, "naclip")
    assert ours.shape == (1, 10, 14, 48)
    assert (ours - want).abs().max().item() <= 1e-5


def test_works_on_a_stock_open_clip_config():
    """Not only our test configs: open_clip's ViT-S-16 runs every mode at a non-square size."""
    model = open_clip.create_model("ViT-S-16", pretrained=None)
    pixels = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        for mode in LAST_BLOCK_MODES:
            features = patch_features(model.visual, pixels, mode)
            assert features.shape == (1, 6, 10, model.visual.output_dim)
            assert torch.allclose(features.norm(dim=-1), torch.ones(1, 6, 10), atol=1e-5)


def test_mean_affinity_is_the_mean_of_torch_attention_weights(visual):
    """Reference: nn.MultiheadAttention's own head-averaged weights of blocks 1..L-1."""
    pixels = torch.randn(2, 3, *visual.image_size)
    with torch.no_grad():
        got = dense_forward(visual, pixels, "naclip", affinity="mean")
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1)
        x = visual.ln_pre(x + visual.positional_embedding)
        layers = []
        for block in visual.transformer.resblocks[:-1]:
            h = block.ln_1(x)
            layers.append(block.attn(h, h, h, need_weights=True)[1][:, 1:, 1:])
            x = block(x)
    want = torch.stack(layers).mean(0)
    assert got.affinity.shape == want.shape
    assert (got.affinity - want).abs().max().item() <= 1e-6
    # the explicit attention of the affinity pass and torch's fused one agree to rounding
    torch.testing.assert_close(got.features, patch_features(visual, pixels, "naclip"))


@pytest.mark.parametrize("source", ["naclip", "keykey"])
def test_last_block_affinity(visual, source):
    pixels = torch.randn(1, 3, *visual.image_size)
    with torch.no_grad():
        affinity = dense_forward(visual, pixels, "maskclip", affinity=source).affinity
    tokens = visual.grid_size[0] * visual.grid_size[1]
    assert affinity.shape == (1, tokens, tokens)
    assert (affinity >= 0).all() and (affinity.sum(-1) <= 1 + 1e-5).all()


def test_unknown_affinity_source_rejected(visual):
    with pytest.raises(ValueError, match="affinity source"):
        dense_forward(visual, torch.randn(1, 3, *visual.image_size), affinity="sd2")
