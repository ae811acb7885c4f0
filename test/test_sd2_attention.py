"""Stable Diffusion 2 self-attention affinity, on a tiny random SD2-shaped pipeline.

The pipeline is written with ``save_pretrained`` (test/tiny_diffusion.py) and loaded through
``Sd2Attention.load``, the path a robot uses. What the code collects is checked against the
attention computed here from scratch: our own latents, null embedding, noise formula and
``softmax(q k^T / sqrt(d))`` on the hidden states the layers really receive.
"""

import math
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_diffusion import save_tiny_pipeline

from ovss_ros.core.clip.model_loading import ModelLoadError
from ovss_ros.core.methods.dslo.dslo import doubly_stochastic, dslo_scores
from ovss_ros.core.methods.dslo.sd2_attention import (
    LAYER_SETS,
    Sd2Attention,
    resample_affinity,
    sd_input_size,
    sharpen,
)

SD_SIZE = 124  # with the tiny UNet (multiple 32) a 96x160 image goes in unresized


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"))


@pytest.fixture(scope="module")
def pixels(voc_rgb) -> torch.Tensor:
    """Two real photos at 96x160, RGB in [0, 1], (2, 3, 96, 160)."""
    images = [cv2.resize(rgb, (160, 96), interpolation=cv2.INTER_AREA) for rgb in voc_rgb[:2]]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def load(pipeline: Path, **settings) -> Sd2Attention:
    settings.setdefault("size", SD_SIZE)
    return Sd2Attention.load(str(pipeline), device="cpu", **settings)


def reference_attention(
    pipeline: Path, pixels: torch.Tensor, names: list[str], timestep: int, noise: bool
) -> dict[str, torch.Tensor]:
    """Head-mean self-attention (N, L, L) of each named layer, computed from scratch."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").eval()
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length)
    with torch.no_grad():
        context = encoder(torch.tensor([ids["input_ids"]])).last_hidden_state
        # the mode of the VAE's diagonal Gaussian is its mean
        latents = vae.encode(pixels * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    if noise:  # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, SD's scaled-linear betas
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)[timestep].item()
        eps = torch.randn((1, *latents.shape[1:]), generator=torch.Generator().manual_seed(0))
        latents = math.sqrt(abar) * latents + math.sqrt(1 - abar) * eps
    modules = dict(unet.named_modules())
    hidden = {}
    hooks = [
        modules[name].register_forward_pre_hook(
            lambda module, args, name=name: hidden.__setitem__(name, args[0])
        )
        for name in names
    ]
    with torch.no_grad():
        unet(latents, timestep, encoder_hidden_states=context.expand(len(latents), -1, -1))
    for hook in hooks:
        hook.remove()
    result = {}
    for name in names:
        attn, states = modules[name], hidden[name].double()
        q = F.linear(states, attn.to_q.weight.double())
        k = F.linear(states, attn.to_k.weight.double())
        heads, dim = attn.heads, q.shape[-1] // attn.heads
        q = q.unflatten(-1, (heads, dim)).transpose(1, 2)
        k = k.unflatten(-1, (heads, dim)).transpose(1, 2)
        result[name] = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim), -1).mean(1)
    return result


@pytest.mark.parametrize(
    "layers, timestep, noise", [("m2n2", 100, False), ("up", 100, True), ("m2n2", 400, True)]
)
def test_collected_attention_equals_attention_computed_from_scratch(
    pipeline, pixels, layers, timestep, noise
):
    sd2 = load(pipeline, layers=layers, timestep=timestep, noise=noise)
    collected = sd2.self_attention(pixels)
    expected = reference_attention(pipeline, pixels, sd2.layer_names, timestep, noise)
    assert [layer.name for layer in collected] == sd2.layer_names
    for layer in collected:
        want = expected[layer.name]
        assert layer.attention.shape == want.shape
        assert layer.grid[0] * layer.grid[1] == want.shape[-1]
        torch.testing.assert_close(layer.attention.double(), want, atol=2e-6, rtol=1e-4)
    if noise:  # the noise matters: without it the attention differs
        plain = load(pipeline, layers=layers, timestep=timestep).self_attention(pixels)
        assert (plain[0].attention - collected[0].attention).abs().max() > 1e-4


def test_layer_sets(pipeline, pixels):
    """m2n2: the last up block's first two layers, finest grid; up: every up-block attn1."""
    m2n2 = load(pipeline, layers="m2n2")
    assert m2n2.layer_names == [
        "up_blocks.2.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn1",
    ]
    assert {layer.grid for layer in m2n2.self_attention(pixels)} == {(12, 20)}  # 96x160 / 8
    every = load(pipeline, layers="up")
    assert len(every.layer_names) == 4  # two cross-attention up blocks of two layers each
    assert {layer.grid for layer in every.self_attention(pixels)} == {(6, 10), (12, 20)}


