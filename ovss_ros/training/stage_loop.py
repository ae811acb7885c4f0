"""The loop the three released stages of ``ovss-train-deop`` share: resumable, tqdm, validation.

A stage (:mod:`~ovss_ros.training.proposal_training`, :mod:`~.prompt_training`,
:mod:`~.released_training`) holds its trainable modules, optimiser, data set and validation; this
module steps it, keeps the history (means over ``log_every`` steps), validates every
``validate_every`` steps and at the end (mIoU on all, seen and unseen classes and their harmonic
mean, ``ConfusionMatrix.split_summary``), and writes every ``checkpoint_every`` steps and at the
end ``<output>/training_state.pt`` (step, optimiser, CPU RNG, history, trainable tensors: the
resume point), the stage's output file and ``<output>/metrics.json``. The learning-rate
schedules and the full-model gradient clipping are detectron2's, as the release configures them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ovss_ros.core.methods.deop.released_checkpoint import state_mismatch
from ovss_ros.evaluation.confusion_metrics import ConfusionMatrix
from ovss_ros.evaluation.evaluation_loop import read_rgb
from ovss_ros.training.deop_data import TrainingData
from ovss_ros.training.stage_config import STAGES, StageConfig, released_defaults  # noqa: F401
from ovss_ros.training.training_config import METRICS_NAME, json_safe

logger = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"


class StageStateError(ValueError):
    """A training state that cannot be resumed (the file and the reason)."""


def poly_factor(step: int, steps: int) -> float:
    """detectron2 ``WarmupPolyLR`` without warm-up: ``(1 - step / steps) ** 0.9``."""
    return (1 - step / steps) ** 0.9


def cosine_factor(step: int, steps: int, warmup_steps: int = 100) -> float:
    """detectron2 ``WarmupCosineLR`` with the prompt config's constant warm-up (factor 0.005
    for ``warmup_steps`` iterations, 100 as released)."""
    warmup = 0.005 if step < warmup_steps else 1.0
    return warmup * 0.5 * (1 + math.cos(math.pi * step / steps))


def param_groups(modules: dict[str, nn.Module], lr: float, weight_decay: float) -> list[dict]:
    """Optimiser groups as detectron2's ``build_optimizer`` makes them for these configs:
    normalisation layers' and embeddings' parameters without weight decay
    (``WEIGHT_DECAY_NORM`` / ``WEIGHT_DECAY_EMBED`` 0), the ``backbone`` at 0.1 x lr
    (``BACKBONE_MULTIPLIER``). ``modules``: name -> module (the name ``backbone`` is scaled)."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.Embedding)
    groups = []
    for name, module in modules.items():
        scale = 0.1 if name == "backbone" else 1.0
        plain, no_decay = [], []
        for sub in module.modules():
            for param in sub.parameters(recurse=False):
                if param.requires_grad:
                    (no_decay if isinstance(sub, norms) else plain).append(param)
        for params, decay in ((plain, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": lr * scale, "weight_decay": decay})
    return groups


def fingerprint(tensors: Mapping[str, torch.Tensor] | None) -> str:
    """SHA-256 (hex) of named tensors: names, dtypes, shapes and values, in name order
    ("none" for None): what identifies a frozen input of a stage across runs, whatever file
    holds it."""
    if tensors is None:
        return "none"
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Stage(Protocol):
    """What :func:`run_stage` needs of a stage. ``frozen_inputs``: what the stage reads and
    does not train, as ``{what: fingerprint}`` (the proposal network of stage deop, the prompt
    of stage proposals), recorded in the state so that a resume with other inputs is refused."""

    name: str
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int, int], float]

    def trainable(self) -> nn.Module: ...
    def dataset(self, length: int) -> torch.utils.data.Dataset: ...
    def collate(self, batch: list) -> tuple: ...
    def losses(self, batch: tuple) -> dict[str, torch.Tensor]: ...
    def validate(self, progress: bool) -> dict[str, float]: ...
    def write_output(self, output: Path, step: int) -> Path: ...
    def frozen_inputs(self) -> dict[str, str]: ...


