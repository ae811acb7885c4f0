"""The DeOP checkpoint: one ``torch.save`` file with the trained weights and what they need.

Contents (a plain dict, read back with ``torch.load(weights_only=True)``):

- ``format`` ("ovss_ros.deop") and ``version``;
- ``clip``: the CLIP it was trained on: open_clip model name, its model config, widths, patch
  size, and a fixed sample of its weights (so another pretrained tag of the same architecture
  is recognised too);
- ``architecture`` and ``weights``: :class:`~ovss_ros.core.methods.deop.heads.DeopModules`;
- ``settings``: the DeOP settings the model was validated with (the pipeline's defaults);
- ``training`` (optional): step, optimiser and RNG state, metrics, for ``--resume``.

Every way a file can be unusable is one :class:`CheckpointError` (a ValueError) naming the file
and what to do: missing, not a regular file, unreadable or corrupt, made to inflate, not a DeOP
checkpoint, a newer format, a wrong structure, or trained on another CLIP.

Nothing in the file is trusted before it is checked: the path must be a regular file; the zip's
central directory must declare only uncompressed records of at most MAX_CHECKPOINT_BYTES
(``file_checks.check_torch_archive``) before ``torch.load(weights_only=True, mmap=True)`` maps
it (tensors stay in the file until used); every key and type is checked
(``check_structure``); the architecture's integers are bounded and its modules are built on the
``meta`` device first, and every weight must have the shape that architecture declares, before
any module is allocated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.file_checks import FileCheckError, check_torch_archive, regular_file
from ovss_ros.core.methods.deop.heads import DeopModules

FORMAT = "ovss_ros.deop"
VERSION = 1
WEIGHT_SAMPLES = 256
# The largest checkpoint read (modules + a training run's optimiser state): DeOP's modules on a
# ViT-L CLIP with a proposal head are tens of MB, Adam's state twice that.
MAX_CHECKPOINT_BYTES = 1 << 30
# Architecture integers (widths, heads, queries, context tokens) and layer counts: far above
# any trained DeOP (512 wide, 8 heads, 100 queries, 1-2 layers), far below a memory bomb.
MAX_ARCHITECTURE_INT = 1 << 14
MAX_LAYERS = 64
MISSING = object()


class CheckpointError(ValueError):
    """A DeOP checkpoint cannot be used; ``str(error)`` says why and what to do."""


def weight_sample(clip: LoadedClip) -> torch.Tensor:
    """``WEIGHT_SAMPLES`` fixed entries of the image tower's projection and class embedding.

    Enough to tell two weight sets of one architecture apart; compared with a tolerance so that
    the same weights in fp16 or bf16 still match.
    """
    visual = clip.model.visual
    values = torch.cat([visual.proj.detach().flatten(), visual.class_embedding.detach().flatten()])
    index = torch.linspace(0, len(values) - 1, WEIGHT_SAMPLES).long().to(values.device)
    return values[index].float().cpu()


def clip_identity(clip: LoadedClip) -> dict:
    """What a checkpoint records about the CLIP it was trained on."""
    visual = clip.model.visual
    return {
        "name": clip.name,
        "config": open_clip.get_model_config(clip.name),
        "embed_dim": int(visual.output_dim),
        "width": int(visual.conv1.out_channels),
        "patch_size": clip.patch_size,
        "weights": weight_sample(clip),
    }


def check_clip(saved: dict, clip: LoadedClip, path: Path) -> None:
    """Raise CheckpointError unless ``clip`` is the model the checkpoint was trained on."""
    current = clip_identity(clip)
    if saved["name"] != current["name"] or (
        saved["config"] is not None
        and current["config"] is not None
        and saved["config"] != current["config"]
    ):
        raise CheckpointError(
            f"DeOP checkpoint {path} was trained on CLIP {saved['name']!r}, but the loaded model "
            f"is {current['name']!r}: set model (and pretrained) to the ones it was trained on, "
            "or train a checkpoint for this model with ovss-train-deop"
        )
    for key in ("embed_dim", "width", "patch_size"):
        if saved[key] != current[key]:
            raise CheckpointError(
                f"DeOP checkpoint {path}: CLIP {key} {saved[key]} != {current[key]} of the loaded "
                f"{current['name']}: set model to the one it was trained on"
            )
    if not torch.allclose(saved["weights"], current["weights"], rtol=1e-2, atol=1e-3):
        raise CheckpointError(
            f"DeOP checkpoint {path} was trained on other weights of {current['name']} "
            "(another pretrained tag or file): set pretrained to the weights it was trained on"
        )


def save_checkpoint(
    path: str | Path,
    modules: DeopModules,
    clip: LoadedClip,
    settings: dict,
    training: dict | None = None,
) -> Path:
    """Write the checkpoint atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "format": FORMAT,
        "version": VERSION,
        "clip": clip_identity(clip),
        "architecture": modules.architecture,
        "weights": {k: v.detach().cpu() for k, v in modules.state_dict().items()},
        "settings": dict(settings),
    }
    if training is not None:
        content["training"] = training
    partial = path.with_name(path.name + ".partial")
    torch.save(content, partial)
    os.replace(partial, path)
    return path


