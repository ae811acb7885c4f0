"""FreeCP's base variants (attention output + FFN, no residual) and ``ovss-eval --protocol
freecp``: FreeCP's released configs, class files and variant, without changing what ``sclip``
means elsewhere."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT

from ovss_ros.cli.evaluate import engine_config, parse_args
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.dense.forward import FREECP_VARIANTS, dense_forward, official_pos_rule
from ovss_ros.evaluation.protocol import METHOD_PROTOCOLS, PROTOCOLS, load_vocabulary

# chenqi1126/FreeCP configs/cfg_<set>.py: Resize(scale=(2048, S)), slide_crop (slide_stride
# 112 by default), rp_thres, ap_thres; no probability threshold
FREECP = {
    "voc21": (448, 384, 112, 0.15, 0.8),
    "context60": (448, 384, 112, 0.10, 0.7),
    "coco_object": (448, 384, 112, 0.15, 0.8),
    "voc20": (448, 384, 112, 0.15, 0.7),
    "context59": (448, 384, 112, 0.10, 0.7),
    "coco_stuff": (448, 384, 112, 0.05, 0.7),  # cfg_coco_stuff164k.py
    "cityscapes": (560, 224, 112, 0.10, 0.8),  # cfg_city_scapes.py
    "ade20k": (448, 384, 112, 0.05, 0.7),
}


@pytest.mark.parametrize("dataset", PROTOCOLS)
@pytest.mark.parametrize(
    ("method", "variant"),
    [("sclip", "sclip_freecp"), ("maskclip", "maskclip_freecp"), ("naclip", "naclip")],
)
def test_freecp_protocol_runs_freecp_after_its_own_base_variant(
    tmp_path, dataset, method, variant
):
    args, _, protocol = parse_args(
        [dataset, str(tmp_path), "--method", method, "--protocol", "freecp"]
    )
    config = engine_config(args, (), protocol)
    config.validate()
    assert protocol.name == "freecp" and config.refinement == "freecp"
    assert config.method == variant  # naclip has no FreeCP variant: it stays itself
    got = (
        config.short_side,
        config.dense.crop,
        config.dense.stride,
        config.freecp_redundancy,
        config.freecp_ambiguity,
    )
    assert got == FREECP[dataset] and config.score_threshold == 0.0
    assert (config.model, config.pretrained) == ("ViT-B-16", "openai")


def test_sclip_elsewhere_is_still_sclip(tmp_path):
    args, _, protocol = parse_args(["voc21", str(tmp_path), "--method", "sclip"])
    config = engine_config(args, (), protocol)
    assert protocol.name == "sclip" and config.method == "sclip"
    assert config.refinement == "none"
    args, _, protocol = parse_args(["voc21", str(tmp_path), "--method", "sclip_freecp"])
    assert protocol.name == "freecp"  # the variant's own protocol
    assert engine_config(args, (), protocol).method == "sclip_freecp"


def test_freecp_class_files_are_its_own():
    """FreeCP's cls_voc21.txt: 26 background words, "person in shirt jeans dress sweater skirt
    jacket" as one name, "television monitor screen"; cls_coco_object.txt adds "body"."""
    freecp = METHOD_PROTOCOLS["freecp"]
    voc21 = PROTOCOLS["voc21"]
    vocabulary = load_vocabulary(voc21, builtin=freecp.for_dataset(voc21).class_file(voc21))
    assert len(vocabulary.background_words) == 26 and vocabulary.background_words[0] == "sky"
    assert vocabulary.classes[14] == "person in shirt jeans dress sweater skirt jacket"
    assert vocabulary.classes[19] == "television monitor screen"
    coco = PROTOCOLS["coco_object"]
    vocabulary = load_vocabulary(coco, builtin=freecp.for_dataset(coco).class_file(coco))
    assert vocabulary.classes[0] == "person in shirt jeans dress sweater skirt jacket body"
    context = PROTOCOLS["context60"]
    assert freecp.for_dataset(context).class_file(context) == "context60.txt"


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return load_clip(str(TINY_VIT), "none", "cpu")


def freecp_forward_all(visual, pixels: torch.Tensor, attention: str) -> torch.Tensor:
    """FreeCP's ``forward_all`` x_mod for a native-size input, written with open_clip's own
    blocks for layers 1..L-1 and the last block's q/k/v by hand: (N, h, w, D) normalised."""
    x = visual.conv1(pixels)
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    heads, width = attn.num_heads, x.shape[-1]
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(*t.shape[:2], heads, -1).transpose(1, 2) for t in (q, k, v))
    scale = (width // heads) ** -0.5
    if attention == "sclip":
        weights = torch.softmax(q @ q.mT * scale, -1) + torch.softmax(k @ k.mT * scale, -1)
        out = weights @ v
    else:  # MaskCLIP: -inf off the diagonal, so each token keeps its own value
        out = v
    out = attn.out_proj(out.transpose(1, 2).reshape(x.shape))
    x_mod = out + block.mlp(block.ln_2(out))  # no residual stream
    features = visual.ln_post(x_mod[:, 1:]) @ visual.proj
    return F.normalize(features, dim=-1).reshape(x.shape[0], *grid, -1)


@pytest.mark.parametrize("variant", list(FREECP_VARIANTS)[:2])
def test_freecp_variants_are_attention_plus_ffn_without_the_residual(tiny_clip, variant):
    visual = tiny_clip.model.visual
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = dense_forward(visual, pixels, variant).features
        want = freecp_forward_all(visual, pixels, FREECP_VARIANTS[variant])
        base = dense_forward(visual, pixels, FREECP_VARIANTS[variant]).features
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-2  # not the base method's own last block
    assert official_pos_rule(variant) == "dino"  # FreeCP's interpolate_pos_encoding: "+0.1"
    assert math.isclose(float(got.norm(dim=-1).mean()), 1.0, abs_tol=1e-5)


def test_ovss_eval_runs_the_freecp_protocol_end_to_end(tmp_path, capsys):
    """ovss-eval on a VOC folder of the real samples with ``--protocol freecp``: the report
    names FreeCP's protocol and the engine ran FreeCP after its SCLIP variant."""
    from test_evaluation_readers import make_voc_layout

    from ovss_ros.cli.evaluate import main

    root = make_voc_layout(tmp_path / "voc")
    output = tmp_path / "results.json"
    argv = [
        "voc20", str(root), "--method", "sclip", "--protocol", "freecp", "--model",
        str(TINY_VIT), "--pretrained", "none", "--device", "cpu", "--short-side", "64",
        "--crop", "32", "--stride", "16", "--templates", "single", "--no-progress",
        "--output", str(output),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "freecp protocol" in capsys.readouterr().out
    report = json.loads(output.read_text())
    engine = report["engine"]
    assert report["protocol"] == "freecp" and report["images"] == 3
    assert (engine["method"], engine["refinement"]) == ("sclip_freecp", "freecp")
    assert (engine["freecp.redundancy"], engine["freecp.ambiguity"]) == (0.15, 0.7)
