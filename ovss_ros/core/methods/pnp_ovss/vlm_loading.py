"""Load the vision-language model of PnP-OVSS (BLIP image-text matching), one clear error each.

PnP-OVSS needs a text encoder that cross-attends to image patches and an image-text matching
(ITM) head: ``transformers.BlipForImageTextRetrieval``. ``pretrained`` names the checkpoint:

- a Hugging Face hub id (``Salesforce/blip-itm-large-flickr``, the weights the released code
  uses, or ``-large-coco``, ``-base-coco``, ``-base-flickr``), downloaded once on a machine with
  internet and then read from the local cache;
- a local directory written by ``save_pretrained`` (model and processor): robots without
  internet copy it there.

The cache is always tried first with ``local_files_only`` so that a cached model loads without
touching the network; not cached, the error comes at once when offline (``HF_HUB_OFFLINE=1``)
and after one request without retries when the hub cannot be reached (``hub_access``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ovss_ros.core.clip import hub_access
from ovss_ros.core.clip.model_loading import (
    PRECISIONS,
    ModelLoadError,
    resolve_device_precision,
)
from ovss_ros.core.file_checks import (
    MAX_MODEL_BYTES,
    FileCheckError,
    check_config_numbers,
    check_declared_model,
    check_folder_files,
    directory,
    folder_weights_bytes,
    gigabytes,
    parameter_bytes,
    read_json,
)
from ovss_ros.core.methods.pnp_ovss.settings import DEFAULT_VLM, VLM_MODELS

logger = logging.getLogger(__name__)

# BLIP's tokenizer is bert-base-uncased + [DEC] (30522) + [ENC] (30523); the published hub
# tokenizers omit [ENC] although the checkpoints keep its embedding row.
BLIP_ENC_ID = 30523
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP normalises like CLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedVlm:
    """A BLIP ITM model ready for PnP-OVSS, with what pre-processing needs to know about it."""

    model: torch.nn.Module  # transformers.BlipForImageTextRetrieval, eval mode, no param grads
    tokenizer: object  # its WordPiece tokenizer
    name: str  # hub id or directory it came from
    device: torch.device
    autocast: torch.dtype | None  # half precision for the forward/gradient pass, or None (fp32)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    enc_token_id: int | None  # BLIP's [ENC], put in place of [CLS] as the original ITM does

    @property
    def patch_size(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    @property
    def num_layers(self) -> int:
        """Layers of the text encoder, each with one cross-attention to the image."""
        return int(self.model.config.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.model.config.text_config.num_attention_heads)

    @property
    def max_text_tokens(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


def _looks_like_path(pretrained: str) -> bool:
    return pretrained.startswith((".", "~", os.sep)) or pretrained.count("/") > 1


def _from_pretrained(source: str, local_only: bool) -> tuple[torch.nn.Module, object, object]:
    """Model, tokenizer and (optional) image processor; raises OSError/ValueError from HF."""
    from transformers import AutoTokenizer, BlipForImageTextRetrieval, BlipImageProcessor

    model, info = BlipForImageTextRetrieval.from_pretrained(
        source, local_files_only=local_only, output_loading_info=True, dtype=torch.float32
    )
    parameters = dict(model.named_parameters())
    missing = sorted(k for k in info.get("missing_keys", ()) if k in parameters)
    if missing:  # e.g. a captioning BLIP: no ITM head, so it would run with random weights
        raise ValueError(
            f"the checkpoint is not a BLIP image-text matching model: {len(missing)} weights "
            f"missing, e.g. {missing[:3]}"
        )
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    try:
        processor = BlipImageProcessor.from_pretrained(source, local_files_only=local_only)
    except OSError:  # a checkpoint without preprocessor config: BLIP's defaults
        processor = None
    return model, tokenizer, processor


def enc_token_id(tokenizer: object, text_vocab_size: int) -> int | None:
    """BLIP's ``[ENC]`` id: from the tokenizer, else row 30523 of BLIP's 30524-row embedding.

    The original BLIP ITM (``salesforce/BLIP`` ``models/blip_itm.py``, and the released
    PnP-OVSS ``blip_image_text_matching.py``) replaces the first token by ``[ENC]``;
    transformers' ``BlipForImageTextRetrieval`` feeds ``[CLS]`` (transformers issue 25629).
    None when the model has no such token: then ``[CLS]`` stays.
    """
    vocab = tokenizer.get_vocab()
    if "[ENC]" in vocab and vocab["[ENC]"] < text_vocab_size:
        return int(vocab["[ENC]"])
    if text_vocab_size == BLIP_ENC_ID + 1 and len(tokenizer) <= BLIP_ENC_ID:
        return BLIP_ENC_ID
    return None


def load_vlm(
    model: str = "blip_itm",
    pretrained: str = DEFAULT_VLM,
    device: str = "auto",
    precision: str = "fp32",
) -> LoadedVlm:
    """Load a BLIP ITM checkpoint (hub id or local directory) for PnP-OVSS.

    Weights stay in float32; ``precision`` fp16/bf16 (GPU only) makes PnP-OVSS run its forward
    and gradient pass under ``torch.autocast`` with that type. Raises ModelLoadError whose
    message says what to set.
    """
    if model not in VLM_MODELS:
        raise ModelLoadError(
            f"unknown pnp.vlm_model {model!r}: set pnp.vlm_model to one of {VLM_MODELS}"
        )
    torch_device = resolve_device_precision(device, precision)
    pretrained = pretrained.strip()
    if not pretrained:
        raise ModelLoadError(
            f"pnp.vlm_pretrained is empty: set it to a hub id such as {DEFAULT_VLM} or a local "
            "directory saved with save_pretrained"
        )
    path = Path(pretrained).expanduser()
    if os.path.lexists(path) or _looks_like_path(pretrained):
        try:
            check_folder(path)
        except FileCheckError as error:
            raise ModelLoadError(
                f"could not load BLIP ITM from pnp.vlm_pretrained={pretrained!r}: {error}; set "
                "pnp.vlm_pretrained to a directory saved with save_pretrained that holds a BLIP "
                "ITM model, or to a hub id"
            ) from None
        loaded = _load(str(path), local_only=True, hint="check that it holds a BLIP ITM model")
    else:
        loaded = _load_hub(pretrained)
    network, tokenizer, processor = loaded
    network.to(torch_device).eval().requires_grad_(False)
    return LoadedVlm(
        model=network,
        tokenizer=tokenizer,
        name=pretrained,
        device=torch_device,
        autocast=None if precision == "fp32" else PRECISIONS[precision],
        mean=tuple(getattr(processor, "image_mean", None) or CLIP_MEAN),
        std=tuple(getattr(processor, "image_std", None) or CLIP_STD),
        enc_token_id=enc_token_id(tokenizer, network.config.text_config.vocab_size),
    )


def check_folder(path: Path) -> None:
    """A save_pretrained folder, checked before transformers reads it: a directory of regular
    files, a small ``config.json`` of bounded numbers, whose BLIP ITM architecture (built on
    the meta device) is at most MAX_MODEL_BYTES and held by its weight files (safetensors or
    uncompressed torch archives). Raises FileCheckError naming the file and the sizes."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    what = "pnp.vlm_pretrained directory"
    folder = directory(path, what)
    check_folder_files(folder, what)
    config_path = folder / "config.json"
    config = read_json(config_path, f"{what} config", 1 << 20)
    if not isinstance(config, dict):
        raise FileCheckError(f"{what} config {str(config_path)!r} is not a JSON object")
    check_config_numbers(config, config_path, f"{what} config")
    try:
        declared = parameter_bytes(
            lambda: BlipForImageTextRetrieval(BlipConfig.from_dict(dict(config)))
        )
    except Exception as error:  # transformers raises many types for a bad config
        raise FileCheckError(
            f"{what} config {str(config_path)!r} does not describe a BLIP ITM model "
            f"({type(error).__name__}: {str(error)[:200]})"
        ) from None
    if declared > MAX_MODEL_BYTES:
        raise FileCheckError(
            f"{what} config {str(config_path)!r} declares {gigabytes(declared)} of parameters, "
            f"more than the {gigabytes(MAX_MODEL_BYTES)} this loader builds"
        )
    check_declared_model(declared, folder_weights_bytes(folder, what), folder, what)


def _load_hub(hub_id: str) -> tuple[torch.nn.Module, object, object]:
    """The local cache first; the network only when allowed and the cache misses."""
    try:
        return _from_pretrained(hub_id, local_only=True)
    except (OSError, ValueError) as error:
        cache_error = error
    problem = hub_access.unavailable(
        f"BLIP model {hub_id!r} ({cache_error.__class__.__name__})",
        hub_id,
        "config.json",
        "set pnp.vlm_pretrained to a local directory saved with save_pretrained, or pre-fetch the "
        "model on a machine with internet and copy its Hugging Face cache to this one",
    )
    if problem is not None:
        raise ModelLoadError(problem)
    return _load(
        hub_id,
        local_only=False,
        hint="no internet? set pnp.vlm_pretrained to a local directory saved with save_pretrained",
    )


def _load(source: str, local_only: bool, hint: str) -> tuple[torch.nn.Module, object, object]:
    try:
        return _from_pretrained(source, local_only)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ...
        raise ModelLoadError(
            f"could not load BLIP ITM from pnp.vlm_pretrained={source!r}: {error}; {hint}"
        ) from error