def resize_short(rgb: np.ndarray, short: int) -> np.ndarray:
    """An image with its short side ``short`` (bilinear), as detectron2's test resize."""
    height, width = rgb.shape[:2]
    scale = short / min(height, width)
    size = (max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)


@torch.no_grad()
def segmentation_miou(
    data: TrainingData,
    scores: Callable[[np.ndarray], torch.Tensor],
    short: int,
    limit: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """mIoU (percent) on all, seen and unseen classes of ``data.val`` and their harmonic mean:
    ``scores(rgb)`` gives (K, h, w) class scores of a frame resized to short side ``short``,
    resized bilinearly to the labels' size and argmaxed (``sem_seg_postprocess``)."""
    confusion = ConfusionMatrix(len(data.classes))
    count = len(data.val) if not limit else min(limit, len(data.val))
    for index in tqdm(range(count), desc="validation", disable=not progress, leave=False):
        path, labels = data.val.sample(index)
        score = scores(resize_short(read_rgb(path), short)).float()
        score = torch.nn.functional.interpolate(
            score[None], size=labels.shape, mode="bilinear", align_corners=False
        )[0]
        confusion.update(labels, score.argmax(0).cpu().numpy())
    return {**confusion.split_summary(data.unseen), "images": count}


def _save_state(path: Path, stage: Stage, config: StageConfig, step: int, history: dict) -> None:
    state = {
        "stage": stage.name,
        "step": step,
        "optimizer": stage.optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "history": history,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "trainable": {k: v.detach().cpu() for k, v in stage.trainable().state_dict().items()},
        "inputs": stage.frozen_inputs(),
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_state(path: Path, stage: Stage) -> tuple[int, dict]:
    """Put ``path``'s trainable tensors, optimiser and RNG into ``stage``: (step, history).
    Raises StageStateError (missing, unreadable, another stage's, or not fitting)."""
    if not os.path.lexists(path):
        raise StageStateError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler and the zip reader raise many types
        raise StageStateError(f"{path} is unreadable ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("stage") != stage.name:
        found = state.get("stage") if isinstance(state, dict) else None
        raise StageStateError(
            f"{path} is the state of stage {found!r}, not {stage.name!r}: resume a run with "
            "the stage that wrote it"
        )
    step, history = state.get("step"), state.get("history")
    recorded = state.get("config") if isinstance(state.get("config"), dict) else {}
    planned = recorded.get("steps")  # the steps of the run that wrote it: a step is within
    if (
        isinstance(step, bool)
        or not isinstance(step, int)
        or step < 0
        or (isinstance(planned, int) and step > planned)
    ):
        raise StageStateError(f"{path}: its step is damaged: it cannot be resumed")
    if not _history_ok(history):
        raise StageStateError(f"{path}: its history is damaged: it cannot be resumed")
    check_inputs(path, state.get("inputs"), stage.frozen_inputs())
    trainable = state.get("trainable")
    if isinstance(trainable, dict):
        reason = state_mismatch(stage.trainable().state_dict(), trainable, "this run")
        if reason:
            raise StageStateError(f"{path} does not fit this run (trainable tensors: {reason})")
        for name, value in trainable.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise StageStateError(f"{path}: {name!r} holds NaN or infinite values: damaged")
    try:
        stage.trainable().load_state_dict(state["trainable"])
        stage.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise StageStateError(f"{path} does not fit this run ({reason})") from None
    reason = _optimizer_mismatch(stage.optimizer)
    if reason:
        raise StageStateError(f"{path} does not fit this run ({reason})")
    return step, history


def _history_ok(history: object) -> bool:
    """Whether ``history`` is a state's ``{"train": [dict], "validation": [dict with an int
    "step"]}`` (what :func:`run_stage` appends to and reads)."""
    if not isinstance(history, dict):
        return False
    train, validation = history.get("train"), history.get("validation")
    if not isinstance(train, list) or not isinstance(validation, list):
        return False
    return all(isinstance(entry, dict) for entry in train) and all(
        isinstance(entry, dict) and isinstance(entry.get("step"), int) for entry in validation
    )


def _optimizer_mismatch(optimizer: torch.optim.Optimizer) -> str:
    """The first loaded optimiser moment whose shape is not its parameter's ("" if none):
    ``Optimizer.load_state_dict`` does not check them, and the first step would fail."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                return (
                    f"optimizer state {name!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(param.shape)}"
                )
    return ""


def check_inputs(path: Path, recorded: object, given: dict[str, str]) -> None:
    """StageStateError when the frozen inputs a state was trained with (``recorded``, as
    ``Stage.frozen_inputs`` gave them) are not this run's (``given``), naming the first that
    differs and both fingerprints."""
    if not isinstance(recorded, dict):
        raise StageStateError(
            f"{path} records no fingerprints of its frozen inputs ({', '.join(given)}): it "
            "cannot be told whether this run gives the same ones; start a new run"
        )
    for name in sorted(set(recorded) | set(given)):
        before, now = recorded.get(name, "absent"), given.get(name, "absent")
        if before != now:
            raise StageStateError(
                f"{path} was trained with another {name}: sha256 {str(before)[:12]}, this "
                f"run's {str(now)[:12]}; resume with the {name} the run started with"
            )


def run_stage(
    stage: Stage,
    config: StageConfig,
    output: str | Path,
    resume: bool = False,
    stop_at: int | None = None,
) -> dict:
    """Train ``stage`` for ``config.steps`` steps (see the module docstring). ``resume``:
    continue from ``output/training_state.pt``; ``stop_at``: stop after that step with a
    checkpoint, as an interrupted run would. Returns {step, last, validation, output}."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / STATE_NAME
    start, history = 0, {"train": [], "validation": []}
    base = [group["lr"] for group in stage.optimizer.param_groups]  # before a state's decayed
    if resume:
        start, history = load_state(path, stage)
    parameters = [p for group in stage.optimizer.param_groups for p in group["params"]]
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    loader = torch.utils.data.DataLoader(
        stage.dataset(config.steps * config.batch_size),
        batch_size=config.batch_size,
        sampler=range(start * config.batch_size, end * config.batch_size),
        num_workers=config.workers,
        collate_fn=stage.collate,
        generator=torch.Generator().manual_seed(config.seed),
    )

    def save(step: int) -> Path:
        _save_state(path, stage, config, step, history)
        written = stage.write_output(output, step)
        (output / METRICS_NAME).write_text(json.dumps(json_safe(history), indent=1))
        return written

    bar = tqdm(total=config.steps, initial=start, desc=stage.name, disable=not config.progress)
    window: list[dict[str, float]] = []
    last: dict[str, float] = {}
    for step, batch in enumerate(loader, start=start):
        factor = stage.schedule(step, config.steps)
        for group, lr in zip(stage.optimizer.param_groups, base, strict=True):
            group["lr"] = lr * factor
        stage.trainable().train()
        losses = stage.losses(batch)
        total = sum(losses.values())
        value = float(total.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{stage.name}: loss is {value} at step {step}: lower --lr")
        stage.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if config.clip_norm:
            torch.nn.utils.clip_grad_norm_(parameters, config.clip_norm)
        stage.optimizer.step()
        last = {"loss": value, **{k: float(v.detach()) for k, v in losses.items()}}
        window.append(last)
        bar.set_postfix(loss=f"{value:.4f}")
        bar.update(1)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            history["train"].append({"step": done, "steps": len(window), **means})
            window = []
        if config.validate_every and done % config.validate_every == 0 and done < config.steps:
            history["validation"].append({"step": done, **stage.validate(False)})
            logger.info("step %d: %s", done, history["validation"][-1])
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < end:
            save(done)
    bar.close()
    if end < config.steps:
        written = save(end)
        return {"step": end, "last": last, "validation": None, "output": str(written)}
    final = max(start, config.steps)
    if not history["validation"] or history["validation"][-1]["step"] != final:
        history["validation"].append({"step": final, **stage.validate(config.progress)})
    written = save(final)
    return {
        "step": final,
        "last": last,
        "validation": history["validation"][-1],
        "output": str(written),
    }
