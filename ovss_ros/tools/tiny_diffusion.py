"""A tiny random Stable-Diffusion-2-shaped pipeline, saved the way a real one is saved.

Real diffusers / transformers classes with small configs: the UNet keeps SD2's block layout
(cross-attention blocks, a plain first up block, linear projections, several heads, two
attention resolutions in the up blocks) at a few channels, inputs in multiples of 32 pixels; the
VAE keeps SD's 8x downsampling; the text encoder and tokenizer are real CLIP ones with a handful
of tokens. ``save_tiny_pipeline(directory)`` writes unet/, vae/, scheduler/, text_encoder/ and
tokenizer/ with ``save_pretrained``, as ``Sd2Attention.load`` reads them (what ``dslo.sd.model``
takes); the tokenizer's sources go to a temporary folder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TEXT_TOKENS = 8


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 2, 4),  # SD2's config means the number of heads by this
        cross_attention_dim=32,
        norm_num_groups=8,
        use_linear_projection=True,
    )


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )


def tiny_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(  # SD2's training schedule
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
    )


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return CLIPTextModel(config).eval()


def tiny_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a": 3, "a</w>": 4}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab_file=str(directory / "vocab.json"),
        merges_file=str(directory / "merges.txt"),
        model_max_length=TEXT_TOKENS,
        pad_token="!",
    )


def save_tiny_pipeline(directory: Path, seed: int = 0) -> Path:
    """Write the tiny pipeline's parts under ``directory`` and return it."""
    directory = Path(directory)
    tiny_unet(seed).save_pretrained(directory / "unet")
    tiny_vae(seed).save_pretrained(directory / "vae")
    tiny_scheduler().save_pretrained(directory / "scheduler")
    tiny_text_encoder(seed).save_pretrained(directory / "text_encoder")
    with tempfile.TemporaryDirectory() as sources:
        tiny_tokenizer(Path(sources)).save_pretrained(directory / "tokenizer")
    return directory
