"""What DSLO costs per frame with each affinity source, at 640x480, in one run.

    .venv/bin/python benchmarks/dslo_affinity_cost.py              # CPU, fp32
    .venv/bin/python benchmarks/dslo_affinity_cost.py --device cuda  # GPU: SD2 in fp16

Random weights at the real sizes (no weights are reachable here; the cost does not depend on
them): CLIP ViT-B/16 (open_clip, ``pretrained none``) and a Stable Diffusion 2 base UNet and VAE
built from SD2-base's published configs (865 M + 84 M parameters). Per frame, for every source:
the resize to a 448 px short side, the dense CLIP forward (which also gives the CLIP
affinities), for ``sd2`` the SD2 attention forward (VAE encoder + UNet up to the last collected
layer, at about 512x512 pixels), DSLO velocity on 21 classes and JBU to the resized image.
Prints the median seconds per frame and the ratio to ``naclip``. Frames are timed after a
warm-up; the CLIP forward is the same for every row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.dense.forward import dense_forward
from ovss_ros.core.methods.dense.jbu import joint_bilateral_upsample
from ovss_ros.core.methods.dslo.dslo import dslo_scores
from ovss_ros.core.methods.dslo.sd2_attention import Sd2Attention
from ovss_ros.core.segmenter import resized_size

# stabilityai/stable-diffusion-2-1-base: unet/config.json and vae/config.json (the parts that
# decide the cost), scheduler/scheduler_config.json's training schedule.
SD2_BASE_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
SD2_BASE_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SOURCES = ("naclip", "keykey", "mean", "sd2")
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def random_sd2(device: torch.device, dtype: torch.dtype, layers: str) -> Sd2Attention:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD2_BASE_UNET).to(device, dtype).requires_grad_(False)
    vae = AutoencoderKL(**SD2_BASE_VAE).to(device, dtype).requires_grad_(False)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )
    null_embedding = torch.randn(1, 77, 1024)  # the text encoder's output for ""
    return Sd2Attention(unet, vae, scheduler, null_embedding, layers=layers)


def frame(clip, text, sd2, source: str, rgb: np.ndarray) -> None:
    """One frame of the DSLO path, as the engine runs it (whole image, no windows)."""
    device = text.device
    image = torch.from_numpy(rgb).to(device).permute(2, 0, 1)[None].float() / 255
    size = resized_size(*rgb.shape[:2], 448, 16, max_long_side=2048)
    image = F.interpolate(image, size=size, mode="bilinear", antialias=True)
    pixels = (image - MEAN.to(device)) / STD.to(device)
    clip_source = None if source == "sd2" else source
    dense = dense_forward(clip.model.visual, pixels, "vanilla", clip_source)
    grid = tuple(dense.features.shape[1:3])
    affinity = sd2.affinity(image, grid) if source == "sd2" else dense.affinity
    logits = torch.einsum("nhwd,qd->nqhw", dense.features, text)
    scores = dslo_scores(logits, affinity, "velocity")
    joint_bilateral_upsample(scores, image).argmax(1).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--dslo-sd-layers", default="m2n2", choices=("m2n2", "up"))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    started = time.perf_counter()
    clip = load_clip("ViT-B-16", "none", str(device))
    sd2 = random_sd2(device, dtype, args.dslo_sd_layers)
    built = time.perf_counter() - started
    print(f"built CLIP ViT-B/16 and SD2-base UNet/VAE (random weights) in {built:.0f} s")
    text = F.normalize(torch.randn(21, clip.model.visual.output_dim, device=device), dim=-1)
    rgb = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    seconds = {}
    with torch.inference_mode():
        for source in SOURCES:
            frame(clip, text, sd2, source, rgb)  # warm-up
            times = []
            for _ in range(args.frames):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                frame(clip, text, sd2, source, rgb)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            seconds[source] = statistics.median(times)
    threads = torch.get_num_threads()
    print(
        f"DSLO velocity + JBU, 640x480 -> 448x592 (28x37 patches), 21 classes, {device}, "
        f"{threads} threads, median of {args.frames} frames; SD2 input 448x576, layers "
        f"{args.dslo_sd_layers}"
    )
    print(f"{'affinity':<10}{'s/frame':>10}{'x naclip':>10}")
    for source, value in seconds.items():
        print(f"{source:<10}{value:10.3f}{value / seconds['naclip']:10.2f}")


if __name__ == "__main__":
    main()
