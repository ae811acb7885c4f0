"""Loading Stable Diffusion 2 for DSLO's sd2 affinity: the model folder found (a local
``save_pretrained`` directory, or the needed files of a Hugging Face hub id, cache first), its
parts checked before diffusers or transformers read them (regular files, sizes, declared model
sizes), then UNet, VAE, scheduler and the empty prompt's embedding loaded (diffusers'
``from_pretrained``; the embedding as ``StableDiffusionPipeline.encode_prompt("")``).

diffusers and transformers are imported here when a model is loaded, not with the core.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ovss_ros.core.clip import hub_access
from ovss_ros.core.clip.model_loading import PRECISIONS, ModelLoadError, resolve_device
from ovss_ros.core.file_checks import (
    MAX_MODEL_BYTES,
    FileCheckError,
    check_config_numbers,
    check_declared_model,
    check_folder_files,
    folder_weights_bytes,
    gigabytes,
    parameter_bytes,
    read_json,
)
from ovss_ros.core.methods.dslo.settings import DEFAULT_SD_MODEL as DEFAULT_MODEL
from ovss_ros.core.methods.dslo.settings import SD_PRECISIONS

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# The pipeline parts this module reads, as save_pretrained writes them (safetensors weights).
SUBFOLDERS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
HUB_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
)
LOAD_HINT = (
    "set dslo.sd.model to a local directory written by a diffusers pipeline's save_pretrained "
    f"(subfolders {', '.join(SUBFOLDERS)}; safetensors weights), or, on a machine with "
    f"internet, to a Hugging Face hub id such as {DEFAULT_MODEL} (downloaded once, then cached)"
)


def load_parts(
    model: str, device: str, precision: str, cache_dir: str | None
) -> tuple[torch.nn.Module, torch.nn.Module, object, torch.Tensor]:
    """(UNet, VAE, scheduler, empty-prompt embedding) of ``model`` on ``device``; ModelLoadError
    (what to set) when it cannot be loaded. ``Sd2Attention.load`` documents the arguments."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available

    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    directory = local_directory(model, cache_dir)
    try:
        check_pipeline_folder(Path(directory))
    except FileCheckError as error:
        raise ModelLoadError(
            f"could not load Stable Diffusion model {model!r}: {error}; {LOAD_HINT}"
        ) from None
    try:
        options = {"torch_dtype": dtype, "local_files_only": True}
        if not is_accelerate_available():  # say so, instead of diffusers' warning per model
            options["low_cpu_mem_usage"] = False
        unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet", **options)
        vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", **options)
        scheduler = DDPMScheduler.from_pretrained(
            directory, subfolder="scheduler", local_files_only=True
        )
        null_embedding = empty_prompt_embedding(directory, dtype, torch_device)
    except Exception as error:  # diffusers/transformers raise many types: files, keys, shapes
        raise ModelLoadError(
            f"could not load Stable Diffusion model {model!r}: {error}; {LOAD_HINT}"
        ) from error
    unet.requires_grad_(False).to(torch_device)
    vae.requires_grad_(False).to(torch_device)
    return unet, vae, scheduler, null_embedding


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision not in SD_PRECISIONS:
        raise ModelLoadError(
            f"unknown dslo.sd.precision {precision!r}: set dslo.sd.precision to one of "
            f"{list(SD_PRECISIONS)}"
        )
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and precision != "fp32":
        raise ModelLoadError(
            f"dslo.sd.precision {precision} needs a GPU: set dslo.sd.precision to fp32 or auto "
            "on the CPU"
        )
    return PRECISIONS[precision]