@pytest.mark.parametrize("layers", LAYER_SETS)
def test_affinity_is_the_mean_of_the_resampled_layers(pipeline, pixels, layers):
    sd2 = load(pipeline, layers=layers)
    grid = (6, 10)
    affinity = sd2.affinity(pixels, grid)
    assert affinity.shape == (2, 60, 60) and affinity.dtype == torch.float32
    layers_out = sd2.self_attention(pixels)
    mean = sum(resample_affinity(x.attention, x.grid, grid) for x in layers_out) / len(layers_out)
    torch.testing.assert_close(affinity, mean)
    torch.testing.assert_close(affinity.sum(-1), torch.ones(2, 60))


@pytest.mark.parametrize("grid", [(6, 10), (7, 9), (20, 30)], ids=["coarser", "odd", "finer"])
def test_affinity_is_doubly_stochastic_after_ipf(pipeline, pixels, grid):
    affinity = load(pipeline).affinity(pixels, grid)
    n = grid[0] * grid[1]
    assert affinity.shape == (2, n, n) and (affinity >= 0).all()
    transition = doubly_stochastic(affinity, rounds=15)
    torch.testing.assert_close(transition.sum(-1), torch.ones(2, n), atol=1e-3, rtol=0)
    torch.testing.assert_close(transition.sum(-2), torch.ones(2, n), atol=1e-3, rtol=0)


def test_temperature_is_m2n2s(pipeline, pixels):
    """softmax(log A / T) per row (M2N2's change_temperature) = A^(1/T), rows renormalised."""
    plain = load(pipeline).affinity(pixels, (6, 10))
    sharp = load(pipeline, temperature=0.65).affinity(pixels, (6, 10))
    power = plain.double() ** (1 / 0.65)
    torch.testing.assert_close(sharp.double(), power / power.sum(-1, keepdim=True))
    assert (sharp.amax(-1) > plain.amax(-1)).all()  # sharper


def test_windows_of_a_batch_are_independent_and_repeatable(pipeline, pixels):
    sd2 = load(pipeline, noise=True)
    both = sd2.affinity(pixels, (6, 10))
    torch.testing.assert_close(both, sd2.affinity(pixels, (6, 10)))
    torch.testing.assert_close(both[1:], sd2.affinity(pixels[1:], (6, 10)), atol=1e-6, rtol=0)


