"""DeOP's proposal network (ovss_ros.core.methods.deop.maskformer) and its weights.

The released checkpoints are detectron2 files of CongHan0808/DeOP (no download here). This test
writes such a file itself: every tensor named and shaped as detectron2's ResNet (DeepLab stem
for R101c), MaskFormer's BasePixelDecoder and TransformerPredictor and DeOP's
ZeroShotTransformerPredictor name them (written here from those modules, not from the
project's key map), with random values. The network loaded from it must compute what the
official modules compute on those weights: a reference forward written in this file from the
official code's formulas (FrozenBN, the DeepLab multi-grid res5, the FPN, sine positions, post-
norm DETR layers with ``nn.MultiheadAttention``'s packed in_proj, the MLP heads). Both run in
float64, so that a difference is the key map's and not float32 rounding (which random weights
amplify to ~5e-4 through the six decoder layers).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovss_ros.core.methods.deop.maskformer import (
    R50,
    R101C,
    MaskFormerArchitecture,
    ProposalNetwork,
    class_logits,
    clip_ensemble,
    prepare_images,
    semantic_inference,
)
from ovss_ros.core.methods.deop.maskformer_weights import (
    ProposalWeightsError,
    architecture_of,
    load_proposal_network,
    read_released,
    released_state_dict,
    save_proposal_network,
)

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
OTHER = {  # tensors of a released DeOP file outside the proposal network
    "clip_adapter.non_object_embedding": (1, 512),
    "query_embedding.weight": (100, 512),
    "decoder.layers.0.linear1.weight": (1024, 512),
    "criterion.empty_weight": (157,),
}


# --- a detectron2 state dict, named after the official modules ----------------------------------


def official_state_dict(
    depth: int, deeplab: bool, seed: int = 0, embedding_dim: int = 512, memory_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """``embedding_dim``: the text width class_embed maps into (512: CLIP ViT-B/16's).

    ``memory_scale`` multiplies the predictor's input projection. The random backbone has no
    fitted statistics: its res5 reaches ~1e3-1e4, so at 1.0 the predictor's attention logits
    are ~1e4 and its output chaotic (a float32 rounding amplified ~4e4 times: float32 results
    that depend on the CPU); at 1e-3 the memory's RMS is ~5 and the logits reach ~36."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def conv(name: str, out: int, inp: int, k: int, norm: str = "bn", bias: bool = False):
        state[f"{name}.weight"] = randn(out, inp, k, k, std=math.sqrt(2.0 / (inp * k * k)))
        if bias:
            state[f"{name}.bias"] = randn(out, std=0.1)
        if norm:
            state[f"{name}.norm.weight"] = 1 + randn(out, std=0.1)
            state[f"{name}.norm.bias"] = randn(out, std=0.1)
        if norm == "bn":  # FrozenBatchNorm2d: buffers, no num_batches_tracked
            state[f"{name}.norm.running_mean"] = randn(out, std=0.1)
            state[f"{name}.norm.running_var"] = 0.5 + torch.rand(out, generator=gen)

    def linear(name: str, out: int, inp: int) -> None:
        state[f"{name}.weight"] = randn(out, inp, std=1 / math.sqrt(inp))
        state[f"{name}.bias"] = randn(out, std=0.1)

    if deeplab:  # DeepLabStem
        conv("backbone.stem.conv1", 64, 3, 3)
        conv("backbone.stem.conv2", 64, 64, 3)
        conv("backbone.stem.conv3", 128, 64, 3)
        channels = 128
    else:  # BasicStem
        conv("backbone.stem.conv1", 64, 3, 7)
        channels = 64
    for stage, (count, width) in enumerate(
        zip(BLOCKS[depth], (64, 128, 256, 512), strict=True), start=2
    ):
        out = width * 4
        for index in range(count):
            prefix = f"backbone.res{stage}.{index}"
            inp = channels if index == 0 else out
            if index == 0:
                conv(f"{prefix}.shortcut", out, inp, 1)
            conv(f"{prefix}.conv1", width, inp, 1)
            conv(f"{prefix}.conv2", width, width, 3)
            conv(f"{prefix}.conv3", out, width, 1)
        channels = out
    decoder = "sem_seg_head.pixel_decoder"
    for index, inp in enumerate((256, 512, 1024), start=1):
        conv(f"{decoder}.adapter_{index}", 256, inp, 1, norm="gn")
        conv(f"{decoder}.layer_{index}", 256, 256, 3, norm="gn")
    conv(f"{decoder}.layer_4", 256, 2048, 3, norm="gn")
    conv(f"{decoder}.mask_features", 256, 256, 3, norm="", bias=True)
    predictor = "sem_seg_head.predictor"
    state[f"{predictor}.query_embed.weight"] = randn(100, 256)
    conv(f"{predictor}.input_proj", 256, 2048, 1, norm="", bias=True)
    state[f"{predictor}.input_proj.weight"] *= memory_scale
    for layer in range(6):
        prefix = f"{predictor}.transformer.decoder.layers.{layer}"
        for attention in ("self_attn", "multihead_attn"):
            state[f"{prefix}.{attention}.in_proj_weight"] = randn(768, 256, std=1 / 16)
            state[f"{prefix}.{attention}.in_proj_bias"] = randn(768, std=0.1)
            linear(f"{prefix}.{attention}.out_proj", 256, 256)
        linear(f"{prefix}.linear1", 2048, 256)
        linear(f"{prefix}.linear2", 256, 2048)
        for norm in ("norm1", "norm2", "norm3"):
            state[f"{prefix}.{norm}.weight"] = 1 + randn(256, std=0.1)
            state[f"{prefix}.{norm}.bias"] = randn(256, std=0.1)
    state[f"{predictor}.transformer.decoder.norm.weight"] = 1 + randn(256, std=0.1)
    state[f"{predictor}.transformer.decoder.norm.bias"] = randn(256, std=0.1)
    linear(f"{predictor}.class_embed.layers.0", 1024, 256)
    linear(f"{predictor}.class_embed.layers.1", embedding_dim, 1024)
    for index in range(3):
        linear(f"{predictor}.mask_embed.layers.{index}", 256, 256)
    for name, shape in OTHER.items():
        state[name] = randn(*shape)
    return state


# --- the official forward, from the official formulas -------------------------------------------


def frozen_bn(x, state, name):
    scale = state[f"{name}.weight"] * (state[f"{name}.running_var"] + 1e-5).rsqrt()
    bias = state[f"{name}.bias"] - state[f"{name}.running_mean"] * scale
    return x * scale[None, :, None, None] + bias[None, :, None, None]


def conv_bn(x, state, name, stride=1, padding=0, dilation=1, relu=True):
    x = F.conv2d(x, state[f"{name}.weight"], None, stride, padding, dilation)
    x = frozen_bn(x, state, f"{name}.norm")
    return F.relu(x) if relu else x


def reference_backbone(x, state, depth, deeplab, multi_grid=(1, 2, 4)):
    if deeplab:
        x = conv_bn(x, state, "backbone.stem.conv1", 2, 1)
        x = conv_bn(x, state, "backbone.stem.conv2", 1, 1)
        x = conv_bn(x, state, "backbone.stem.conv3", 1, 1)
    else:
        x = conv_bn(x, state, "backbone.stem.conv1", 2, 3)
    x = F.max_pool2d(x, 3, 2, 1)
    outputs = []
    for stage, count in enumerate(BLOCKS[depth], start=2):
        for index in range(count):
            prefix = f"backbone.res{stage}.{index}"
            stride = 2 if index == 0 and stage > 2 else 1
            dilation = multi_grid[index] if stage == 5 and deeplab else 1
            shortcut = (
                conv_bn(x, state, f"{prefix}.shortcut", stride, relu=False) if index == 0 else x
            )
            y = conv_bn(x, state, f"{prefix}.conv1")
            y = conv_bn(y, state, f"{prefix}.conv2", stride, dilation, dilation)
            y = conv_bn(y, state, f"{prefix}.conv3", relu=False)
            x = F.relu(y + shortcut)
        outputs.append(x)
    return outputs


def conv_gn(x, state, name, padding, relu):
    x = F.conv2d(x, state[f"{name}.weight"], None, padding=padding)
    x = F.group_norm(x, 32, state[f"{name}.norm.weight"], state[f"{name}.norm.bias"], 1e-5)
    return F.relu(x) if relu else x


def reference_pixel_decoder(features, state):
    """BasePixelDecoder.forward_features: res5 first, then res4, res3, res2."""
    p = "sem_seg_head.pixel_decoder"
    y = conv_gn(features[3], state, f"{p}.layer_4", 1, True)
    for index in (3, 2, 1):
        lateral = conv_gn(features[index - 1], state, f"{p}.adapter_{index}", 0, False)
        y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
        y = conv_gn(y, state, f"{p}.layer_{index}", 1, True)
    return F.conv2d(
        y, state[f"{p}.mask_features.weight"], state[f"{p}.mask_features.bias"], padding=1
    )


def sine_positions(batch, height, width, features=128, dtype=torch.float64):
    """PositionEmbeddingSine(128, normalize=True) of an all-valid mask: (N, 256, h, w)."""
    ones = torch.ones(batch, height, width, dtype=dtype)
    y = ones.cumsum(1)
    x = ones.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(features, dtype=dtype)
    dim_t = 10000 ** (2 * (dim_t // 2) / features)
    pos_x = x[:, :, :, None] / dim_t
    pos_y = y[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def attention(query, key, value, state, name):
    """nn.MultiheadAttention (8 heads, packed in_proj) on (L, N, E) tensors."""
    return F.multi_head_attention_forward(
        query, key, value, 256, 8,
        state[f"{name}.in_proj_weight"], state[f"{name}.in_proj_bias"], None, None, False, 0.0,
        state[f"{name}.out_proj.weight"], state[f"{name}.out_proj.bias"],
        training=False, need_weights=False,
    )[0]  # fmt: skip


def layer_norm(x, state, name):
    return F.layer_norm(x, (x.shape[-1],), state[f"{name}.weight"], state[f"{name}.bias"])


def linear(x, state, name):
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


def reference_predictor(res5, state):
    """TransformerPredictor + ZeroShotTransformerPredictor heads: last layer's queries."""
    p = "sem_seg_head.predictor"
    n, _, h, w = res5.shape
    pos = sine_positions(n, h, w, dtype=res5.dtype).flatten(2).permute(2, 0, 1)  # (hw, N, 256)
    src = F.conv2d(res5, state[f"{p}.input_proj.weight"], state[f"{p}.input_proj.bias"])
    memory = src.flatten(2).permute(2, 0, 1)
    query_pos = state[f"{p}.query_embed.weight"][:, None].repeat(1, n, 1)
    tgt = torch.zeros_like(query_pos)
    for index in range(6):
        layer = f"{p}.transformer.decoder.layers.{index}"
        q = tgt + query_pos
        tgt = layer_norm(tgt + attention(q, q, tgt, state, f"{layer}.self_attn"), state,
                         f"{layer}.norm1")  # fmt: skip
        cross = attention(tgt + query_pos, memory + pos, memory, state, f"{layer}.multihead_attn")
        tgt = layer_norm(tgt + cross, state, f"{layer}.norm2")
        ffn = linear(F.relu(linear(tgt, state, f"{layer}.linear1")), state, f"{layer}.linear2")
        tgt = layer_norm(tgt + ffn, state, f"{layer}.norm3")
    hs = layer_norm(tgt, state, f"{p}.transformer.decoder.norm").transpose(0, 1)  # (N, Q, 256)
    mask_embed = hs
    for index in range(3):
        mask_embed = linear(mask_embed, state, f"{p}.mask_embed.layers.{index}")
        mask_embed = F.relu(mask_embed) if index < 2 else mask_embed
    class_embed = linear(F.relu(linear(hs, state, f"{p}.class_embed.layers.0")), state,
                         f"{p}.class_embed.layers.1")  # fmt: skip
    return mask_embed, class_embed


def reference_forward(images, state, depth=101, deeplab=True):
    features = reference_backbone(images, state, depth, deeplab)
    mask_features = reference_pixel_decoder(features, state)
    mask_embed, class_embed = reference_predictor(features[3], state)
    return torch.einsum("nqc,nchw->nqhw", mask_embed, mask_features), class_embed


def close(actual, expected, tolerance=1e-7):
    scale = expected.abs().max().clamp_min(1e-6)
    return float((actual - expected).abs().max() / scale) <= tolerance


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A detectron2-format R101c DeOP file (random values), as the release writes one."""
    state = official_state_dict(101, deeplab=True)
    path = tmp_path_factory.mktemp("release") / "model_final.pth"
    torch.save({"model": state, "iteration": 59999, "__author__": "test"}, path)
    return path, {key: value.double() for key, value in state.items()}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Two random RGB frames 0-255, 70 x 100 px (padded to 96 x 128), float64."""
    rgb = torch.rand(2, 3, 70, 100, generator=torch.Generator().manual_seed(1)) * 255
    rgb = rgb.double()
    return prepare_images(rgb)[0]


# --- tests -----------------------------------------------------------------------------------


def test_the_released_layout_loads_and_computes_what_the_official_modules_compute(
    released, images
):
    path, state = released
    loaded = load_proposal_network(path)
    loaded.network.double()
    assert loaded.network.arch == R101C
    assert "detectron2" in loaded.source
    assert set(loaded.other) == set(OTHER)  # DeOP's own tensors, handed on untouched
    with torch.no_grad():
        output = loaded.network(images)
        masks, classes = reference_forward(images, state)
    assert output.mask_logits.shape == (2, 100, 24, 32)  # 1/4 of the padded 96 x 128
    assert output.class_embeddings.shape == (2, 100, 512)
    assert close(output.mask_logits, masks)
    assert close(output.class_embeddings, classes)


def test_each_stage_of_the_network_matches_its_official_counterpart(released, images):
    """Backbone (DeepLab stem, dilated res5), pixel decoder and predictor each on their own:
    a key-map error shows where it is."""
    path, state = released
    network = load_proposal_network(path).network.double()
    with torch.no_grad():
        ours = network.features(images)
        theirs = reference_backbone(images, state, 101, deeplab=True)
        for a, b in zip(ours, theirs, strict=True):
            assert a.shape == b.shape and close(a, b)
        pixel = network.pixel_decoder(theirs).last_hidden_state
        assert close(pixel, reference_pixel_decoder(theirs, state))
        queries = network.predictor(theirs[3]).last_hidden_state
        mask_embed, class_embed = reference_predictor(theirs[3], state)
        assert close(network.mask_embed(queries), mask_embed)
        assert close(network.class_embed(queries), class_embed)


def test_the_r50_variant_with_the_basic_stem_loads_and_matches(tmp_path, images):
    state = official_state_dict(50, deeplab=False, seed=3)
    path = tmp_path / "r50.pth"
    torch.save(state, path)  # a bare state dict is accepted too
    network = load_proposal_network(path).network.double()
    assert network.arch == R50
    state = {key: value.double() for key, value in state.items()}
    with torch.no_grad():
        output = network(images)
        masks, classes = reference_forward(images, state, depth=50, deeplab=False)
    assert close(output.mask_logits, masks) and close(output.class_embeddings, classes)


def test_the_architecture_is_read_from_the_shapes(released):
    path, state = released
    assert architecture_of(state, path) == R101C
    fewer = {k: v for k, v in state.items() if ".decoder.layers.5." not in k}
    assert architecture_of(fewer, path).decoder_layers == 5
    no_res4 = {  # res4 with 3 of its 23 blocks
        k: v for k, v in state.items()
        if not (k.startswith("backbone.res4.") and int(k.split(".")[2]) >= 3)
    }  # fmt: skip
    with pytest.raises(ProposalWeightsError, match="res4 has 3 blocks"):
        architecture_of(no_res4, path)
    with pytest.raises(ProposalWeightsError, match="query_embed.weight"):
        architecture_of({k: v for k, v in state.items() if "query_embed" not in k}, path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", r"has no 'backbone\.res5\.2\.conv2\.norm\.running_var'"),
        ("extra", r"'backbone\.res6\.0\.conv1\.weight' \(and 0 more\) matches no tensor"),
        (
            "shape",
            r"'sem_seg_head\.pixel_decoder\.adapter_2\.weight' has shape \(256, 500, 1, 1\)",
        ),
        ("in_proj", r"in_proj_weight' has shape \(767, 256\)"),
    ],
)
def test_a_key_that_does_not_fit_is_named(released, change, message):
    path, state = released
    state = dict(state)
    if change == "missing":
        del state["backbone.res5.2.conv2.norm.running_var"]
    elif change == "extra":
        state["backbone.res6.0.conv1.weight"] = torch.zeros(1)
    elif change == "shape":
        state["sem_seg_head.pixel_decoder.adapter_2.weight"] = torch.zeros(256, 500, 1, 1)
    else:
        key = "sem_seg_head.predictor.transformer.decoder.layers.2.self_attn.in_proj_weight"
        state[key] = torch.zeros(767, 256)
    with pytest.raises(ProposalWeightsError, match=message):
        released_state_dict(state, R101C, path)


def test_files_that_are_not_checkpoints_are_refused_before_loading(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ProposalWeightsError, match="not a torch.save archive"):
        read_released(text)
    with pytest.raises(ProposalWeightsError, match="is not a regular file"):
        read_released(tmp_path)  # a folder without config.json is read as a folder below
    with pytest.raises(ProposalWeightsError, match="not found|no such|does not exist"):
        load_proposal_network(tmp_path / "absent.pth")
    empty = tmp_path / "empty.pth"
    torch.save({"model": {"iteration": 3}, "note": "x"}, empty)
    with pytest.raises(ProposalWeightsError, match="holds no state dict"):
        read_released(empty)
    inflating = tmp_path / "inflating.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, inflating)
    with zipfile.ZipFile(inflating) as source:
        records = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(inflating, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for info, data in records:
            target.writestr(info.filename, data)
    with pytest.raises(ProposalWeightsError, match="made to inflate"):
        read_released(inflating)
    other = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(3)}}, other)
    with pytest.raises(ProposalWeightsError, match="not a MaskFormer proposal network"):
        load_proposal_network(other)


def test_the_folder_format_round_trips_and_is_checked(tmp_path, released, images):
    network = load_proposal_network(released[0]).network
    folder = save_proposal_network(network, tmp_path / "proposals")
    again = load_proposal_network(folder)
    assert "ovss_ros folder" in again.source and again.network.arch == R101C
    with torch.no_grad():
        frames = images.float()
        assert torch.equal(again.network(frames).mask_logits, network(frames).mask_logits)
    config = folder / "config.json"
    original = config.read_text()
    for edit, message in [
        (original.replace('"depth": 101', '"depth": 34'), "depth must be one of"),
        (original.replace('"queries": 100', '"queries": 99'), "has shape"),
        (original.replace('"version": 1', '"version": 9'), "format version 9"),
        (original.replace('"heads": 8', '"heads": true'), "heads must be an integer"),
        ("[]", "not an ovss_ros proposal network config"),
    ]:
        config.write_text(edit)
        with pytest.raises(ProposalWeightsError, match=message):
            load_proposal_network(folder)
    config.write_text(original)
    (folder / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 15)
    with pytest.raises(ProposalWeightsError, match="safetensors"):
        load_proposal_network(folder)


def test_images_are_normalised_with_imagenet_statistics_and_padded_to_32():
    rgb = torch.full((1, 3, 33, 64), 123.675)
    images, size = prepare_images(rgb)
    assert size == (33, 64) and images.shape == (1, 3, 64, 64)
    assert torch.allclose(images[0, 0, :33], torch.zeros(33, 64), atol=1e-6)
    assert torch.equal(images[..., 33:, :], torch.zeros(1, 3, 31, 64))  # padded after norm
    with pytest.raises(ValueError, match="multiples of 32"):
        ProposalNetwork(MaskFormerArchitecture(depth=50, stem="basic", res5_multi_grid=(1, 1, 1),
                                               decoder_layers=1))(rgb)  # fmt: skip


def test_classification_and_semantic_inference_follow_the_official_formulas():
    gen = torch.Generator().manual_seed(5)
    embeddings = torch.randn(2, 7, 16, generator=gen)
    text = torch.randn(4, 16, generator=gen)
    void = torch.randn(1, 16, generator=gen)
    logits = class_logits(embeddings, text, void)
    # get_text_features: normalised texts, then the normalised void row; get_sim_logits: 100 x.
    rows = torch.cat([text / text.norm(dim=-1, keepdim=True), void / void.norm()])
    unit = embeddings / embeddings.norm(dim=-1, keepdim=True)
    assert torch.allclose(logits, 100 * unit @ rows.T, atol=1e-4)
    masks = torch.randn(2, 7, 5, 6, generator=gen)
    scores = semantic_inference(logits, masks)
    for n in range(2):  # einsum("qc,qhw->chw", softmax(cls)[..., :-1], sigmoid(mask)) per image
        expected = torch.einsum(
            "qc,qhw->chw", F.softmax(logits[n], dim=-1)[..., :-1], masks[n].sigmoid()
        )
        assert torch.allclose(scores[n], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"stem": "wide"}, "stem must be one of"),
        ({"res5_multi_grid": (1, 2)}, "res5_multi_grid must give 3"),
        ({"conv_dim": 100}, "divide by 32"),
        ({"queries": 0}, "queries must be in"),
        ({"hidden_dim": 1 << 20}, "hidden_dim must be in"),
    ],
)
def test_impossible_architectures_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        MaskFormerArchitecture(**values).check()


