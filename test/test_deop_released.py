"""DeOP's dense CLIP pass and decoder as released (ovss_ros.core.methods.deop.released), against
the official code's formulas written out here: ``VisionTransformerLearnPosition.forward``,
``ResidualAttentionBlockVitPosition.forward`` and ``multi_head_attention_forward_vit_softmax_
noattn`` (``third_party/CLIP/clip/model.py``), and ``TransformerDecoderLinear`` with its output
layer ``TransformerDecoderOutLayerLinear`` / ``MultiHeadAttentionMy`` (``mask_former/modeling/
transformer/transformer.py``) of CongHan0808/DeOP, on random weights and 100 overlapping soft
proposals (severance weights far from 1), on a 7-block open_clip ViT (learned positions before
blocks 1-5, as released) in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIPVisionCfg, _build_vision_tower

from ovss_ros.core.methods.deop.heads import AnchorDecoder
from ovss_ros.core.methods.deop.released import (
    LearnedPositions,
    decoder_masks,
    released_decoder_state,
    released_dense_features,
    severance_weights,
)

QUERIES, HEADS = 100, 8


@pytest.fixture(scope="module")
def visual():
    torch.manual_seed(0)
    config = CLIPVisionCfg(image_size=64, layers=7, width=64, patch_size=16, head_width=32)
    return _build_vision_tower(32, config, quick_gelu=True).double().eval()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 96, 80, generator=gen, dtype=torch.float64)  # a 6 x 5 grid
    mask_logits = 3 * torch.randn(2, QUERIES, 24, 20, generator=gen, dtype=torch.float64)
    return pixels, mask_logits


def official_resize(table, gh, gw):
    """``learned_position`` / ``positional_embedding`` resized as model.py resizes them."""
    side = int((table.shape[0] - 1) ** 0.5)
    grid = (
        F.interpolate(
            table[1:, :].permute(1, 0).view(1, -1, side, side), size=(gh, gw), mode="bicubic"
        )
        .reshape(-1, gh * gw)
        .permute(1, 0)
    )
    return torch.cat([table[0:1, :], grid])


def official_gps_attention(block, x_lnd, mask_feature):
    """multi_head_attention_forward_vit_softmax_noattn on ln_1(x) (L, N, E), then out_proj."""
    attn = block.attn
    tgt_len, bsz, embed_dim = x_lnd.shape
    num_heads = attn.num_heads
    head_dim = embed_dim // num_heads
    _, _, v = F.linear(x_lnd, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    _, _, mh, mw = mask_feature.shape
    mask = F.interpolate(mask_feature, size=(mh // 4, mw // 4), mode="bilinear")
    flat = mask.reshape(bsz, -1, (mh // 4) * (mw // 4)).repeat(num_heads, 1, 1)
    mask = torch.stack([flat[i::bsz, :, :] for i in range(bsz)]).view(bsz * num_heads, 100, -1)
    mask = torch.cat((torch.ones(bsz * num_heads, 100, 1).to(mask), mask.sigmoid()), dim=2)
    out = torch.einsum("qnl, qlc->qnlc", mask, v).sum(dim=1)
    out = out.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def official_dense(visual, pixels, mask_logits, positions):
    x = visual.conv1(pixels)
    gh, gw = x.shape[-2:]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], dim=1)
    pos = official_resize(visual.positional_embedding, gh, gw)
    x = x + pos + official_resize(positions.input, gh, gw)
    x = visual.ln_pre(x).permute(1, 0, 2)  # LND
    blocks = visual.transformer.resblocks
    for index, block in enumerate(blocks):
        if index in positions.layers:
            learned = official_resize(positions.blocks[positions.layers.index(index)], gh, gw)
            x = (x.permute(1, 0, 2) + learned).permute(1, 0, 2)
        if index == len(blocks) - 1:  # LAYERMASKVIT [11]: the last block, residual 1.0
            x = x + official_gps_attention(block, block.ln_1(x), mask_logits)
            x = x + block.mlp(block.ln_2(x))
        else:
            x = block(x.permute(1, 0, 2)).permute(1, 0, 2)  # open_clip blocks are batch-first
    x = visual.ln_post(x.permute(1, 0, 2)[:, 1:, :]) @ visual.proj
    return F.normalize(x.reshape(x.shape[0], gh, gw, -1), dim=-1)


def test_dense_features_with_learned_positions_and_soft_proposals_match_the_release(
    visual, inputs
):
    pixels, mask_logits = inputs
    torch.manual_seed(2)
    positions = LearnedPositions(64).double()
    assert positions.layers == (1, 2, 3, 4, 5) and positions.input.shape == (577, 64)
    with torch.no_grad():
        ours = released_dense_features(visual, pixels, mask_logits, positions)
        theirs = official_dense(visual, pixels, mask_logits, positions)
        without = released_dense_features(visual, pixels, mask_logits, LearnedPositions(64, ()))
    assert ours.shape == (2, 6, 5, 32)
    assert torch.allclose(ours, theirs.float(), atol=1e-6)
    assert not torch.allclose(ours, without, atol=1e-2)  # the positions matter


def test_severance_weights_are_overlapping_soft_sums_not_ones(inputs):
    _, mask_logits = inputs
    weights = severance_weights(mask_logits, (6, 5))
    assert weights.shape == (2, 31)
    assert torch.all(weights[:, 0] == QUERIES)
    expected = F.interpolate(mask_logits, size=(6, 5), mode="bilinear").sigmoid().sum(1)
    assert torch.allclose(weights[:, 1:], expected.flatten(1).float(), atol=1e-5)
    assert weights[:, 1:].min() > 5 and weights[:, 1:].std() > 0.5  # 100 overlapping masks


def official_decoder(state, memory, pos, proposal, heads=HEADS):
    """TransformerDecoderLinear (1 layer) + its output layer: normalised (B, Q, D)."""

    def mha(name, q, k, v):
        return F.multi_head_attention_forward(
            q, k, v, q.shape[-1], heads,
            state[f"{name}.in_proj_weight"], state[f"{name}.in_proj_bias"], None, None, False,
            0.0, state[f"{name}.out_proj.weight"], state[f"{name}.out_proj.bias"],
            training=False, need_weights=False,
        )[0]  # fmt: skip

    def norm(name, x):
        return F.layer_norm(x, (x.shape[-1],), state[f"{name}.weight"], state[f"{name}.bias"])

    bsz = memory.shape[1]
    query_pos = state["query_embedding.weight"].unsqueeze(1).repeat(1, bsz, 1)
    tgt = torch.zeros_like(query_pos)
    layer = "decoder.layers.0"
    q = tgt + query_pos
    tgt = norm(f"{layer}.norm1", tgt + mha(f"{layer}.self_attn", q, q, tgt))
    cross = mha(f"{layer}.multihead_attn_my", tgt + query_pos, memory + pos, memory)
    tgt = norm(f"{layer}.norm2", tgt + cross)
    hidden = F.relu(
        F.linear(tgt, state[f"{layer}.linear1.weight"], state[f"{layer}.linear1.bias"])
    )
    tgt = norm(f"{layer}.norm3", tgt + F.linear(hidden, state[f"{layer}.linear2.weight"],
                                                 state[f"{layer}.linear2.bias"]))  # fmt: skip
    out = "decoder.outlayer"
    q = tgt + query_pos
    tgt = norm(f"{out}.norm1", tgt + mha(f"{out}.self_attn", q, q, tgt))
    weight, bias = (
        state[f"{out}.multihead_attn_my.in_proj_weight"],
        state[f"{out}.multihead_attn_my.in_proj_bias"],
    )
    dim = tgt.shape[-1]
    head_dim = dim // heads
    q = F.linear(tgt + query_pos, weight[:dim], bias[:dim]) * head_dim**-0.5
    k = F.linear(memory + pos, weight[dim : 2 * dim], bias[dim : 2 * dim])
    v = memory  # not projected
    q = q.contiguous().view(QUERIES, bsz * heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
    attention = F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
    mask = proposal.flatten(2).repeat_interleave(heads, dim=0)  # row b*heads + h: batch b
    pooled = torch.bmm(attention * mask, v).transpose(0, 1).contiguous().view(QUERIES, bsz, dim)
    return F.normalize(pooled, dim=-1).transpose(0, 1)


def sine(h, w, features):
    """PositionEmbeddingSine(features, normalize=True): (h*w, 2*features)."""
    ones = torch.ones(1, h, w, dtype=torch.float64)
    y = ones.cumsum(1) / (h + 1e-6) * 2 * math.pi
    x = ones.cumsum(2) / (w + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(features, dtype=torch.float64) // 2) / features)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).reshape(h * w, 2 * features)


def test_the_slot_query_decoder_loads_the_release_names_and_matches_it(inputs):
    _, mask_logits = inputs
    dim, feedforward = 32, 64
    gen = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3

    state = {"query_embedding.weight": rand(QUERIES, dim)}
    attentions = ("layers.0.self_attn", "layers.0.multihead_attn_my", "outlayer.self_attn")
    for name in (f"decoder.{attention}" for attention in attentions):
        state[f"{name}.in_proj_weight"] = rand(3 * dim, dim)
        state[f"{name}.in_proj_bias"] = rand(3 * dim)
        state[f"{name}.out_proj.weight"] = rand(dim, dim)
        state[f"{name}.out_proj.bias"] = rand(dim)
    state |= {
        "decoder.outlayer.multihead_attn_my.in_proj_weight": rand(3 * dim, dim),
        "decoder.outlayer.multihead_attn_my.in_proj_bias": rand(3 * dim),
        "decoder.layers.0.linear1.weight": rand(feedforward, dim),
        "decoder.layers.0.linear1.bias": rand(feedforward),
        "decoder.layers.0.linear2.weight": rand(dim, feedforward),
        "decoder.layers.0.linear2.bias": rand(dim),
        "decoder.norm.weight": 1 + rand(dim),
        "decoder.norm.bias": rand(dim),
    }
    for norm in ("layers.0.norm1", "layers.0.norm2", "layers.0.norm3", "outlayer.norm1"):
        state |= {f"decoder.{norm}.weight": 1 + rand(dim), f"decoder.{norm}.bias": rand(dim)}
    # AnchorDecoder computes in float32 (as the node runs it); the official formula in float64.
    decoder = AnchorDecoder(dim, heads=HEADS, feedforward=feedforward, slots=QUERIES)
    released = {k: v.float() for k, v in released_decoder_state(state).items()}
    decoder.load_state_dict(released, strict=True)
    decoder.eval()
    features = F.normalize(rand(2, 6, 5, dim), dim=-1)
    proposal = decoder_masks(mask_logits, (6, 5)).double()
    valid = torch.ones(2, QUERIES, dtype=torch.bool)
    with torch.no_grad():
        ours = decoder(features.float(), proposal.float(), valid)
    memory = features.reshape(2, 30, dim).transpose(0, 1)
    pos = sine(6, 5, dim // 2)[:, None, :].expand(-1, 2, -1)
    theirs = official_decoder(state, memory, pos, proposal)
    assert ours.shape == (2, QUERIES, dim)
    assert torch.allclose(ours.double(), theirs, atol=2e-6)
    with pytest.raises(ValueError, match="99 proposals for a decoder of 100 slots"):
        decoder(features.float(), proposal[:, :99].float(), valid[:, :99])


# --- the release's model file ----------------------------------------------------------------


def released_file(path, clip_model, seed=5, memory_scale=1.0):
    """A DeOP release file as ``deop_verifycoco.sh`` loads it: the proposal network (R50, named
    as detectron2 names it), CLIP (open_clip = OpenAI names) with learned positions, the
    decoder, the slot positions, the void embedding, the prompt context, the criterion."""
    from test_deop_maskformer import official_state_dict

    gen = torch.Generator().manual_seed(seed)
    dim = clip_model.visual.output_dim
    proposal = official_state_dict(
        50, deeplab=False, seed=seed, embedding_dim=dim, memory_scale=memory_scale
    )
    state = {k: v for k, v in proposal.items() if k.startswith(("backbone.", "sem_seg_head."))}
    width = clip_model.visual.conv1.out_channels
    dim = clip_model.visual.output_dim
    for key, value in clip_model.state_dict().items():
        state[f"clip_adapter.clip_model.{key}"] = value.clone()
    state["clip_adapter.clip_model.visual.learned_position"] = torch.randn(
        577, width, generator=gen
    )
    state["clip_adapter.clip_model.visual.transformer.resblocks.1.learned_position"] = torch.randn(
        577, width, generator=gen
    )
    for name in ("layers.0.self_attn", "layers.0.multihead_attn_my", "outlayer.self_attn"):
        state[f"decoder.{name}.in_proj_weight"] = torch.randn(3 * dim, dim, generator=gen)
        state[f"decoder.{name}.in_proj_bias"] = torch.randn(3 * dim, generator=gen)
        state[f"decoder.{name}.out_proj.weight"] = torch.randn(dim, dim, generator=gen)
        state[f"decoder.{name}.out_proj.bias"] = torch.randn(dim, generator=gen)
    state["decoder.outlayer.multihead_attn_my.in_proj_weight"] = torch.randn(3 * dim, dim)
    state["decoder.outlayer.multihead_attn_my.in_proj_bias"] = torch.randn(3 * dim)
    state["decoder.layers.0.linear1.weight"] = torch.randn(2 * dim, dim, generator=gen)
    state["decoder.layers.0.linear1.bias"] = torch.randn(2 * dim, generator=gen)
    state["decoder.layers.0.linear2.weight"] = torch.randn(dim, 2 * dim, generator=gen)
    state["decoder.layers.0.linear2.bias"] = torch.randn(dim, generator=gen)
    for norm in ("layers.0.norm1", "layers.0.norm2", "layers.0.norm3", "outlayer.norm1", "norm"):
        state[f"decoder.{norm}.weight"] = torch.randn(dim, generator=gen)
        state[f"decoder.{norm}.bias"] = torch.randn(dim, generator=gen)
    state["query_embedding.weight"] = torch.randn(QUERIES, dim, generator=gen)
    state["clip_adapter.non_object_embedding"] = torch.randn(1, dim, generator=gen)
    text_width = clip_model.token_embedding.weight.shape[1]  # the prompt's width (512 in B/16)
    state["clip_adapter.prompt_learner.prefix_prompt"] = torch.randn(16, text_width, generator=gen)
    for signal in ("start", "dot", "end", "pad"):
        state[f"clip_adapter.prompt_learner.{signal}_signal"] = torch.randn(1, text_width)
    state["criterion.empty_weight"] = torch.ones(157)
    torch.save({"model": state, "iteration": 59999}, path)
    return state


@pytest.fixture(scope="module")
def tiny_clip():
    from conftest import TINY_VIT

    from ovss_ros.core.clip.model_loading import load_clip

    return load_clip(str(TINY_VIT), "none", "cpu", "fp32")


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_clip):
    path = tmp_path_factory.mktemp("deop_release") / "model_final.pth"
    return path, released_file(path, tiny_clip.model)


def test_every_part_of_the_release_file_is_loaded(release, tiny_clip):
    from ovss_ros.core.methods.deop.released_checkpoint import (
        check_clip_weights,
        load_released_deop,
    )

    path, state = release
    released = load_released_deop(path)
    assert released.proposals.arch.depth == 50
    assert released.positions.layers == (1,)
    assert torch.equal(released.positions.input, state["clip_adapter.clip_model.visual."
                                                        "learned_position"])  # fmt: skip
    assert torch.equal(
        released.positions.blocks[0],
        state["clip_adapter.clip_model.visual.transformer.resblocks.1.learned_position"],
    )
    decoder = released.modules.decoder
    assert decoder.slots == QUERIES
    assert torch.equal(decoder.query_embedding.weight, state["query_embedding.weight"])
    assert torch.equal(
        decoder.anchor_k.weight,
        state["decoder.outlayer.multihead_attn_my.in_proj_weight"][32:64],
    )
    assert torch.equal(released.modules.void, state["clip_adapter.non_object_embedding"])
    assert torch.equal(
        released.modules.prompt.context, state["clip_adapter.prompt_learner.prefix_prompt"]
    )
    assert not any("learned_position" in key for key in released.clip_state)
    check_clip_weights(released, tiny_clip.model)  # the file's CLIP is this one


def test_a_clip_other_than_the_files_is_refused(release, tiny_clip):
    from conftest import TINY_VIT, TINY_VIT_B32

    from ovss_ros.core.clip.model_loading import load_clip
    from ovss_ros.core.methods.deop.maskformer_weights import ProposalWeightsError
    from ovss_ros.core.methods.deop.released_checkpoint import (
        check_clip_weights,
        load_released_deop,
    )

    released = load_released_deop(release[0])
    other = load_clip(str(TINY_VIT_B32), "none", "cpu", "fp32")
    with pytest.raises(
        ProposalWeightsError, match="decoder is 32 wide, the loaded CLIP's needs 48"
    ):
        check_clip_weights(released, other.model)
    released.clip_state["visual.transformer.resblocks.7.ln_1.weight"] = torch.ones(64)
    with pytest.raises(ProposalWeightsError, match="resblocks.7.ln_1.weight' .* does not fit"):
        check_clip_weights(released, tiny_clip.model)
    del released.clip_state["visual.transformer.resblocks.7.ln_1.weight"]
    changed = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    changed["visual.proj"] += 0.1
    model = load_clip(str(TINY_VIT), "none", "cpu", "fp32").model
    model.load_state_dict(changed)
    with pytest.raises(ProposalWeightsError, match="'visual.proj' differs from the file's"):
        check_clip_weights(released, model)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("query_embedding.weight", "has no 'query_embedding.weight'"),
        ("clip_adapter.clip_model.visual.learned_position", "visual.learned_position"),
        ("clip_adapter.non_object_embedding", "has no 'clip_adapter.non_object_embedding'"),
        ("decoder.outlayer.multihead_attn_my.in_proj_bias", "in_proj_bias"),
        ("decoder.layers.0.norm2.weight", "decoder: .*norms.1.weight"),
    ],
)
def test_a_release_file_missing_a_part_is_refused_naming_it(tmp_path, release, drop, message):
    from ovss_ros.core.methods.deop.maskformer_weights import ProposalWeightsError
    from ovss_ros.core.methods.deop.released_checkpoint import load_released_deop

    state = {k: v for k, v in release[1].items() if k != drop}
    path = tmp_path / "model_final.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ProposalWeightsError, match=message):
        load_released_deop(path)


def test_a_decoder_of_other_sizes_is_refused_naming_the_first_key_and_the_count(
    tmp_path, release
):
    """Every norm of the decoder one wider than its layers: one short reason (the first key
    that does not fit, how many), not load_state_dict's line per key."""
    from ovss_ros.core.methods.deop.maskformer_weights import ProposalWeightsError
    from ovss_ros.core.methods.deop.released_checkpoint import load_released_deop

    state = dict(release[1])
    norms = [k for k in state if k.startswith("decoder.") and "norm" in k]
    for key in norms:
        state[key] = torch.ones(state[key].shape[0] + 1)
    path = tmp_path / "model_final.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ProposalWeightsError) as error:
        load_released_deop(path)
    message = str(error.value)
    dim = state["query_embedding.weight"].shape[1]
    assert len(norms) == 10  # 8 used: decoder.norm serves only the auxiliary losses
    assert "(8 keys do not fit in all)" in message, message
    assert f"decoder: 'layers.0.norms.0.weight' has shape ({dim + 1},), the decoder needs " \
        f"({dim},)" in message  # fmt: skip
    assert message.count("shape") == 1 and len(message) < len(str(path)) + 120, message
    del state["decoder.layers.0.linear2.bias"]  # a missing key is named first
    torch.save({"model": state}, path)
    with pytest.raises(ProposalWeightsError, match=r"decoder: no 'layers.0.ffn.3.bias' \(9 keys"):
        load_released_deop(path)