def local_directory(model: str, cache_dir: str | None = None) -> str:
    """The directory the pipeline parts are read from: ``model`` itself or its hub snapshot.

    A hub id is resolved to the cached snapshot (downloading the needed files first unless
    offline); nothing is retried, so an offline machine without the files fails at once.
    """
    if not model.strip():
        raise ModelLoadError(f"dslo.sd.model is empty: {LOAD_HINT}")
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [name for name in SUBFOLDERS if not (path / name).is_dir()]
        if missing:
            raise ModelLoadError(
                f"Stable Diffusion directory {str(path)!r} has no {', '.join(missing)}: "
                f"{LOAD_HINT}"
            )
        return str(path)
    if path.exists() or not HUB_ID.fullmatch(model):
        raise ModelLoadError(
            f"Stable Diffusion model {model!r} is neither a directory nor a hub id "
            f"(owner/name): {LOAD_HINT}"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        return snapshot_download(
            model, allow_patterns=list(HUB_FILES), cache_dir=cache_dir, local_files_only=True
        )
    except Exception as cached_error:  # not cached (or incomplete): download unless offline
        if HF_HUB_OFFLINE:
            raise ModelLoadError(
                f"Stable Diffusion model {model!r} is not in the Hugging Face cache and "
                f"HF_HUB_OFFLINE is set ({type(cached_error).__name__}): {LOAD_HINT}"
            ) from cached_error
    unreachable = hub_access.probe(model, "model_index.json")  # one request, no retries
    if unreachable is not None:
        raise ModelLoadError(
            f"Stable Diffusion model {model!r} is not in the Hugging Face cache and the hub "
            f"cannot be reached ({hub_access.where()}; {unreachable}): {LOAD_HINT}"
        )
    try:
        return snapshot_download(model, allow_patterns=list(HUB_FILES), cache_dir=cache_dir)
    except Exception as error:  # huggingface_hub raises many types: network, auth, not found
        raise ModelLoadError(
            f"could not download Stable Diffusion model {model!r} ({error}): {LOAD_HINT}"
        ) from error


def check_pipeline_folder(folder: Path) -> None:
    """The pipeline parts, checked before diffusers or transformers read them: regular files
    only, small configs of bounded numbers, and each model's architecture (UNet, VAE, text
    encoder, built on the meta device) at most MAX_MODEL_BYTES and held by its weight files
    (safetensors or uncompressed torch archives). Raises FileCheckError."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    what = "Stable Diffusion directory"
    check_folder_files(folder, what)
    read_json(folder / "scheduler" / "scheduler_config.json", f"{what} scheduler config", 1 << 20)
    builders = {
        "unet": lambda config: UNet2DConditionModel.from_config(config),
        "vae": lambda config: AutoencoderKL.from_config(config),
        "text_encoder": lambda config: CLIPTextModel(CLIPTextConfig.from_dict(config)),
    }
    for part, build in builders.items():
        config_path = folder / part / "config.json"
        config = read_json(config_path, f"{what} {part} config", 1 << 20)
        if not isinstance(config, dict):
            raise FileCheckError(f"{what} {part} config {str(config_path)!r} is not an object")
        check_config_numbers(config, config_path, f"{what} {part} config")
        try:
            declared = parameter_bytes(lambda build=build, config=config: build(dict(config)))
        except Exception as error:  # diffusers/transformers raise many types for a bad config
            raise FileCheckError(
                f"{what} {part} config {str(config_path)!r} does not describe the model "
                f"({type(error).__name__}: {str(error)[:200]})"
            ) from None
        if declared > MAX_MODEL_BYTES:
            raise FileCheckError(
                f"{what} {part} config {str(config_path)!r} declares {gigabytes(declared)} of "
                f"parameters, more than the {gigabytes(MAX_MODEL_BYTES)} this loader builds"
            )
        held = folder_weights_bytes(folder / part, f"{what} {part} weights")
        check_declared_model(declared, held, folder / part, f"{what} {part}")


def empty_prompt_embedding(
    directory: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The UNet's unconditional context (1, tokens, D): the text encoder's output for "".

    As ``StableDiffusionPipeline.encode_prompt``: padded to the tokenizer's maximum length, the
    attention mask only when the encoder's config asks for it, the last hidden state.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        directory, subfolder="tokenizer", local_files_only=True
    )
    encoder = CLIPTextModel.from_pretrained(
        directory, subfolder="text_encoder", dtype=dtype, local_files_only=True
    ).to(device)
    tokens = tokenizer(
        "",
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    with torch.no_grad():
        embedding = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    del encoder
    return embedding
