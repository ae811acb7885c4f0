"""Load an open_clip CLIP model for dense segmentation, with one clear error per failure.

Weights come from an open_clip pretrained tag (downloaded once on a machine with internet and
then cached), from a local checkpoint file (robots without internet), or from nowhere
(``pretrained: none``: random weights, only good for plumbing checks, so it warns loudly).

Activation: OpenAI's weights (and MetaCLIP's, DFN's, ...) were trained with QuickGELU, but
open_clip builds ``ViT-B-16`` with ``nn.GELU`` even for ``pretrained=openai`` and only warns;
the model then computes another function than the one trained. For a tag that open_clip marks
``quick_gelu``, ``load_clip`` builds the model with QuickGELU (as ``ViT-B-16-quickgelu``). A
checkpoint file says nothing about its activation: for such weights in a file, name the
``-quickgelu`` model.

Offline: a tag whose weights are in the local Hugging Face cache loads from there without any
network access; one that is not cached fails at once when ``HF_HUB_OFFLINE`` is set, or after
one request without retries when the hub cannot be reached (``hub_access``), with one message
that says how to get the weights onto the machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transform import merge_preprocess_dict
from open_clip.transformer import VisionTransformer

from ovss_ros.core.clip import hub_access
from ovss_ros.core.clip.errors import ModelLoadError  # noqa: F401 (re-exported)
from ovss_ros.core.file_checks import (
    MAX_MODEL_BYTES,
    WEIGHTS_SLACK,
    FileCheckError,
    check_config_numbers,
    gigabytes,
    parameter_bytes,
    read_json,
    regular_file,
    weights_bytes,
)

logger = logging.getLogger(__name__)

NO_WEIGHTS = ("", "none", "random")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedClip:
    """A CLIP model ready for dense inference, with what pre-processing needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def patch_size(self) -> int:
        return int(self.model.visual.patch_size[0])


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device that is missing is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ModelLoadError(
            f"unknown device {device!r}: set device to auto, cpu or cuda:N"
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} asked for but CUDA is not available: set device to cpu or auto"
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device {device!r} does not exist ({torch.cuda.device_count()} GPUs)"
        )
    return resolved


def resolve_device_precision(device: str, precision: str) -> torch.device:
    """The torch device for ``device`` (``resolve_device``) once ``precision`` is known and fits
    it (half precision needs a GPU); ModelLoadError saying what to set."""
    if precision not in PRECISIONS:
        raise ModelLoadError(
            f"unknown precision {precision!r}: set precision to one of {list(PRECISIONS)}"
        )
    torch_device = resolve_device(device)
    if torch_device.type == "cpu" and precision != "fp32":
        raise ModelLoadError(
            f"precision {precision} needs a GPU: set precision to fp32 on the CPU"
        )
    return torch_device


def _resolve_model_name(model: str) -> str:
    """A model-config JSON file registers a custom architecture under its file stem."""
    if model.endswith(".json"):
        try:
            path = regular_file(model, "model config file")
            config = read_json(path, "model config file", 1 << 20)
            if not isinstance(config, dict) or not isinstance(config.get("vision_cfg"), dict):
                raise FileCheckError(
                    f"model config file {str(path)!r} is not an open_clip model config (no "
                    "vision_cfg)"
                )
            check_config_numbers(config, path, "model config file")
        except FileCheckError as error:
            raise ModelLoadError(
                f"{error}: set model to an open_clip model-config JSON file"
            ) from None
        open_clip.add_model_config(path)
        return path.stem
    if model.startswith(("hf-hub:", "local-dir:")):
        return model
    if model not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown model {model!r}: set model to an open_clip name such as ViT-B-16 "
            "(see open_clip.list_models()) or to a model-config JSON file"
        )
    return model