@dataclass
class Checkpoint:
    """A loaded checkpoint: its modules (on the CLIP's device), settings and training state."""

    path: Path
    modules: DeopModules
    settings: dict
    training: dict | None


def read_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """The checked content of a DeOP checkpoint file (tensors still mapped from the file).

    Raises CheckpointError: not found, not a regular file, more than MAX_CHECKPOINT_BYTES or a
    compressed record (checked from the zip's directory before reading), unreadable or
    corrupt, not a DeOP checkpoint, another format version, a wrong structure
    (``check_structure``).
    """
    hint = (
        "set deop.checkpoint to the DeOP release's model_final.pth or a file made by "
        "ovss-train-deop, or use method superpixel_clip for the training-free mode"
    )
    try:
        path = regular_file(path, "DeOP checkpoint")
    except FileCheckError as error:
        raise CheckpointError(f"{error}: {hint}") from None
    try:
        check_torch_archive(path, "DeOP checkpoint", MAX_CHECKPOINT_BYTES)
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # the unpickler and zip reader raise many types
        again = (
            "copy it again (the DeOP release's model_final.pth, or a file from ovss-train-deop)"
        )
        if isinstance(error, FileCheckError):  # it names the file and says what is wrong
            raise CheckpointError(f"{error}: unreadable or corrupt, {again}") from None
        raise CheckpointError(
            f"DeOP checkpoint {path} is unreadable or corrupt ({type(error).__name__}: "
            f"{str(error)[:300]}): {again}"
        ) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an ovss_ros DeOP checkpoint (no format {FORMAT!r}): "
            "give the DeOP release's model_final.pth or a file written by ovss-train-deop"
        )
    if content.get("version") != VERSION:
        raise CheckpointError(
            f"DeOP checkpoint {path} has format version {_shown(content.get('version'))}; this "
            f"ovss_ros reads version {VERSION}: train it again or update ovss_ros"
        )
    check_structure(content, path)
    return path, content


def load_checkpoint(path: str | Path, clip: LoadedClip) -> Checkpoint:
    """Read and check the file (``read_checkpoint``), check it against ``clip``, build the
    modules on ``clip``'s device; raises CheckpointError (one reason, what to do)."""
    path, content = read_checkpoint(path)
    check_clip(content["clip"], clip, path)
    modules = build_modules(content, path)
    modules.to(clip.device).eval().requires_grad_(False)
    return Checkpoint(path, modules, content.get("settings", {}), content.get("training"))


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(content: dict, key: str, kinds: type | tuple, path: Path, where: str = "") -> object:
    """``content[key]`` if it is of ``kinds``; CheckpointError naming the key otherwise."""
    value = content.get(key, MISSING) if isinstance(content, dict) else MISSING
    if value is MISSING:
        raise CheckpointError(
            f"DeOP checkpoint {path} has no {where}{key!r}: it is damaged or was not written "
            "by ovss-train-deop"
        )
    if not isinstance(value, kinds) or (kinds is int and isinstance(value, bool)):
        names = (
            kinds.__name__
            if isinstance(kinds, type)
            else " or ".join(kind.__name__ for kind in kinds)
        )
        raise CheckpointError(
            f"DeOP checkpoint {path}: {where}{key!r} must be {names}, got "
            f"{type(value).__name__} {_shown(value)}: it is damaged"
        )
    return value