def test_any_image_size_is_resized_for_sd(pipeline, voc_rgb):
    """A real photo at its own size (not a multiple of 32) runs, resized to ~SD_SIZE^2."""
    rgb = voc_rgb[0]
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    sd2 = load(pipeline)
    layers = sd2.self_attention(pixels)
    height, width = sd_input_size(*rgb.shape[:2], SD_SIZE, 32)
    assert layers[0].grid == (height // 8, width // 8)
    affinity = sd2.affinity(pixels, (rgb.shape[0] // 16, rgb.shape[1] // 16))
    assert torch.isfinite(affinity).all()


@pytest.mark.parametrize("mode", ["ot", "velocity"])
def test_dslo_runs_on_the_sd2_affinity(pipeline, pixels, mode):
    """Random weights: no segmentation quality, only shapes, ranges and the absent class."""
    grid = (6, 10)
    torch.manual_seed(0)
    logits = 0.2 + 0.05 * torch.randn(2, 4, *grid)
    logits[:, 3] -= 1.0  # a class that wins no patch
    scores = dslo_scores(logits, load(pipeline).affinity(pixels, grid), mode)
    assert scores.shape == (2, 4, *grid) and torch.isfinite(scores).all()
    assert (scores[:, 3] == -1).all()
    present = scores[:, :3]
    if mode == "ot":
        assert (present >= 0).all() and (present < 1).all()
    else:
        assert (present >= 1).all()


def test_reconfigure_changes_settings_without_reloading(pipeline, pixels):
    sd2 = load(pipeline)
    unet = sd2.unet
    sd2.reconfigure(timestep=400, noise=True, layers="up", temperature=0.65)
    assert sd2.unet is unet and len(sd2.layer_names) == 4
    fresh = load(pipeline, timestep=400, noise=True, layers="up", temperature=0.65)
    torch.testing.assert_close(sd2.affinity(pixels, (6, 10)), fresh.affinity(pixels, (6, 10)))
    hooked = [m for m in unet.modules() if m._forward_pre_hooks]
    assert len(hooked) == 4  # the m2n2 hooks were replaced, not added to


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"timestep": 5000, "layers": "up"}, "dslo.sd.timestep"),
        ({"size": 8, "noise": True}, "dslo.sd.size"),
        ({"temperature": -1.0}, "dslo.sd.temperature"),
        ({"layers": "mid"}, "dslo.sd.layers"),
        ({"steps": 3}, "unknown"),
    ],
)
def test_bad_reconfigure_changes_nothing(pipeline, pixels, settings, reason):
    sd2 = load(pipeline)
    before = sd2.affinity(pixels, (6, 10))
    names = list(sd2.layer_names)
    with pytest.raises(ValueError, match=reason):
        sd2.reconfigure(**settings)
    assert (sd2.timestep, sd2.noise, sd2.size, sd2.layer_names) == (100, False, SD_SIZE, names)
    torch.testing.assert_close(sd2.affinity(pixels, (6, 10)), before)


def test_release_frees_the_models(pipeline, pixels):
    sd2 = load(pipeline)
    unet = sd2.unet
    sd2.release()
    assert sd2.unet is None and sd2.vae is None
    assert not any(m._forward_pre_hooks for m in unet.modules())
    with pytest.raises(RuntimeError, match="released"):
        sd2.affinity(pixels, (6, 10))


# ---------------------------------------------------------------- resampling and sizes


def test_resample_identity_on_the_same_grid():
    attention = torch.softmax(torch.randn(2, 12, 12), -1)
    torch.testing.assert_close(resample_affinity(attention, (3, 4), (3, 4)), attention)