def _resolve_pretrained(name: str, pretrained: str) -> str | None:
    if pretrained.strip().lower() in NO_WEIGHTS:
        return None  # said once the model is made (load_clip)
    looks_like_file = os.sep in pretrained or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors")
    )
    if looks_like_file or os.path.lexists(Path(pretrained).expanduser()):
        try:
            path = regular_file(pretrained, "checkpoint file")
        except FileCheckError as error:
            raise ModelLoadError(f"{error}: set pretrained to an existing file") from None
        return str(path)
    if name.startswith(("hf-hub:", "local-dir:")):
        return None
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ModelLoadError(
            f"unknown pretrained tag {pretrained!r} for {name}: set pretrained to one of {tags}, "
            "a local checkpoint file, or none"
        )
    return pretrained


OFFLINE_HINT = (
    "pre-fetch the weights on a machine with internet and copy its Hugging Face cache "
    "(~/.cache/huggingface/hub) to this one, or set pretrained to a local checkpoint file"
)


def tag_files(name: str, tag: str) -> tuple[str, list[str]] | None:
    """(hub repo id, file names in open_clip's order of preference) of an open_clip tag's
    weights, or None for a tag that is not on the Hugging Face hub (a plain URL).

    Follows ``open_clip.pretrained.download_pretrained``: ``hf_hub`` is ``org/repo/[file]``, the
    file defaults to ``open_clip_pytorch_model.bin`` and a ``.safetensors`` twin comes first.
    """
    hub = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "")
    if not hub:
        return None
    repo_id, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return repo_id, [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return repo_id, [filename[:-4] + ".safetensors", filename]
    return repo_id, [filename]


def _local_weights(name: str, tag: str) -> str | None:
    """The cached weights file of ``tag`` (no network), None to let open_clip download them;
    raises ModelLoadError at once when they are not cached and cannot be downloaded."""
    files = tag_files(name, tag)
    if files is None:
        return None
    repo_id, filenames = files
    cached = hub_access.cached_file(repo_id, filenames)
    if cached is not None:
        return cached
    problem = hub_access.unavailable(
        f"the weights of {name} pretrained={tag!r} ({repo_id})",
        repo_id,
        filenames[-1],
        OFFLINE_HINT,
    )
    if problem is not None:
        raise ModelLoadError(problem)
    return None


def needs_quick_gelu(name: str, weights: str | None) -> bool:
    """Whether ``weights`` is an open_clip tag trained with QuickGELU while the model config
    ``name`` builds ``nn.GELU`` (e.g. ``ViT-B-16`` + ``openai``); False for files and no weights.
    """
    if weights is None or Path(weights).expanduser().is_file():
        return False
    if name.startswith(("hf-hub:", "local-dir:")):
        return False
    tag = open_clip.get_pretrained_cfg(name, weights) or {}
    model = open_clip.get_model_config(name) or {}
    return bool(tag.get("quick_gelu")) and not model.get("quick_gelu", False)


class _NoRandomWeightsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def _check_sizes(name: str, weights: str | None, quick_gelu: bool) -> None:
    """Before anything is allocated: the architecture ``name`` declares (built on the meta
    device) is at most MAX_MODEL_BYTES, and a checkpoint file holds uncompressed tensors
    (``file_checks.weights_bytes``) of at most WEIGHTS_SLACK times that. ModelLoadError."""
    quiet = _NoRandomWeightsWarning()
    logging.getLogger().addFilter(quiet)  # open_clip warns on the root logger
    try:
        declared = parameter_bytes(
            lambda: open_clip.create_model(name, device="meta", force_quick_gelu=quick_gelu)
        )
    except Exception as error:  # open_clip raises many types for a bad config
        raise ModelLoadError(
            f"could not build {name} from its config ({type(error).__name__}: "
            f"{str(error)[:200]}): check the model config"
        ) from None
    finally:
        logging.getLogger().removeFilter(quiet)
    if declared > MAX_MODEL_BYTES:
        raise ModelLoadError(
            f"model {name} declares {gigabytes(declared)} of parameters (float32), more than "
            f"the {gigabytes(MAX_MODEL_BYTES)} this loader builds: check the model config"
        )
    if weights is None or not Path(weights).is_file():
        return
    limit = WEIGHTS_SLACK * declared + (16 << 20)
    try:
        weights_bytes(weights, "checkpoint file", limit)
    except FileCheckError as error:
        raise ModelLoadError(
            f"could not load {name} with pretrained={weights!r}: {error} (a checkpoint of the "
            f"{gigabytes(declared)} {name} holds at most {WEIGHTS_SLACK}x that): set pretrained "
            "to a checkpoint of this model"
        ) from None


def load_clip(
    model: str, pretrained: str, device: str = "auto", precision: str = "fp32"
) -> LoadedClip:
    """Build the model, load its weights and check that its image tower supports dense CLIP.

    ``model``: an open_clip name or a model-config JSON file; ``pretrained``: a tag, a checkpoint
    file or ``none``. A tag trained with QuickGELU gets QuickGELU (``needs_quick_gelu``).
    Raises ModelLoadError saying what to set.
    """
    torch_device = resolve_device_precision(device, precision)
    name = _resolve_model_name(model)
    weights = _resolve_pretrained(name, pretrained)
    quick_gelu = needs_quick_gelu(name, weights)
    if model.endswith(".json") or (weights is not None and Path(weights).is_file()):
        _check_sizes(name, weights, quick_gelu)
    if quick_gelu:
        logger.info(
            "pretrained %r was trained with QuickGELU: building %s with it (as %s-quickgelu)",
            weights,
            name,
            name,
        )
    if name.startswith("hf-hub:") and not hub_access.cached_file(name[7:], [HF_CONFIG_NAME]):
        problem = hub_access.unavailable(f"model {name}", name[7:], HF_CONFIG_NAME, OFFLINE_HINT)
        if problem is not None:
            raise ModelLoadError(problem)
    tag_cfg: dict = {}
    source = weights
    if weights is not None and not Path(weights).is_file() and not name.startswith("hf-hub:"):
        cached = _local_weights(name, weights)
        if cached is not None:  # load the file: open_clip would still ask the hub about it
            tag_cfg, source = open_clip.get_pretrained_cfg(name, weights) or {}, cached
    quiet = _NoRandomWeightsWarning()  # ours, above, says it (once, with what to set)
    logging.getLogger().addFilter(quiet)  # open_clip warns on the root logger
    try:
        clip = open_clip.create_model(
            name,
            pretrained=source,
            device=torch_device,
            precision=precision,
            force_quick_gelu=quick_gelu,
        )
    except Exception as error:  # open_clip raises many types: download, key mismatch, bad file
        hint = (
            "set pretrained to a local checkpoint file (no internet?)"
            if source is not None and not Path(source).is_file()
            else "check that the checkpoint matches the model architecture"
        )
        cached = f" (cached file {source})" if tag_cfg else ""
        raise ModelLoadError(
            f"could not load {name} with pretrained={pretrained!r}{cached}: {error}; {hint}"
        ) from error
    finally:
        logging.getLogger().removeFilter(quiet)
    if weights is None:  # after the model is made: the text encoding comes next
        logger.warning(
            "pretrained is %r: %s runs with RANDOM weights; its segmentation is meaningless. "
            "Set pretrained to an open_clip tag or a checkpoint file for real results.",
            pretrained,
            name,
        )
    visual = clip.visual
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise ModelLoadError(
            f"model {name} has no plain open_clip ViT image tower, which dense CLIP needs: "
            "set model to a ViT such as ViT-B-16"
        )
    clip.eval().requires_grad_(False)
    cfg = getattr(visual, "preprocess_cfg", {})
    if tag_cfg:  # loaded from the cached file: the tag's pre-processing, as open_clip sets it
        cfg = merge_preprocess_dict(cfg, tag_cfg)
        visual.preprocess_cfg = cfg
    return LoadedClip(
        model=clip,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        device=torch_device,
        dtype=PRECISIONS[precision],
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
    )
