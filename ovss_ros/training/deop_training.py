"""Training of DeOP's modules with CLIP frozen: the CAL decoder, the "no object" embedding, and
optionally the learned prompt context and the class-agnostic proposal head.

One step (DeOP's ``ZeroShotClipfeatUpsample_addnorm_vit16Query2D_maskvit.forward`` and
``criterion_decoder.SetCriterion.loss_labels_bce``, CongHan0808/DeOP):

1. CLIP blocks 1..L-1 on the crops (no gradient), proposals on the mask grid (superpixels,
   clusters, or the proposal head, whose masks are detached for the rest of the step);
2. severed last block (no gradient), CAL decoder -> proposal embeddings, softmax of
   ``100 * cos`` over the seen classes' text embeddings and "no object";
3. per pixel ``out = sigmoid(3 * sum_k p_k m_k - 3)`` (``OUTPUT_SIG`` 3), against the one-hot
   labels at the mask grid where ignored pixels (and unseen classes) are "no object";
   loss ``2.0 * focal BCE (alpha 0.25, gamma 2) + 0.8 * Dice over the classes`` (the released
   ``DECODER_CE_WEIGHT`` / ``DECODER_DICE_WEIGHT``);
4. with a proposal head: MaskFormer's Hungarian set loss (``ovss_ros.core.methods.deop.proposals``)
   added.

``loss: ce`` replaces step 3 by the per-pixel cross-entropy of the normalised semantic scores
``sum_k p_k m_k / sum_k m_k`` (ignored pixels and unseen classes count as "no object"), weighted
by ``ce_weight``. Not in the release: its ``sigmoid(3 * out - 3)`` is made for MaskFormer's
overlapping masks; on a partition of the image (superpixels, clusters) ``out`` is at most 1, so
a perfect prediction scores 0.5 and training crawls (planted shapes, tiny random CLIP, 200
steps: mIoU 21 -> 30 with ``deop``, 21 -> 62 with ``ce``).

Departures: the loss is computed on the mask grid (1/4 of the crop at 4 cells per 16-pixel
patch) rather than at label resolution; the proposal head trains in the same run as the
decoder (the release trains its MaskFormer first); CLIP's positional embeddings stay frozen.
Optimiser AdamW (lr 2e-4 as released, weight decay 1e-4), poly learning-rate decay (power 0.9).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.clip.text_encoding import TextEncoder
from ovss_ros.core.methods.deop.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ovss_ros.core.methods.deop.deop import Deop, severed_features
from ovss_ros.core.methods.deop.heads import DeopModules
from ovss_ros.core.methods.deop.proposal_segmentation import tokens_before_last_block
from ovss_ros.core.methods.deop.proposals import (
    Proposals,
    cluster_proposals,
    proposal_losses,
    superpixel_proposals,
)
from ovss_ros.core.vocabulary import ClassEntry
from ovss_ros.evaluation.dataset_readers import IGNORE
from ovss_ros.evaluation.evaluation_loop import evaluate
from ovss_ros.training.deop_data import CropDataset, TrainingData, collate
from ovss_ros.training.training_config import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    TrainingConfig,
    json_safe,
)

logger = logging.getLogger(__name__)


def create_modules(clip: LoadedClip, config: TrainingConfig) -> DeopModules:
    """Fresh modules for ``clip`` as ``config`` asks (seeded by the caller)."""
    visual = clip.model.visual
    head = None
    if config.proposal_source == "learned":
        head = {
            "width": int(visual.conv1.out_channels),
            "queries": config.head_queries,
            "dim": config.head_dim,
            "layers": config.head_layers,
            "heads": config.decoder_heads,
            "cells": config.mask_cells,
        }
    prompt = None
    if config.prompt_length:
        prompt = {
            "width": int(clip.model.token_embedding.weight.shape[1]),
            "length": config.prompt_length,
        }
    return DeopModules.create(
        int(visual.output_dim),
        decoder={
            "heads": config.decoder_heads,
            "layers": config.decoder_layers,
            "feedforward": config.decoder_feedforward,
            "dropout": config.decoder_dropout,
        },
        void=True,
        prompt=prompt,
        proposal_head=head,
    )


def focal_bce(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DeOP's ``bce_loss_ignore``: focal BCE on probabilities, alpha 0.25, gamma 2, mean."""
    p_t = probs * targets + (1 - targets) * (1 - probs)
    alpha = targets * 0.25 + (1 - targets) * 0.75
    return (-alpha * (1 - p_t) ** 2 * torch.log(p_t.clamp(1e-4, 1 - 1e-4))).mean()