CLIP_KEY = "clip_adapter.clip_model."
POSITION = CLIP_KEY + "visual.learned_position"
BLOCK_POSITION = CLIP_KEY + "visual.transformer.resblocks.1.learned_position"
PROMPT = "clip_adapter.prompt_learner.prefix_prompt"


def _nan(value):
    value = value.clone()
    value.view(-1)[0] = float("nan")
    return value


# Each a malformed release file (the good one with some tensors replaced) and the reason its
# refusal gives; before the fix these crashed (IndexError, or a RuntimeError on the first frame),
# ran to NaN scores, or were refused with an unrelated reason.
MALFORMED = {
    "NaN in the backbone": (
        lambda s: {"backbone.stem.conv1.weight": _nan(s["backbone.stem.conv1.weight"])},
        "'backbone.stem.conv1.weight' holds NaN or infinite values",
    ),
    "inf in the decoder": (
        lambda s: {"decoder.layers.0.linear1.weight": s["decoder.layers.0.linear1.weight"] / 0},
        "'decoder.layers.0.linear1.weight' holds NaN or infinite values",
    ),
    "NaN void": (
        lambda s: {"clip_adapter.non_object_embedding": torch.full((1, 32), float("nan"))},
        "'clip_adapter.non_object_embedding' holds NaN",
    ),
    "NaN prompt": (lambda s: {PROMPT: _nan(s[PROMPT])}, f"'{PROMPT}' holds NaN"),
    "NaN learned position": (lambda s: {POSITION: _nan(s[POSITION])}, "learned_position' holds"),
    "NaN slot queries": (
        lambda s: {"query_embedding.weight": _nan(s["query_embedding.weight"])},
        "'query_embedding.weight' holds NaN",
    ),
    "integer decoder weights": (
        lambda s: {"decoder.layers.0.linear1.bias": torch.zeros(64, dtype=torch.int64)},
        "'decoder.layers.0.linear1.bias' is int64; weights are floating point",
    ),
    "0-d learned position": (
        lambda s: {POSITION: torch.tensor(1.0)},
        "has shape \\(\\); a \\(1 \\+ n\\*n",
    ),
    "1-row learned position": (
        lambda s: {POSITION: torch.randn(1, 64), BLOCK_POSITION: torch.randn(1, 64)},
        "learned_position has shape \\(1, 64\\); a \\(1 \\+ n\\*n, width\\) table",
    ),
    "a block's learned position of another size than the input's": (
        lambda s: {BLOCK_POSITION: torch.randn(17, 64)},
        "learned positions: 'blocks.0' has shape \\(17, 64\\), the input table needs "
        "\\(577, 64\\)$",
    ),
    "learned positions narrower than CLIP": (
        lambda s: {POSITION: torch.randn(577, 63), BLOCK_POSITION: torch.randn(577, 63)},
        "the learned positions is 63 wide, the loaded CLIP's needs 64",
    ),
    "prompt longer than the text window": (
        lambda s: {PROMPT: torch.randn(100, 64)},
        "prompt context has 100 tokens; the loaded CLIP reads 77 text tokens, so at most 73",
    ),
    "prompt leaving no room for a name": (
        lambda s: {PROMPT: torch.randn(74, 64)},
        "has 74 tokens; .* at most 73",
    ),
    "1-D prompt": (
        lambda s: {PROMPT: torch.randn(64)},
        f"'{PROMPT}' has shape \\(64,\\); a non-empty 2-D",
    ),
    "1-D slot queries": (
        lambda s: {"query_embedding.weight": torch.randn(100)},
        "'query_embedding.weight' has shape \\(100,\\); a non-empty 2-D tensor",
    ),
    "0 slot queries": (
        lambda s: {"query_embedding.weight": torch.randn(0, 32)},
        "'query_embedding.weight' has shape \\(0, 32\\); a non-empty 2-D tensor",
    ),
    "fewer slots than proposal queries": (
        lambda s: {"query_embedding.weight": torch.randn(50, 32)},
        "the decoder has 50 slot queries .* but the proposal network 100 queries",
    ),
    "0-d mask_features": (
        lambda s: {"sem_seg_head.pixel_decoder.mask_features.weight": torch.tensor(1.0)},
        "'sem_seg_head.pixel_decoder.mask_features.weight' has shape \\(\\); .* 4-D",
    ),
    "1-D MaskFormer queries": (
        lambda s: {"sem_seg_head.predictor.query_embed.weight": torch.randn(256)},
        "'sem_seg_head.predictor.query_embed.weight' has shape \\(256,\\); .* 2-D",
    ),
    "no class head": (
        lambda s: {k: None for k in s if k.startswith("sem_seg_head.predictor.class_embed.")},
        "has no 'sem_seg_head.predictor.class_embed.layers.0.weight'",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_release_file_is_refused_at_load_with_its_reason(
    tmp_path, release, tiny_clip, case
):
    """Refused by load_release (what PublishedDeop, the node and every tool call) as a
    ProposalWeightsError (a ValueError: the node refuses the change, a tool exits 2)."""
    from ovss_ros.core.methods.deop.maskformer_weights import ProposalWeightsError
    from ovss_ros.core.methods.deop.published import load_release

    change, message = MALFORMED[case]
    state = dict(release[1])
    for key, value in change(state).items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    path = tmp_path / "model_final.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ProposalWeightsError, match=message):
        load_release(str(path), tiny_clip)


@pytest.mark.parametrize(
    ("size", "max_long_side", "expected"),
    [((1, 10000), 2048, (1, 2048)), ((10000, 1), 4096, (2560, 1)), ((1, 1), 2048, (512, 512))],
)
def test_the_release_resize_keeps_every_side_at_least_one_pixel(size, max_long_side, expected):
    """detectron2's rule rounds a 1 x 10000 frame's short side to 0 (512 * 2048 / 5.12e6 =
    0.2): the frame then crashed the resize; here it is kept at 1 pixel."""
    from ovss_ros.core.methods.deop.published import release_size

    assert release_size(*size, max_long_side) == expected


def test_published_deop_end_to_end_follows_the_release(tmp_path, tiny_clip):
    """released_scores against the official forward composed from this file's references:
    proposals (test_deop_maskformer's reference), dense pass, decoder, then the release's
    inference (masks upsampled to the padded size, cropped, softmax without void x sigmoid).
    The release's predictor is well conditioned (memory_scale): float32 on both sides."""
    from test_deop_maskformer import reference_forward

    from ovss_ros.core.methods.deop.maskformer import prepare_images
    from ovss_ros.core.methods.deop.released import released_scores
    from ovss_ros.core.methods.deop.released_checkpoint import load_released_deop

    path = tmp_path / "model_final.pth"
    state = released_file(path, tiny_clip.model, memory_scale=1e-3)
    released = load_released_deop(path)
    visual = tiny_clip.model.visual
    gen = torch.Generator().manual_seed(8)
    rgb = torch.rand(1, 3, 70, 90, generator=gen) * 255
    text = torch.randn(5, 32, generator=gen)
    with torch.no_grad():
        ours = released_scores(
            released.proposals, visual, released.positions, released.modules.decoder, text,
            released.modules.void, rgb,
        )  # fmt: skip
        images, _ = prepare_images(rgb)
        mask_logits, _ = reference_forward(images, state, depth=50, deeplab=False)
        dense = official_dense(visual, images, mask_logits, released.positions)
        grid = dense.shape[1:3]
        proposal = F.interpolate(mask_logits.sigmoid(), size=grid, mode="bilinear")
        memory = dense.reshape(1, -1, 32).transpose(0, 1)
        pos = sine(*grid, 16)[:, None, :].to(memory.dtype)
        hs = official_decoder(state, memory, pos, proposal)  # (1, Q, D), unit norm
        void = F.normalize(state["clip_adapter.non_object_embedding"], dim=-1)
        rows = torch.cat([F.normalize(text, dim=-1), void])
        logits = 100 * hs @ rows.T
        masks = F.interpolate(mask_logits, size=images.shape[-2:], mode="bilinear")[..., :70, :90]
        theirs = torch.einsum("qc,qhw->chw", logits[0].softmax(-1)[..., :-1], masks[0].sigmoid())
    assert ours.shape == (1, 5, 70, 90)
    # float32 throughout (each part is checked in float64 above): rounding gives ~1e-6 of the
    # scale (at memory_scale 1.0, 1e-3 that depends on the CPU); a wiring error, far more.
    difference = (ours[0] - theirs).abs()
    scale = float(theirs.abs().max())
    assert float(difference.mean()) < 1e-5 * scale and float(difference.max()) < 1e-4 * scale


def test_a_truncated_release_file_is_refused_as_unreadable_naming_both_formats(
    tmp_path, release, tiny_clip
):
    """A cut download is no zip archive: not recognised as the release, it reaches the
    ovss-train-deop loader, whose reason said "train a new one" (no use for the release)."""
    from ovss_ros.core.methods.deop.checkpoint import CheckpointError, load_checkpoint
    from ovss_ros.core.methods.deop.released_checkpoint import is_released_file

    cut = tmp_path / "model_final.pth"
    cut.write_bytes(release[0].read_bytes()[: 1 << 20])
    assert not is_released_file(cut)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(cut, tiny_clip)
    message = str(error.value)
    assert "unreadable or corrupt" in message and "not a torch.save archive" in message
    assert message.count(str(cut)) == 1 and message.count("DeOP checkpoint") == 1, message
    assert (
        "copy it again (the DeOP release's model_final.pth, or a file from ovss-train-deop)"
        in message
    )
    assert "train a new one" not in message