def test_resample_down_by_two_is_the_block_mass():
    """A coarse patch's row: mean over its 4 fine rows of the mass each coarse key block gets."""
    torch.manual_seed(0)
    fine = torch.softmax(3 * torch.randn(1, 24, 24), -1)  # (4, 6) grid
    coarse = resample_affinity(fine, (4, 6), (2, 3))
    block = [(r // 2) * 3 + c // 2 for r in range(4) for c in range(6)]  # fine -> coarse
    expected = torch.zeros(6, 6)
    for i in range(24):
        for j in range(24):
            expected[block[i], block[j]] += fine[0, i, j] / 4  # 4 fine rows per coarse row
    torch.testing.assert_close(coarse[0], expected)


def test_resample_up_by_two_splits_mass_evenly():
    torch.manual_seed(0)
    coarse = torch.softmax(torch.randn(1, 6, 6), -1)  # (2, 3) grid
    fine = resample_affinity(coarse, (2, 3), (4, 6))
    parent = [(r // 2) * 3 + c // 2 for r in range(4) for c in range(6)]
    expected = torch.tensor(
        [[coarse[0, parent[i], parent[j]] / 4 for j in range(24)] for i in range(24)]
    )
    torch.testing.assert_close(fine[0], expected)


def test_sharpen_keeps_rows_stochastic():
    affinity = torch.rand(2, 10, 10)
    for temperature in (0.3, 1.0, 2.0):
        torch.testing.assert_close(sharpen(affinity, temperature).sum(-1), torch.ones(2, 10))


@pytest.mark.parametrize(
    "size, expected",
    [
        ((480, 640), (448, 576)),
        ((375, 500), (448, 576)),
        ((512, 512), (512, 512)),
        ((16, 2048), (64, 4096)),
        ((2048, 16), (4096, 64)),
        ((1, 100000), (64, 4096)),
    ],
)
def test_sd_input_size(size, expected):
    got = sd_input_size(*size, 512)
    assert got == expected
    assert got[0] % 64 == 0 and got[1] % 64 == 0 and got[0] * got[1] <= 512 * 512 * 1.1


# ---------------------------------------------------------------- loading and refusals


def test_loads_a_hub_id_from_the_cache(pipeline, pixels, tmp_path):
    """A hub id resolves to its cached snapshot without any network access."""
    repo = tmp_path / "models--ovss-test--tiny-sd2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / ("0" * 40)).symlink_to(pipeline, target_is_directory=True)
    sd2 = Sd2Attention.load("ovss-test/tiny-sd2", device="cpu", cache_dir=str(tmp_path), size=124)
    torch.testing.assert_close(
        sd2.affinity(pixels, (6, 10)), load(pipeline).affinity(pixels, (6, 10))
    )


def test_offline_without_weights_fails_at_once_with_what_to_set(tmp_path):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE.*set dslo.sd.model to a local"):
        Sd2Attention.load("stabilityai/stable-diffusion-2-1-base", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 60  # a liveness bound: no download, no retry loop


@pytest.mark.parametrize(
    "model, reason",
    [
        ("", "empty"),
        ("/no/such/sd2/directory", "neither a directory nor a hub id"),
        ("./relative/sd2", "neither a directory nor a hub id"),
        ("a/b/c", "neither a directory nor a hub id"),
    ],
)
def test_bad_model_names_are_refused(model, reason):
    with pytest.raises(ModelLoadError, match=reason):
        Sd2Attention.load(model, device="cpu")


def test_directory_without_the_pipeline_parts_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="has no vae, scheduler, text_encoder, tokenizer"):
        Sd2Attention.load(str(tmp_path), device="cpu")


def test_broken_weights_are_refused(pipeline, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(pipeline, copy)
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not load Stable Diffusion.*dslo.sd.model"):
        Sd2Attention.load(str(copy), device="cpu")


@pytest.mark.parametrize(
    "precision, reason", [("fp16", "needs a GPU"), ("fp8", "unknown dslo.sd.precision")]
)
def test_bad_precision_is_refused(pipeline, precision, reason):
    with pytest.raises(ModelLoadError, match=reason):
        Sd2Attention.load(str(pipeline), device="cpu", precision=precision)


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"timestep": 1000}, "dslo.sd.timestep"),
        ({"timestep": -1}, "dslo.sd.timestep"),
        ({"temperature": 0.0}, "dslo.sd.temperature"),
        ({"size": 16}, "dslo.sd.size"),
        ({"layers": "down"}, "dslo.sd.layers"),
    ],
)
def test_bad_settings_are_refused(pipeline, settings, reason):
    with pytest.raises(ValueError, match=reason):
        load(pipeline, **settings)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_cuda_matches_fp32(pipeline, pixels):
    on_gpu = Sd2Attention.load(str(pipeline), device="cuda", size=SD_SIZE)
    assert on_gpu.dtype == torch.float16
    gpu = on_gpu.affinity(pixels, (6, 10))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(
        gpu.cpu(), load(pipeline).affinity(pixels, (6, 10)), atol=2e-3, rtol=0
    )