def class_dice(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DeOP's ``dice_loss_ignore``: Dice over the class channels (the last, "no object",
    excluded), each image flattened over channels and pixels, mean over images."""
    p, t = probs[:, :-1].flatten(1), targets[:, :-1].flatten(1)
    return (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)).mean()


class DeopTrainer:
    """Holds CLIP (frozen), the modules, the optimiser and the training vocabulary."""

    def __init__(
        self, clip: LoadedClip, data: TrainingData, config: TrainingConfig, modules: DeopModules
    ) -> None:
        config.validate()
        self.clip, self.data, self.config = clip, data, config
        self.modules = modules.to(clip.device)
        self.modules.requires_grad_(True).train()
        self.seen_entries = [ClassEntry.parse(data.classes[i]) for i in data.seen]
        texts, owner = [], []
        for index, entry in enumerate(self.seen_entries):
            texts += entry.synonyms
            owner += [index] * len(entry.synonyms)
        self.texts = texts
        self.owner = torch.tensor(owner, device=clip.device)
        self.text = TextEncoder(clip.model, clip.tokenizer, config.templates)
        device = clip.device
        self._mean = torch.tensor(clip.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(clip.std, device=device).view(1, 3, 1, 1)
        prompt_params = [] if modules.prompt is None else list(modules.prompt.parameters())
        prompt_ids = {id(p) for p in prompt_params}
        other = [p for p in modules.parameters() if id(p) not in prompt_ids]
        groups = [{"params": other, "lr": config.lr}]
        if prompt_params:
            groups.append({"params": prompt_params, "lr": config.prompt_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.base_lrs = [group["lr"] for group in groups]

    def text_queries(self) -> torch.Tensor:
        """Seen-class synonym embeddings (Q, D) with the void embedding last."""
        modules = self.modules
        if modules.prompt is not None:
            words = modules.prompt.encode(self.clip.model, self.clip.tokenizer, self.texts)
        else:
            words = self.text.embeddings(self.texts).to(self.clip.device)
        return torch.cat([words.float(), modules.void_embedding()])

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(images).to(self.clip.device).permute(0, 3, 1, 2).float() / 255
        return ((pixels - self._mean) / self._std).to(self.clip.dtype)

    def proposals(
        self, images: np.ndarray, patches: torch.Tensor, labels: torch.Tensor
    ) -> tuple[Proposals, dict[str, torch.Tensor]]:
        config, cells = self.config, self.config.mask_cells
        h, w = patches.shape[1:3]
        if config.proposal_source == "superpixels":
            grid = (h * cells, w * cells)
            return superpixel_proposals(
                list(images), grid, config.proposals, device=labels.device
            ), {}
        if config.proposal_source == "clusters":
            return cluster_proposals(patches, config.proposals, cells), {}
        mask_logits, object_logits = self.modules.proposal_head(patches)
        losses = proposal_losses(mask_logits, object_logits, labels)
        masks = mask_logits.detach().sigmoid()
        valid = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
        return Proposals(masks, valid), losses

    def losses(self, images: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
        """All weighted losses of one batch (crops uint8 (B, S, S, 3), labels (B, S, S))."""
        config, visual = self.config, self.clip.model.visual
        pixels = self.normalise(images)
        with torch.no_grad():
            tokens, grid = tokens_before_last_block(visual, pixels)
        patches = tokens[:, 1:].reshape(len(images), *grid, -1)
        mask_grid = (grid[0] * config.mask_cells, grid[1] * config.mask_cells)
        targets = torch.from_numpy(labels).to(self.clip.device).long()
        targets = F.interpolate(targets[:, None].float(), size=mask_grid, mode="nearest")[:, 0]
        targets = targets.long()
        proposals, losses = self.proposals(images, patches, targets)
        with torch.no_grad():
            features = severed_features(
                visual, tokens, grid, proposals, config.mask_cells, config.severance_residual
            )
        patch_masks = proposals.on_patches(config.mask_cells)
        embeddings = self.modules.decoder(features, patch_masks, proposals.valid)
        probs = torch.softmax(config.logit_scale * embeddings @ self.text_queries().T, dim=-1)
        classes = len(self.seen_entries)
        per_class = probs.new_zeros((*probs.shape[:2], classes))
        owner = self.owner.view(1, 1, -1).expand(*probs.shape[:2], -1)
        per_class = per_class.scatter_reduce(2, owner, probs[..., :-1], "amax", include_self=True)
        per_label = torch.cat([per_class, probs[..., -1:]], dim=-1)  # + "no object"
        out = torch.einsum("bkc,bkhw->bchw", per_label, proposals.masks.float())
        target = targets.masked_fill(targets == IGNORE, classes)
        if config.loss == "ce":
            coverage = proposals.masks.float().sum(dim=1, keepdim=True).clamp(min=1e-6)
            scores = (out / coverage).clamp(min=1e-6)
            losses["ce"] = config.ce_weight * F.nll_loss(torch.log(scores), target)
            return losses
        out = torch.sigmoid(config.output_sharpness * (out - 1))
        one_hot = F.one_hot(target, classes + 1).permute(0, 3, 1, 2).float()
        losses["focal"] = config.ce_weight * focal_bce(out, one_hot)
        losses["dice"] = config.dice_weight * class_dice(out, one_hot)
        return losses

    def step(self, images: np.ndarray, labels: np.ndarray, step: int) -> dict[str, float]:
        """One optimisation step; returns the losses as floats (and their sum as ``loss``)."""
        factor = (1 - step / self.config.steps) ** 0.9
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self.modules.train()
        losses = self.losses(images, labels)
        total = sum(losses.values())
        total_value = float(total.detach())
        if not math.isfinite(total_value):
            raise FloatingPointError(f"loss is {total_value} at step {step}: lower the lr")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return {"loss": total_value, **{k: float(v.detach()) for k, v in losses.items()}}

    def validate(self, progress: bool = False) -> dict[str, float]:
        """mIoU (percent) on all, seen and unseen classes and their harmonic mean, computed by
        the evaluator's confusion matrix as DeOP's evaluator does
        (``ConfusionMatrix.split_summary``), with the DeOP pipeline as it would run deployed."""
        self.modules.eval()
        settings = self.config.inference_settings()
        with torch.no_grad():
            deop = Deop(self.clip, settings, modules=self.modules)
            deop.set_classes(self.data.classes)
            limit = self.config.val_images or None
            result = evaluate(
                deop, self.data.val, self.data.names, False, limit=limit, progress=progress
            )
        self.modules.train()
        return {**result.confusion.split_summary(self.data.unseen), "images": result.images}


def resume_state(trainer: DeopTrainer, state: dict, path: Path) -> tuple[int, dict]:
    """Put a checkpoint's training state into ``trainer`` (optimiser, global RNG): (the step,
    the history). Checked first, so a damaged state is one CheckpointError, not a failure some
    steps later: ``step`` an integer >= 0, ``rng`` the CPU generator's byte state, ``history``
    lists of dicts, the optimiser's groups and per-parameter state of the trainer's shapes."""

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: its training state {what}: it cannot be resumed")

    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise damaged(f"has step {str(step)[:40]!r}, not an integer >= 0")
    rng, expected = state.get("rng"), torch.get_rng_state()
    if (
        not isinstance(rng, torch.Tensor)
        or rng.dtype != expected.dtype
        or rng.shape != (expected.shape)
    ):
        raise damaged(f"has no CPU random generator state of {expected.numel()} bytes")
    history = state.get("history", {"train": [], "validation": []})
    if not isinstance(history, dict) or not all(
        isinstance(history.get(key), list) and all(isinstance(e, dict) for e in history[key])
        for key in ("train", "validation")
    ):
        raise damaged("has no history of train and validation entries")
    optimizer = state.get("optimizer")
    parameters = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    per_parameter = optimizer.get("state") if isinstance(optimizer, dict) else None
    if not isinstance(per_parameter, dict):
        raise damaged("has no optimiser state")
    for index, values in per_parameter.items():
        if not isinstance(index, int) or not 0 <= index < len(parameters):
            raise damaged(f"has optimiser state for a parameter {str(index)[:20]!r} it lacks")
        if not isinstance(values, dict):
            raise damaged(f"has optimiser state {index} of the wrong kind")
        for name in ("exp_avg", "exp_avg_sq"):
            moment = values.get(name)
            if not isinstance(moment, torch.Tensor) or moment.shape != parameters[index].shape:
                raise damaged(
                    f"has optimiser {name} {index} of another shape than its parameter "
                    f"{tuple(parameters[index].shape)}"
                )
    try:
        trainer.optimizer.load_state_dict(optimizer)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise damaged(f"does not fit the optimiser ({error})") from None
    torch.set_rng_state(rng)
    return step, history


def train(
    clip: LoadedClip,
    data: TrainingData,
    config: TrainingConfig,
    output: str | Path,
    resume: bool = False,
    stop_at: int | None = None,
) -> dict:
    """Train, checkpointing to ``output/checkpoint.pt`` every ``checkpoint_every`` steps and at
    the end, validating every ``validate_every`` steps and at the end (``output/metrics.json``).

    ``resume``: continue from ``output/checkpoint.pt`` (same data order, optimiser and RNG
    state); its architecture wins over ``config``'s. ``stop_at``: stop after that step with a
    checkpoint, as an interrupted run would (no final validation). Returns the final summary.
    Raises CheckpointError for an unusable checkpoint, ValueError for a bad config.
    """
    config.validate()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / CHECKPOINT_NAME
    torch.manual_seed(config.seed)
    start, history = 0, {"train": [], "validation": []}
    if resume:
        if not os.path.lexists(path):
            raise CheckpointError(f"nothing to resume: {path} does not exist")
        checkpoint = load_checkpoint(path, clip)
        if not checkpoint.training:
            raise CheckpointError(f"{path} holds no training state (not written by a run?)")
        modules = checkpoint.modules
        trainer = DeopTrainer(clip, data, config, modules)
        state = checkpoint.training
        start, history = resume_state(trainer, state, path)
        if start >= config.steps:
            logger.info("checkpoint is already at step %d of %d", start, config.steps)
    else:
        modules = create_modules(clip, config)
        trainer = DeopTrainer(clip, data, config, modules)
    dataset = CropDataset(
        data,
        config.crop,
        config.seed,
        (config.scale_min, config.scale_max),
        length=config.steps * config.batch_size,
    )
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    sampler = range(start * config.batch_size, end * config.batch_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
    )

    def save(step: int) -> None:
        training = {
            "step": step,
            "optimizer": trainer.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "config": asdict(config),
            "data": data.name,
            "history": history,
        }
        save_checkpoint(path, trainer.modules, clip, asdict(config.inference_settings()), training)
        (output / METRICS_NAME).write_text(
            json.dumps(json_safe(history), indent=1, allow_nan=False)
        )

    last: dict[str, float] = {}
    window: list[dict[str, float]] = []
    bar = tqdm(
        total=config.steps, initial=start, desc="deop", unit="step", disable=not config.progress
    )
    for step, (images, labels) in enumerate(loader, start=start):
        last = trainer.step(images, labels, step)
        window.append(last)
        bar.set_postfix(loss=f"{last['loss']:.4f}")
        bar.update(1)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            history["train"].append({"step": done, "steps": len(window), **means})
            window = []
        if config.validate_every and done % config.validate_every == 0 and done < config.steps:
            history["validation"].append({"step": done, **trainer.validate()})
            logger.info("step %d: %s", done, history["validation"][-1])
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            save(done)
    bar.close()
    if end < config.steps:
        save(end)
        return {"step": end, "last": last, "validation": None}
    final_step = max(start, config.steps)
    if not history["validation"] or history["validation"][-1]["step"] != final_step:
        history["validation"].append({"step": final_step, **trainer.validate(config.progress)})
    save(final_step)
    return {"step": final_step, "last": last, "validation": history["validation"][-1]}
