"""The DeOP checkpoint: one ``torch.save`` file with the trained weights and what they need.

Contents (a plain dict, read back with ``torch.load(weights_only=True)``):

- ``format`` ("ovss_ros.deop") and ``version``;
- ``clip``: the CLIP it was trained on: open_clip model name, its model config, widths, patch
  size, and a fixed sample of its weights (so another pretrained tag of the same architecture
  is recognised too);
- ``architecture`` and ``weights``: :class:`~ovss_ros.core.deop_heads.DeopModules`;
- ``settings``: the DeOP settings the model was validated with (the pipeline's defaults);
- ``training`` (optional): step, optimiser and RNG state, metrics, for ``--resume``.

Every way a file can be unusable is one :class:`CheckpointError` (a ValueError) naming the file
and what to do: missing, unreadable or corrupt, not a DeOP checkpoint, a newer format, or
trained on another CLIP.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from ovss_ros.core.deop_heads import DeopModules
from ovss_ros.core.model_loading import LoadedClip

FORMAT = "ovss_ros.deop"
VERSION = 1
WEIGHT_SAMPLES = 256


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


def load_checkpoint(path: str | Path, clip: LoadedClip) -> Checkpoint:
    """Read, check against ``clip`` and build the modules; raises CheckpointError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"DeOP checkpoint {str(path)!r} not found: set deop_checkpoint to an existing file "
            "(made by ovss-train-deop), or leave it empty for training-free DeOP"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"DeOP checkpoint {path} is unreadable or corrupt ({type(error).__name__}: "
            f"{str(error)[:200]}): copy it again or train a new one"
        ) from error
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an ovss_ros DeOP checkpoint (no format {FORMAT!r}): "
            "give a file written by ovss-train-deop"
        )
    if content.get("version") != VERSION:
        raise CheckpointError(
            f"DeOP checkpoint {path} has format version {content.get('version')}; this ovss_ros "
            f"reads version {VERSION}: train it again or update ovss_ros"
        )
    check_clip(content["clip"], clip, path)
    try:
        modules = DeopModules(content["architecture"])
        modules.load_state_dict(content["weights"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"DeOP checkpoint {path} does not fit its own architecture ({error}): it is damaged"
        ) from error
    modules.to(clip.device).eval().requires_grad_(False)
    return Checkpoint(path, modules, content.get("settings", {}), content.get("training"))
