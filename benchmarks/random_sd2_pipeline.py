"""Write a Stable Diffusion 2 base pipeline with random weights, for timing the sd2 affinity.

    .venv/bin/python benchmarks/random_sd2_pipeline.py /tmp/sd2-random
    ovss-bench --pretrained none --dslo-sd-model /tmp/sd2-random \\
        --combos vanilla+dslo:naclip+jbu vanilla+dslo:keykey+jbu vanilla+dslo:mean+jbu \\
                 vanilla+dslo:sd2+jbu

No weights are reachable here, and the per-frame cost does not depend on them: the UNet and VAE
are built from SD2-base's published configs (``dslo_affinity_cost.SD2_BASE_UNET`` / ``_VAE``,
865 M + 84 M parameters) and saved with ``save_pretrained`` in the layout ``Sd2Attention.load``
reads, next to SD2's training schedule. The text encoder only gives the empty prompt's embedding
once at load time (then it is released), so a one-layer CLIP text model with SD2's width (1024,
the UNet's cross-attention size) and 77 tokens stands in for OpenCLIP ViT-H's 23 layers: it
changes the load time only. Written in fp32 (about 3.9 GB).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dslo_affinity_cost import SD2_BASE_UNET, SD2_BASE_VAE  # noqa: E402

TOKENS = 77


def write(directory: Path) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    UNet2DConditionModel(**SD2_BASE_UNET).save_pretrained(directory / "unet")
    AutoencoderKL(**SD2_BASE_VAE).save_pretrained(directory / "vae")
    DDPMScheduler(  # SD2's training schedule (scheduler/scheduler_config.json)
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
    ).save_pretrained(directory / "scheduler")
    text = CLIPTextConfig(
        vocab_size=16,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=1,
        num_attention_heads=16,
        max_position_embeddings=TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    CLIPTextModel(text).save_pretrained(directory / "text_encoder")
    sources = directory / "tokenizer_sources"
    sources.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a": 3, "a</w>": 4}
    (sources / "vocab.json").write_text(json.dumps(vocab))
    (sources / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        vocab_file=str(sources / "vocab.json"),
        merges_file=str(sources / "merges.txt"),
        model_max_length=TOKENS,
        pad_token="!",
    ).save_pretrained(directory / "tokenizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    write(args.directory)
    print(f"random SD2-base pipeline written to {args.directory}")


if __name__ == "__main__":
    main()
