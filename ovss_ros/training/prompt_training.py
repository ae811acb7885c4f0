"""Stage ``prompt``: DeOP's learned prompt context alone, on ground-truth-mask crops.

The release's step 1 (``scripts/train_learn_prompts.sh``: ``ProposalClipClassifier``,
``zero_shot_proposal_classification_learn_prompt_bs32_10k.yaml``; CongHan0808/DeOP
``mask_former/proposal_classification.py``): CLIP frozen, 16 context tokens learned
(``PROMPT_SHAPE (16, 0)``); each sample is one seen class of one training image, cut to the box
of its mask and randomly resized-cropped to CLIP's input (224 for ViT-B/16), normalised with
CLIP's mean and std, the pixels outside the mask set to CLIP's mean *after* normalisation (the
release's ``images * mask + (1 - mask) * pixel_mean``); CLIP's image embedding is classified by
``100 * cos`` against the seen classes' prompt embeddings (no "no object"), cross-entropy. SGD
0.02 (momentum 0.9), weight decay 5e-4, cosine with a constant 0.005 warm-up for 100
iterations, full-model gradient clipping 0.01, batch 32, 16k iterations, at most 32 pairs per
class (:class:`~ovss_ros.training.released_data.MaskCrops`).

Validation (not the release's, which reports crop accuracy): every class region of a validation
image (all classes, unseen included) cut out the same way (box, mean fill, resized to CLIP's
input without a random crop) and classified; the predicted class paints that region; mIoU on all,
seen and unseen classes and their harmonic mean over the labelled pixels.

Output: ``<output>/prompt.pth``, the release's prompt file layout
(``clip_adapter.prompt_learner.prefix_prompt``), which stages ``proposals`` and ``deop`` take
(``--prompt``) as the release's ``PROMPT_CHECKPOINT``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.methods.deop.prompt_context import PromptContext
from ovss_ros.core.methods.deop.release_writer import prompt_tensor, write_detectron2
from ovss_ros.evaluation.confusion_metrics import ConfusionMatrix
from ovss_ros.evaluation.dataset_readers import IGNORE
from ovss_ros.evaluation.evaluation_loop import read_rgb
from ovss_ros.training.deop_data import TrainingData
from ovss_ros.training.proposal_training import class_names, to_images
from ovss_ros.training.released_data import MaskCrops, class_pairs, collate_masks
from ovss_ros.training.stage_loop import StageConfig, cosine_factor, fingerprint

OUTPUT_NAME = "prompt.pth"
LOGIT_SCALE = 100.0  # ClipAdapter.get_sim_logits' temperature


def clip_input_size(clip: LoadedClip) -> int:
    size = getattr(clip.model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)


class PromptStage:
    """Stage ``prompt`` for :func:`~ovss_ros.training.stage_loop.run_stage`."""

    name = "prompt"

    def __init__(self, clip: LoadedClip, data: TrainingData, config: StageConfig) -> None:
        self.clip, self.data, self.config = clip, data, config.validate()
        self.size = clip_input_size(clip)
        if config.crop not in (0, self.size):
            raise ValueError(
                f"stage prompt crops to CLIP's input size {self.size} (the release: 224 for "
                f"ViT-B/16); got crop {config.crop}"
            )
        clip.model.requires_grad_(False)
        width = int(clip.model.token_embedding.weight.shape[1])
        self.prompt = PromptContext(width, config.prompt_length).to(clip.device)
        self.optimizer = torch.optim.SGD(
            self.prompt.parameters(),
            lr=config.lr,
            momentum=0.9,
            weight_decay=config.weight_decay,
        )
        self.seen_names = class_names(data, data.seen)
        self.pairs: list[tuple[int, int]] | None = None
        self._mean = torch.tensor(clip.mean, device=clip.device).view(1, 3, 1, 1)
        self._std = torch.tensor(clip.std, device=clip.device).view(1, 3, 1, 1)

    def schedule(self, step: int, steps: int) -> float:
        return cosine_factor(step, steps, self.config.warmup_steps)

    def trainable(self) -> nn.Module:
        return self.prompt

    def frozen_inputs(self) -> dict[str, str]:
        """The frozen CLIP's fingerprint (``stage_loop.fingerprint``)."""
        if not hasattr(self, "_inputs"):
            self._inputs = {"CLIP": fingerprint(self.clip.model.state_dict())}
        return self._inputs

    def dataset(self, length: int) -> MaskCrops:
        if self.pairs is None:  # reads every training label image once
            c = self.config
            self.pairs = class_pairs(self.data, c.per_class, c.seed, c.progress)
        return MaskCrops(self.data, self.pairs, self.size, self.config.seed, length)

    def collate(self, batch: list) -> tuple:
        return collate_masks(batch)

    def image_embeddings(self, rgb: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        """Normalised CLIP embeddings (B, D) of masked crops (B, S, S, 3) uint8, (B, S, S)."""
        pixels = (to_images(rgb, self.clip.device) / 255 - self._mean) / self._std
        inside = torch.as_tensor(masks, device=self.clip.device).float()[:, None]
        pixels = pixels * inside + (1 - inside) * self._mean  # as released (see docstring)
        with torch.no_grad():
            features = self.clip.model.encode_image(pixels.to(self.clip.dtype))
        return F.normalize(features.float(), dim=-1)

    def losses(self, batch: tuple) -> dict[str, torch.Tensor]:
        rgb, masks, classes = batch
        images = self.image_embeddings(rgb, masks)
        text = self.prompt.encode(self.clip.model, self.clip.tokenizer, self.seen_names)
        logits = LOGIT_SCALE * images @ text.float().T
        target = torch.as_tensor(classes, device=self.clip.device)
        return {"ce": F.cross_entropy(logits, target)}

    def region_crop(self, rgb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ys, xs = np.nonzero(mask)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        size = (self.size, self.size)
        crop = cv2.resize(rgb[box], size, interpolation=cv2.INTER_LINEAR)
        inside = cv2.resize(mask[box].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        return crop, inside.astype(bool)

    @torch.no_grad()
    def validate(self, progress: bool) -> dict[str, float]:
        """Oracle-mask mIoU (module docstring)."""
        data = self.data
        text = self.prompt.encode(self.clip.model, self.clip.tokenizer, class_names(data))
        confusion = ConfusionMatrix(len(data.classes))
        count = len(data.val) if not self.config.val_images else self.config.val_images
        count = min(count, len(data.val))
        for index in tqdm(range(count), desc="validation", disable=not progress, leave=False):
            path, labels = data.val.sample(index)
            rgb = read_rgb(path)
            prediction = np.full(labels.shape, len(data.classes), np.int64)
            for cls in np.unique(labels):
                if cls == IGNORE:
                    continue
                crop, inside = self.region_crop(rgb, labels == cls)
                image = self.image_embeddings(crop[None], inside[None])
                prediction[labels == cls] = int((image @ text.float().T).argmax())
            confusion.update(labels, prediction)
        return {**confusion.split_summary(data.unseen), "images": count}

    def write_output(self, output: Path, step: int) -> Path:
        return write_detectron2(output / OUTPUT_NAME, prompt_tensor(self.prompt.context), step)