def official_ensemble(mask_cls, clip_cls, valid_flag, trainable_flag, weight):
    """ZeroShotMaskFormer.semantic_inference's ensemble, as the release writes it."""
    clip_cls = F.softmax(clip_cls[:, :-1], dim=-1)
    map_back_clip_cls = mask_cls.new_ones(mask_cls.shape)
    map_back_clip_cls[valid_flag] = clip_cls
    if trainable_flag is not None:
        trained_mask = torch.Tensor(trainable_flag).to(mask_cls.device)[None, :]
    else:
        trained_mask = mask_cls.new_zeros(mask_cls.shape)
    return trained_mask * torch.pow(mask_cls, weight) * torch.pow(
        map_back_clip_cls, 1 - weight
    ) + (1 - trained_mask) * torch.pow(mask_cls, 1 - weight) * torch.pow(map_back_clip_cls, weight)


@pytest.mark.parametrize("seen", [None, [1, 0, 1, 1, 0]])
def test_the_two_stream_ensemble_follows_the_release(seen):
    gen = torch.Generator().manual_seed(7)
    mask_cls = F.softmax(torch.randn(9, 6, generator=gen), dim=-1)[..., :-1]
    valid = torch.tensor([True, False, True, True, False, True, True, True, False])
    clip_logits = 10 * torch.randn(int(valid.sum()), 6, generator=gen)
    flags = None if seen is None else torch.tensor(seen, dtype=torch.bool)
    ours = clip_ensemble(mask_cls, clip_logits, valid, flags)
    theirs = official_ensemble(mask_cls, clip_logits, valid, seen, 0.8)
    assert torch.allclose(ours, theirs, atol=1e-7)
    # a proposal without a crop (CLIP's factor 1): the network's scores to the class's power
    power = torch.full((5,), 0.2) if seen is None else torch.tensor([0.8, 0.2, 0.8, 0.8, 0.2])
    assert torch.allclose(ours[1], mask_cls[1].pow(power), atol=1e-7)
    with pytest.raises(ValueError, match="ensemble weight"):
        clip_ensemble(mask_cls, clip_logits, valid, flags, weight=0.0)