def check_structure(content: dict, path: Path) -> None:
    """Every key a checkpoint needs, with its type; bounded architecture integers.

    ``clip``: name (str), config (dict or None), embed_dim, width, patch_size (int), weights
    (float tensor of WEIGHT_SAMPLES); ``architecture`` (dict; see ``check_architecture``);
    ``weights`` (str -> tensor, floating ones finite); ``settings`` (dict, optional);
    ``training`` (dict, optional).
    Raises CheckpointError naming the key.
    """
    saved = _field(content, "clip", dict, path)
    _field(saved, "name", str, path, "clip ")
    if saved.get("config") is not None:
        _field(saved, "config", dict, path, "clip ")
    for key in ("embed_dim", "width", "patch_size"):
        _field(saved, key, int, path, "clip ")
    sample = _field(saved, "weights", torch.Tensor, path, "clip ")
    if sample.shape != (WEIGHT_SAMPLES,) or not sample.is_floating_point():
        raise CheckpointError(
            f"DeOP checkpoint {path}: clip 'weights' must be {WEIGHT_SAMPLES} floats, got "
            f"{sample.dtype} {tuple(sample.shape)}: it is damaged"
        )
    check_architecture(_field(content, "architecture", dict, path), path)
    weights = _field(content, "weights", dict, path)
    for name, tensor in weights.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"DeOP checkpoint {path}: weights entry {_shown(name)} is not a named tensor"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"DeOP checkpoint {path}: weights {name!r} holds NaN or infinite values: the "
                "file is damaged or its training diverged (resume from an earlier checkpoint)"
            )
    for key in ("settings", "training"):
        if key in content and content[key] is not None:
            _field(content, key, dict, path)


def check_architecture(architecture: dict, path: Path) -> None:
    """Every integer of the architecture (nested) in [0, MAX_ARCHITECTURE_INT], layer counts at
    most MAX_LAYERS, ``embed_dim`` present: what a module is built from stays small."""
    _field(architecture, "embed_dim", int, path, "architecture ")

    def walk(value: object, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}" if where else str(key))
        elif _is_int(value):
            limit = MAX_LAYERS if where.endswith("layers") else MAX_ARCHITECTURE_INT
            if not 0 <= value <= limit:
                raise CheckpointError(
                    f"DeOP checkpoint {path}: architecture {where} is {value}, outside [0, "
                    f"{limit}]: refused before building anything (the file is damaged or made "
                    "to exhaust memory)"
                )
        elif not isinstance(value, float | bool | str | type(None)):
            raise CheckpointError(
                f"DeOP checkpoint {path}: architecture {where} is a {type(value).__name__}"
            )

    walk(architecture, "")


def build_modules(content: dict, path: Path) -> DeopModules:
    """The modules of a checked checkpoint, weights loaded (on the CPU).

    Built on the ``meta`` device first: every weight must exist with the shape its
    architecture declares (and no other weight be present) before anything is allocated.
    Raises CheckpointError.
    """
    architecture, weights = content["architecture"], content["weights"]
    try:
        with torch.device("meta"):
            expected = DeopModules(architecture).state_dict()
    except Exception as error:  # a bad architecture fails in many ways
        raise CheckpointError(
            f"DeOP checkpoint {path} has an unusable architecture ({type(error).__name__}: "
            f"{str(error)[:200]}): it is damaged"
        ) from None
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [
        f"{name} {tuple(weights[name].shape)} (expected {tuple(tensor.shape)})"
        for name, tensor in expected.items()
        if name in weights
        and (weights[name].shape != tensor.shape or weights[name].dtype != tensor.dtype)
    ]
    if missing or extra or wrong:
        problems = [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {extra[:3]}"] * bool(
            extra
        )
        problems += [f"wrong shape or type {wrong[:3]}"] * bool(wrong)
        raise CheckpointError(
            f"DeOP checkpoint {path} does not fit its own architecture ({'; '.join(problems)}): "
            "it is damaged"
        )
    modules = DeopModules(architecture)
    modules.load_state_dict(weights)
    return modules
