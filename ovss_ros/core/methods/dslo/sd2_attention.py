"""Stable Diffusion 2 self-attention as a patch affinity (DSLO's transition matrix source).

DSLO (arXiv 2604.07723, CVPR 2026) builds its Markov transition matrix from Stable Diffusion 2
self-attention: the image is encoded to latents, the UNet runs one unconditional denoising step
at a small noise level, and the self-attention of up-block layers is averaged. The paper's text
could not be read here and its code is not public, so the details below follow M2N2 (Karmann &
Urfalioglu, CVPR 2025; robert-gabriel-gaube/m2n2 on GitHub, files
``src/stable_diffusion_2_attention_aggregator.py`` and ``src/utils.py``), the closest public
code, which builds the same chain on SD2 attention:

* the image is resized to the SD input size and encoded by the VAE, latents = the mode of the
  latent distribution times ``vae.config.scaling_factor`` (M2N2 resizes to a 1024 px square for
  the 768 px SD2; here the aspect ratio is kept, see ``sd_input_size``);
* one UNet forward at ``timestep`` (M2N2: 100 of 1000) with the empty prompt's text embedding.
  M2N2 adds no noise to the latents (the UNet only sees the timestep); ``noise=True`` adds the
  forward-process noise of that timestep (one fixed-seed draw, the same for every image, so a
  frame's result depends neither on the run nor on the batch it came in), which is
  what "a small noise level" literally says;
* the self-attention probabilities ``softmax(q k^T / sqrt(d))`` of the ``attn1`` layers, averaged
  over heads (one map per image). M2N2's SD2 default weighs the first two
  transformer layers of the last (highest-resolution) up block 0.5 each (``layers="m2n2"``);
  ``layers="up"`` averages every up-block ``attn1`` layer, each resampled to the patch grid first
  (one reading of "averaged over the up-block layers");
* rows normalised; M2N2 then sharpens with a temperature, ``softmax(log(A) / T)`` per row
  (``change_temperature``, T = 0.65), before IPF. ``temperature=1`` (the default) leaves the
  attention as it is, because DSLO's description mentions no temperature.

Ours, not M2N2's: the attention grid is resampled to the CLIP patch grid (h, w) by adaptive
average pooling over both the query and the key axis (a CLIP patch's row is the mean of the rows
of the SD tokens under it; its column collects their mass), rows renormalised. IPF is left to
``dslo_scores``.

The empty-prompt embedding is computed once at load time with the checkpoint's own CLIP text
encoder and tokenizer (exactly what ``StableDiffusionPipeline.encode_prompt("")`` gives, for any
SD checkpoint), and the text encoder is released right after: it costs load time only.

Loading (the model folder or hub id, its checks, diffusers' ``from_pretrained``):
``sd2_loading.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ovss_ros.core.clip.model_loading import ModelLoadError
from ovss_ros.core.frame_budget import check_sd_size, rows_per_chunk
from ovss_ros.core.methods.dslo.sd2_loading import load_parts
from ovss_ros.core.methods.dslo.settings import (
    DEFAULT_SD_MODEL as DEFAULT_MODEL,
)
from ovss_ros.core.methods.dslo.settings import (
    LAYER_SETS,
    SD_MAX_SIZE,
    SD_MAX_TEMPERATURE,
    SD_PRECISIONS,
)

logger = logging.getLogger(__name__)

# pixels, the node parameter's maximum: SD2's VAE activation at it fits the per-frame budget



def sd_input_size(height: int, width: int, size: int, multiple: int = 64) -> tuple[int, int]:
    """SD input (H, W) for an image of ``height`` x ``width`` pixels.

    The image's aspect ratio at about the area of a ``size`` x ``size`` square, so the attention
    cost does not grow with the frame: each side rounded to a ``multiple`` (the VAE and UNet
    downsampling, 8 * 8 = 64 for SD2), at least one ``multiple``, and the long side cut so the
    area stays within ``size``^2 even when the short side had to be rounded up (thin strips).
    640x480 at 512 -> (448, 576); 16x2048 -> (64, 4096).
    """
    scale = size / math.sqrt(height * width)
    rounded = [
        max(multiple, round(side * scale / multiple) * multiple) for side in (height, width)
    ]
    short = min(rounded)
    longest = max(multiple, size * size // short // multiple * multiple)
    if height <= width:
        return rounded[0], min(rounded[1], longest)
    return min(rounded[0], longest), rounded[1]


def resample_affinity(
    attention: torch.Tensor, source: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """(N, H*W, H*W) attention on a ``source`` (H, W) grid -> (N, h*w, h*w) on ``grid`` (h, w).

    Adaptive average pooling over the key axis, then over the query axis (row-major patches on
    both; pooling repeats entries when a grid is finer than ``source``), rows renormalised to
    sum to 1. Float32.
    """
    batch = attention.shape[0]
    (height, width), (h, w) = source, grid
    keys = F.adaptive_avg_pool2d(attention.float().reshape(-1, 1, height, width), grid)
    keys = keys.reshape(batch, height * width, h * w).transpose(1, 2)  # (N, hw keys, HW queries)
    both = F.adaptive_avg_pool2d(keys.reshape(-1, 1, height, width), grid)
    both = both.reshape(batch, h * w, h * w).transpose(1, 2)  # (N, hw queries, hw keys)
    return both / both.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def sharpen(affinity: torch.Tensor, temperature: float) -> torch.Tensor:
    """M2N2's ``change_temperature``: ``softmax(log(A) / T)`` along rows (T < 1 sharpens)."""
    if temperature == 1.0:
        return affinity / affinity.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.softmax(affinity.clamp_min(1e-30).log() / temperature, dim=-1)


