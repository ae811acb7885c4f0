"""Stage ``deop``: published DeOP trained end to end with its proposal network frozen.

The release's step 3 (``scripts/deop_train.sh``: ``ZeroShotClipfeatUpsample_addnorm_vit16Query2D_
maskvit``, ``..._proposalmask_featupsample_img512.yaml``, CongHan0808/DeOP): trained are the
learned positional embeddings (CLIP's input and blocks 1-5, ``LEARN_POSITION``,
``POSITION_LAYERS [1,2,3,4,5]``), the CAL decoder (1 layer, slot queries tied to the proposal
network's queries), the "no object" embedding and the prompt context (``END2ENDTRAIN True``,
initialised from the stage-1 prompt file, ``PROMPT_CHECKPOINT``); CLIP's weights and the
proposal network stay frozen. The forward is :func:`~ovss_ros.core.methods.deop.released.
released_scores`' (the severed last block with residual 1.0); the loss is the release's
``loss_labels_bce``: ``p = sum_q sigmoid(mask_q) softmax(logits_q)`` at the label resolution
(masks upsampled bilinearly) over the seen classes and "no object", ``sigmoid(3p - 3)``, focal
BCE (x 2.0) + Dice over the seen classes (x 0.8), ignored pixels counted as "no object".
AdamW 2e-4, weight decay 1e-4 (none on norms and embeddings), poly, full-model clipping 0.01,
batch 16, 60k iterations, short side in {256..768}, crop 640 cut to 512, SSD colour
augmentation. Blocks 1-5 get positions only where CLIP has them before its last block (a ViT
with fewer blocks gets fewer).

Output: ``<output>/model_final.pth`` in the release's layout (proposal network, CLIP with the
learned positions, decoder, slot positions, "no object", prompt), which ``method: deop`` loads
as the published system (:func:`~ovss_ros.core.methods.deop.released_checkpoint.
load_released_deop`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.methods.deop.heads import AnchorDecoder
from ovss_ros.core.methods.deop.maskformer import ProposalNetwork, class_logits, prepare_images
from ovss_ros.core.methods.deop.prompt_context import PromptContext
from ovss_ros.core.methods.deop.release_writer import (
    clip_tensors,
    decoder_tensors,
    position_tensors,
    prompt_tensor,
    proposal_tensors,
    void_tensor,
    write_detectron2,
)
from ovss_ros.core.methods.deop.released import (
    POSITION_LAYERS,
    LearnedPositions,
    decoder_masks,
    released_dense_features,
    released_scores,
)
from ovss_ros.core.methods.deop.released_checkpoint import DECODER_HEADS
from ovss_ros.training.deop_data import TrainingData, collate
from ovss_ros.training.deop_training import class_dice, focal_bce
from ovss_ros.training.proposal_training import class_names, to_images
from ovss_ros.training.released_data import SemanticCrops
from ovss_ros.training.stage_loop import (
    StageConfig,
    fingerprint,
    param_groups,
    poly_factor,
    segmentation_miou,
)

OUTPUT_NAME = "model_final.pth"
OUTPUT_SIG = 3.0  # INPUT.OUTPUT_SIG
CE_WEIGHT = 2.0  # DECODER_CE_WEIGHT of deop_train.sh
DICE_WEIGHT = 0.8  # DECODER_DICE_WEIGHT
DECODER_FEEDFORWARD = 1024  # TransformerDecoderLinear's dim_feedforward


class DeopParts(nn.Module):
    """What stage ``deop`` trains."""

    def __init__(self, clip: LoadedClip, slots: int, prompt_length: int, feedforward: int) -> None:
        super().__init__()
        visual = clip.model.visual
        width = int(visual.class_embedding.shape[-1])
        last = len(visual.transformer.resblocks) - 1
        self.positions = LearnedPositions(width, [i for i in POSITION_LAYERS if i < last])
        dim = int(visual.output_dim)
        self.decoder = AnchorDecoder(
            dim, DECODER_HEADS, layers=1, feedforward=feedforward, slots=slots
        )
        self.void = nn.Parameter(torch.randn(1, dim) * dim**-0.5)
        text_width = int(clip.model.token_embedding.weight.shape[1])
        self.prompt = PromptContext(text_width, prompt_length)


class DeopStage:
    """Stage ``deop`` for :func:`~ovss_ros.training.stage_loop.run_stage`. ``proposals``: the
    trained proposal network (frozen here); ``prompt``: the stage-1 context (L, width) or None
    (a fresh context, not as released)."""

    name = "deop"
    schedule = staticmethod(poly_factor)

    def __init__(
        self,
        clip: LoadedClip,
        data: TrainingData,
        config: StageConfig,
        proposals: ProposalNetwork,
        prompt: torch.Tensor | None = None,
        feedforward: int = DECODER_FEEDFORWARD,
    ) -> None:
        self.clip, self.data, self.config = clip, data, config.validate()
        output_dim = int(clip.model.visual.output_dim)
        if proposals.arch.embedding_dim != output_dim:
            raise ValueError(
                f"the proposal network classifies into {proposals.arch.embedding_dim}-wide "
                f"embeddings, this CLIP's are {output_dim} wide: train it on this CLIP"
            )
        clip.model.requires_grad_(False)
        self.proposals = proposals.to(clip.device).eval().requires_grad_(False)
        length = config.prompt_length if prompt is None else prompt.shape[0]
        self.parts = DeopParts(clip, proposals.arch.queries, length, feedforward).to(clip.device)
        if prompt is not None:
            self.parts.prompt.context.data = prompt.float().to(clip.device)
        self.seen_names = class_names(data, data.seen)
        groups = param_groups(
            {"decoder": self.parts.decoder, "positions": self.parts.positions},
            config.lr,
            config.weight_decay,
        )
        groups.append(
            {
                "params": [self.parts.void, self.parts.prompt.context],
                "lr": config.lr,
                "weight_decay": config.weight_decay,
            }
        )
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    def trainable(self) -> nn.Module:
        return self.parts

    def frozen_inputs(self) -> dict[str, str]:
        """Fingerprints (``stage_loop.fingerprint``) of the frozen CLIP and the frozen proposal
        network (``--proposal-network``); the prompt only starts the trained one."""
        if not hasattr(self, "_inputs"):
            self._inputs = {
                "CLIP": fingerprint(self.clip.model.state_dict()),
                "proposal network (--proposal-network)": fingerprint(self.proposals.state_dict()),
            }
        return self._inputs

    def dataset(self, length: int) -> SemanticCrops:
        c = self.config
        return SemanticCrops(
            self.data, c.short_sides, c.crop, c.pad, c.seed, c.color_aug, length=length
        )

    def collate(self, batch: list) -> tuple[np.ndarray, np.ndarray]:
        return collate(batch)

    def text(self, names: list[str]) -> torch.Tensor:
        return self.parts.prompt.encode(self.clip.model, self.clip.tokenizer, names)

    def losses(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
        rgb, labels = batch
        images, _ = prepare_images(to_images(rgb, self.clip.device))
        with torch.no_grad():
            mask_logits = self.proposals(images).mask_logits
        parts = self.parts
        features = released_dense_features(
            self.clip.model.visual, images, mask_logits, parts.positions
        )
        masks = decoder_masks(mask_logits, tuple(features.shape[1:3]))
        valid = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
        embeddings = parts.decoder(features, masks, valid)
        logits = class_logits(embeddings, self.text(self.seen_names), parts.void)
        targets = torch.as_tensor(labels).long().to(self.clip.device)
        up = F.interpolate(
            mask_logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False
        )
        out = torch.einsum("bqhw,bqc->bchw", up.sigmoid(), logits.softmax(-1))
        out = torch.sigmoid(OUTPUT_SIG * out - OUTPUT_SIG)
        classes = logits.shape[-1]
        target = targets.masked_fill(targets == 255, classes - 1)
        one_hot = F.one_hot(target, classes).permute(0, 3, 1, 2).float()
        return {
            "focal": CE_WEIGHT * focal_bce(out, one_hot),
            "dice": DICE_WEIGHT * class_dice(out, one_hot),
        }

    def scores(self, rgb: np.ndarray, text: torch.Tensor) -> torch.Tensor:
        """Published DeOP's class scores (K, H, W) of one uint8 frame."""
        parts = self.parts
        frame = to_images(rgb[None], self.clip.device)
        return released_scores(
            self.proposals,
            self.clip.model.visual,
            parts.positions,
            parts.decoder,
            text,
            parts.void,
            frame,
        )[0]

    @torch.no_grad()
    def validate(self, progress: bool) -> dict[str, float]:
        self.parts.eval()
        text = self.text(class_names(self.data))
        result = segmentation_miou(
            self.data,
            lambda rgb: self.scores(rgb, text),
            self.config.val_size,
            self.config.val_images,
            progress,
        )
        self.parts.train()
        return result

    def write_output(self, output: Path, step: int) -> Path:
        parts = self.parts
        state = (
            proposal_tensors(self.proposals)
            | clip_tensors(self.clip.model)
            | position_tensors(parts.positions)
            | decoder_tensors(parts.decoder)
            | void_tensor(parts.void)
            | prompt_tensor(parts.prompt.context)
        )
        return write_detectron2(output / OUTPUT_NAME, state, step)