@dataclass
class LayerAttention:
    """One ``attn1`` layer's head-mean self-attention (N, H*W, H*W) on its (H, W) token grid."""

    name: str
    grid: tuple[int, int]
    attention: torch.Tensor


class _Collected(Exception):
    """Raised after the last collected layer: the rest of the UNet forward is not needed."""


def _attention_probabilities(attn: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``mean_heads softmax(q k^T * attn.scale)`` of a diffusers ``Attention`` (N, L, L), float32.

    One head at a time, so the peak is one (N, L, L) float32 map per head.
    """
    batch, length, _ = hidden.shape
    query = attn.to_q(hidden).float().view(batch, length, attn.heads, -1).transpose(1, 2)
    key = attn.to_k(hidden).float().view(batch, length, attn.heads, -1).transpose(1, 2)
    total = hidden.new_zeros((batch, length, length), dtype=torch.float32)
    for head in range(attn.heads):
        scores = query[:, head] @ key[:, head].transpose(-2, -1) * attn.scale
        total += torch.softmax(scores, dim=-1)
    return total / attn.heads


def _bins(length: int, out: int) -> list[tuple[int, int]]:
    """Adaptive average pooling's bins along one axis (PyTorch's: floor(i L / n) to
    ceil((i + 1) L / n); neighbours may overlap)."""
    return [(i * length // out, -(-(i + 1) * length // out)) for i in range(out)]


def _pooled_probabilities(
    attn: torch.nn.Module, hidden: torch.Tensor, source: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """``resample_affinity(_attention_probabilities(attn, hidden), source, grid)`` without the
    (N, H*W, H*W) map: whole rows of the ``source`` (H, W) token grid at a time (at most
    CHUNK_BYTES of scores), each chunk's head-mean attention pooled over the keys to ``grid``
    (h, w) and summed into the query bins it falls in. (N, h*w, h*w) float32, rows sum to 1.
    """
    batch, length, _ = hidden.shape
    (height, width), (h, w) = source, grid
    query = attn.to_q(hidden).float().view(batch, length, attn.heads, -1).transpose(1, 2)
    key = attn.to_k(hidden).float().view(batch, length, attn.heads, -1).transpose(1, 2)
    rows = rows_per_chunk(3 * batch * width * length * 4, height)  # scores, softmax, total
    row_bins = _bins(height, h)
    sums = hidden.new_zeros((batch, h, width, h * w), dtype=torch.float32)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        part = slice(top * width, bottom * width)
        total = hidden.new_zeros((batch, part.stop - part.start, length), dtype=torch.float32)
        for head in range(attn.heads):
            scores = query[:, head, part] @ key[:, head].transpose(-2, -1) * attn.scale
            total += torch.softmax(scores, dim=-1)
        total /= attn.heads
        keys = F.adaptive_avg_pool2d(total.reshape(-1, 1, height, width), grid)
        keys = keys.reshape(batch, bottom - top, width, h * w)
        for index, (start, stop) in enumerate(row_bins):
            first, last = max(start, top), min(stop, bottom)
            if first < last:
                sums[:, index] += keys[:, first - top : last - top].sum(dim=1)
    heights = torch.tensor([b - a for a, b in row_bins], dtype=torch.float32)
    means = sums / heights.to(sums.device).view(1, h, 1, 1)
    columns = means.permute(0, 1, 3, 2).reshape(-1, 1, width)  # (N*h*hw, 1, W)
    both = F.adaptive_avg_pool1d(columns, w).reshape(batch, h, h * w, w)
    both = both.permute(0, 1, 3, 2).reshape(batch, h * w, h * w)
    return both / both.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def _self_attention_layers(unet: torch.nn.Module, layers: str) -> list[str]:
    """Names of the ``attn1`` modules collected for a layer set, in execution order."""
    if layers not in LAYER_SETS:
        raise ValueError(f"unknown dslo.sd.layers {layers!r}: use one of {list(LAYER_SETS)}")
    names = [
        name
        for name, _ in unet.named_modules()
        if name.startswith("up_blocks.") and name.endswith(".attn1")
    ]
    if layers == "m2n2":
        last = f"up_blocks.{len(unet.up_blocks) - 1}.attentions."
        names = [
            f"{last}{index}.transformer_blocks.0.attn1"
            for index in (0, 1)
            if f"{last}{index}.transformer_blocks.0.attn1" in names
        ]
        if len(names) < 2:
            raise ValueError(
                "dslo.sd.layers m2n2 needs two attention layers in the UNet's last up block "
                "(SD2: up_blocks.3.attentions.0 and 1): set dslo.sd.layers to up"
            )
    if not names:
        raise ModelLoadError("the UNet has no self-attention (attn1) layer in its up blocks")
    return names


class Sd2Attention:
    """SD2 self-attention of an image, resampled to a patch grid: ``affinity(pixels, grid)``.

    Build with ``Sd2Attention.load(model, ...)`` (hub id or local directory) or directly from
    diffusers modules. ``timestep`` is in the scheduler's training steps [0, 1000); ``size`` is
    the side of the square whose area the SD input keeps (512: SD2-base's native size);
    ``temperature`` > 0 (1 = none). Not thread-safe: one caller. ``release()`` frees the
    models; the object is unusable afterwards.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        scheduler: object,
        null_embedding: torch.Tensor,
        size: int = 512,
        timestep: int = 100,
        noise: bool = False,
        temperature: float = 1.0,
        layers: str = "m2n2",
        seed: int = 0,
    ) -> None:
        self.unet, self.vae, self.scheduler = unet.eval(), vae.eval(), scheduler
        self.device, self.dtype = unet.device, unet.dtype
        self.null_embedding = null_embedding.to(self.device, self.dtype)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self._collected: list[LayerAttention] = []
        self._pool_to: tuple[int, int] | None = None  # affinity(): pool each layer in chunks
        self._latent_grid = (0, 0)
        self._hooks: list = []
        self.layer_names: list[str] = []
        self.reconfigure(
            size=size,
            timestep=timestep,
            noise=noise,
            temperature=temperature,
            layers=layers,
            seed=seed,
        )

    def check(self, **settings: object) -> tuple[dict[str, object], list[str]]:
        """Check ``settings`` against this model without changing anything.

        Returns every setting after the change and the ``attn1`` layers they collect. Raises
        ValueError for a bad value or an unknown name, RuntimeError once released.
        """
        unet, scheduler = self.unet, self.scheduler  # another thread may release meanwhile
        if unet is None or scheduler is None:
            raise RuntimeError("Sd2Attention was released")
        allowed = {"size", "timestep", "noise", "temperature", "layers", "seed"}
        if set(settings) - allowed:
            raise ValueError(f"unknown Sd2Attention settings {sorted(set(settings) - allowed)}")
        merged = {name: getattr(self, name, None) for name in allowed} | settings
        steps = int(scheduler.config.num_train_timesteps)
        if not 0 <= merged["timestep"] < steps:
            raise ValueError(f"dslo.sd.timestep must be in [0, {steps}), got {merged['timestep']}")
        if not 0 < merged["temperature"] <= SD_MAX_TEMPERATURE:  # False for NaN too
            raise ValueError(
                f"dslo.sd.temperature must be in (0, {SD_MAX_TEMPERATURE:g}], got "
                f"{merged['temperature']}"
            )
        check_sd_size(merged["size"], self.vae.config.block_out_channels[0], self.dtype.itemsize)
        if merged["size"] < self.multiple:
            raise ValueError(
                f"dslo.sd.size must be >= {self.multiple} pixels, got {merged['size']}"
            )
        return merged, _self_attention_layers(unet, merged["layers"])

    def reconfigure(self, **settings: object) -> None:
        """Change ``size``, ``timestep``, ``noise``, ``temperature``, ``layers`` or ``seed``
        without reloading the models. Everything is checked first (``check``): on ValueError (a
        bad value, an unknown name) nothing changes."""
        merged, names = self.check(**settings)
        allowed = set(merged)
        for name in allowed:
            setattr(self, name, merged[name])
        if names != self.layer_names:
            for hook in self._hooks:
                hook.remove()
            modules = dict(self.unet.named_modules())
            self.layer_names = names
            self._hooks = [
                modules[name].register_forward_pre_hook(self._hook(name), with_kwargs=True)
                for name in names
            ]

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        precision: str = "auto",
        cache_dir: str | None = None,
        **settings: object,
    ) -> Sd2Attention:
        """Load UNet, VAE, scheduler and (for the null embedding only) text encoder + tokenizer.

        ``model``: a local directory (a diffusers pipeline's ``save_pretrained`` layout) or a
        Hugging Face hub id (the needed files only; with ``HF_HUB_OFFLINE=1`` or without a
        network it must already be cached in ``cache_dir``, default the Hugging Face cache).
        ``precision`` ``auto`` = fp16 on CUDA, fp32 on the
        CPU. ``settings`` go to the constructor. Raises ModelLoadError (what to set) when the
        model cannot be loaded, ValueError for a bad setting.
        """
        unet, vae, scheduler, null_embedding = load_parts(model, device, precision, cache_dir)
        return cls(unet, vae, scheduler, null_embedding, **settings)

    def _hook(self, name: str):
        def collect(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            source = self._token_grid(hidden.shape[1])
            if self._pool_to is None:
                layer = LayerAttention(name, source, _attention_probabilities(module, hidden))
            else:  # row chunks straight to the patch grid: no (H*W)^2 map
                pooled = _pooled_probabilities(module, hidden, source, self._pool_to)
                layer = LayerAttention(name, self._pool_to, pooled)
            self._collected.append(layer)
            if name == self.layer_names[-1]:
                raise _Collected

        return collect

    def _token_grid(self, tokens: int) -> tuple[int, int]:
        height, width = self._latent_grid
        while height * width > tokens:
            height, width = -(-height // 2), -(-width // 2)
        if height * width != tokens:
            raise RuntimeError(f"{tokens} tokens fit no grid of the latents {self._latent_grid}")
        return height, width

    @torch.no_grad()
    def self_attention(self, pixels: torch.Tensor) -> list[LayerAttention]:
        """The collected layers' head-mean self-attention of RGB ``pixels`` (N, 3, H, W), [0, 1].

        Resizes to ``sd_input_size`` (bilinear, antialiased), encodes, adds the noise of
        ``timestep`` when ``noise`` is set, and runs the UNet up to the last collected layer.
        """
        if self.unet is None:
            raise RuntimeError("Sd2Attention was released")
        size = sd_input_size(*pixels.shape[-2:], self.size, self.multiple)
        image = pixels.to(self.device, torch.float32)
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image, size=size, mode="bilinear", antialias=True)
        image = (image.clamp(0, 1) * 2 - 1).to(self.dtype)
        latents = self.vae.encode(image).latent_dist.mode() * self.vae.config.scaling_factor
        timestep = torch.tensor([self.timestep], device=self.device)
        if self.noise:
            generator = torch.Generator(self.device).manual_seed(self.seed)
            noise = torch.randn(  # one draw for every image: independent of the batch
                (1, *latents.shape[1:]), generator=generator, device=self.device
            ).to(latents.dtype)
            latents = self.scheduler.add_noise(latents, noise.expand_as(latents), timestep)
        self._latent_grid = tuple(latents.shape[-2:])
        self._collected = []
        context = self.null_embedding.expand(len(latents), -1, -1)
        try:
            self.unet(latents, timestep, encoder_hidden_states=context)
        except _Collected:
            pass
        collected, self._collected = self._collected, []
        return collected

    def affinity(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch affinity (N, h*w, h*w) on the CLIP patch ``grid`` (h, w), float32, rows sum to 1.

        ``pixels`` (N, 3, H, W): RGB in [0, 1] (any device and dtype), the same image (or
        window) the CLIP grid covers. The layers' attention, each resampled to ``grid``
        (``resample_affinity``), averaged with equal weights, then ``sharpen``ed by the
        temperature. Rows are "from", columns "to", as ``dslo_scores`` expects.

        Bounded by the per-frame budget (``frame_budget``): one image at a time (the VAE's
        full-resolution activation is the largest map, ``check_sd_size``), and each layer's
        attention pooled to ``grid`` in row chunks of at most CHUNK_BYTES, never formed whole.
        """
        grid = (int(grid[0]), int(grid[1]))
        self._pool_to = grid
        try:
            per_image = []
            for image in pixels.split(1):
                layers = self.self_attention(image)
                per_image.append(sum(layer.attention for layer in layers) / len(layers))
        finally:
            self._pool_to = None
        return sharpen(torch.cat(per_image), self.temperature)

    def release(self) -> None:
        """Remove the hooks and drop the models (GPU memory is returned to the cache)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        on_gpu = self.device.type == "cuda"
        self.unet = self.vae = self.scheduler = self.null_embedding = None
        if on_gpu:
            torch.cuda.empty_cache()


__all__ = [
    "SD_MAX_SIZE",
    "SD_MAX_TEMPERATURE",
    "DEFAULT_MODEL",
    "LAYER_SETS",
    "SD_PRECISIONS",
    "LayerAttention",
    "Sd2Attention",
    "resample_affinity",
    "sd_input_size",
    "sharpen",
]
