"""``method: deop`` on the DeOP release's model file: published DeOP as a Segmenter.

The pipeline of :func:`~ovss_ros.core.methods.deop.released.released_scores`, in the proposal
methods' frame flow (vocabulary with synonyms and background words, batches of equal size,
labels and confidence at the frame's size):

1. the frame resized as detectron2's ``ResizeShortestEdge`` at test time: short side 512 (the
   release's ``INPUT.MIN_SIZE_TEST``), long side at most 2560 and ``max_long_side``; bilinear
   with antialiasing (the release: PIL bilinear on uint8);
2. the proposal network on the ImageNet-normalised frame padded to /32: 100 mask logits at 1/4;
3. the same tensor through CLIP with learned positions and the severed last block, the CAL
   decoder with slot queries, ``100 * cos`` against the learned-prompt class embeddings (plus
   background words, plus the "no object" row), softmax;
4. semantic inference on the masks upsampled to the input size (bilinear, then the sigmoid, as
   released), resized to the frame (bilinear) and the argmax: the release's labels; the
   confidence is the best score over the masks' sum resized alike (a probability).

The settings a release fixes are refused when set otherwise (``_check``); the release's input
size replaces ``short_side`` and says so at start-up.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.methods.deop.deop import Deop
from ovss_ros.core.methods.deop.heads import DeopModules
from ovss_ros.core.methods.deop.maskformer import prepare_images
from ovss_ros.core.methods.deop.proposal_segmentation import Frames
from ovss_ros.core.methods.deop.proposals import Proposals
from ovss_ros.core.methods.deop.released import decoder_masks, released_dense_features
from ovss_ros.core.methods.deop.released_checkpoint import (
    ReleasedDeop,
    check_clip_weights,
    load_released_deop,
)
from ovss_ros.core.methods.deop.run_config import DeopConfig
from ovss_ros.core.segmentation import Segmentation

logger = logging.getLogger(__name__)

MIN_SIZE_TEST = 512  # INPUT.MIN_SIZE_TEST of deop_verifycoco.sh / deop_train.sh
MAX_SIZE_TEST = 2560  # INPUT.MAX_SIZE_TEST
DEFAULT_QUERIES = DeopConfig.proposals  # deop.proposals' default: the file's query count


def release_size(height: int, width: int, max_long_side: int) -> tuple[int, int]:
    """(height, width) of detectron2's ``ResizeShortestEdge(512, 2560)`` for a frame, with the
    long side also at most ``max_long_side`` (``get_output_shape``: scale, then round), each at
    least 1 (detectron2 would round a very thin frame's short side to 0)."""
    scale = MIN_SIZE_TEST / min(height, width)
    new_h, new_w = height * scale, width * scale
    longest = min(MAX_SIZE_TEST, max_long_side)
    if max(new_h, new_w) > longest:
        shrink = longest / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)  # a 1 x 10000 frame: 1 x 2048


def load_release(
    path: str | None, clip: LoadedClip, tensors: dict[str, torch.Tensor] | None = None
) -> ReleasedDeop:
    """The release's file, checked against ``clip`` and moved to its device (ValueError);
    ``tensors``: its tensors read already (``released_tensors``)."""
    if not path:
        raise ValueError("the DeOP release's model file is needed (deop.checkpoint)")
    released = load_released_deop(path, tensors)
    check_clip_weights(released, clip.model)
    return released.to(clip.device)


class ReleaseFrames:
    """The frame flow the release's proposal network fixes, for a ProposalSegmenter subclass
    with a ``released`` attribute: detectron2's test resize, ImageNet normalisation, /32 padding,
    the network's masks at the input size, and labels as the argmax of the unnormalised sum."""

    released: ReleasedDeop

    def __init__(
        self,
        clip: LoadedClip,
        settings=None,
        checkpoint: str | None = None,
        released: ReleasedDeop | None = None,
    ) -> None:
        """``checkpoint``: the release's file, or ``released``: one loaded already (its modules
        serve the method: decoder, void, prompt)."""
        self.released = released or load_release(checkpoint, clip)
        super().__init__(clip, settings, modules=self.released.modules)

    def check_release(self, settings):
        """Refuse the settings the release fixes (ValueError); ``settings`` with the file's
        query count as ``proposals`` (read from its shapes: ``deop.proposals`` at its default,
        100, takes it; any other value must equal it)."""
        queries = self.released.proposals.arch.queries
        if settings.proposal_source != "auto":
            raise ValueError(
                "deop.proposal_source must be auto with the DeOP release: its proposals come "
                "from its MaskFormer"
            )
        if settings.proposals not in (queries, DEFAULT_QUERIES):
            raise ValueError(
                f"deop.proposals must be {queries} with the DeOP file "
                f"{self.released.source}: its MaskFormer has {queries} queries and its decoder "
                f"one slot per query (got {settings.proposals}; the default, "
                f"{DEFAULT_QUERIES}, takes the file's count)"
            )
        return replace(settings, proposals=queries)

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        return release_size(height, width, self.settings.max_long_side)

    def needs_tokens(self) -> bool:
        return False  # CLIP runs in the method's own steps

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Upload the uint8 frame and resize it: 0-255 RGB (1, 3, H', W') float32."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device)
        image = image.permute(2, 0, 1).unsqueeze(0).float()
        size = self.network_size(*rgb.shape[:2])
        if size != tuple(image.shape[-2:]):
            image = F.interpolate(
                image, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        return image

    def prepare(self, images: list[np.ndarray]) -> Frames:
        """Resize, normalise and pad; the proposal network's mask logits, query embeddings and,
        at the input size, its soft masks (N, Q, H', W') (the frames keep the resized RGB)."""
        rgb = torch.cat([self.preprocess(image) for image in images])
        return self.prepare_resized(rgb, images)

    def prepare_resized(self, rgb: torch.Tensor, images: list[np.ndarray]) -> Frames:
        """:meth:`prepare` after the resize: ``rgb`` (N, 3, H', W') 0-255 float from
        :meth:`preprocess` of ``images`` (ovss-bench times the two steps apart)."""
        pixels, (height, width) = prepare_images(rgb)
        output = self.released.proposals(pixels)
        grid = (pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch)
        full = F.interpolate(
            output.mask_logits.float(),
            size=pixels.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        masks = full[..., :height, :width].sigmoid()
        valid = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
        return Frames(
            list(images),
            pixels,
            None,
            grid,
            Proposals(masks, valid),
            mask_logits=output.mask_logits,
            query_embeddings=output.class_embeddings,
            resized=rgb,
        )

    def semantic(self, probs: torch.Tensor, frames: Frames) -> torch.Tensor:
        """Query probabilities (N, Q, texts + void) -> the release's semantic inference at the
        input size (N, labels + 1, H', W'): per label ``sum_q p_q(label) mask_q``, and last the
        masks' sum (for the confidence)."""
        masks = frames.proposals.masks.float()
        total = torch.einsum("nkl,nkhw->nlhw", self.label_probabilities(probs).float(), masks)
        return torch.cat([total, masks.sum(dim=1, keepdim=True)], dim=1)

    def postprocess(self, scores: torch.Tensor, size: tuple[int, int]) -> Segmentation:
        return super().postprocess(scores[:-1], size, coverage=scores[-1])


class PublishedDeop(ReleaseFrames, Deop):
    """Published DeOP from the release's model file (``deop.checkpoint``).

    ``PublishedDeop(clip, settings=None, checkpoint=path)`` or ``released=`` an already loaded
    :class:`ReleasedDeop`. Raises ProposalWeightsError (a ValueError) for a file that is not a
    DeOP release or a CLIP other than the file's, ValueError for settings the release fixes.
    """

    def describe(self) -> str:
        """What runs, in words (the start-up log and the node's method line)."""
        arch = self.released.proposals.arch
        return (
            f"DeOP as released from {self.released.source}: MaskFormer proposals (ResNet-"
            f"{arch.depth}, {arch.stem} stem, {arch.queries} queries), learned positions before "
            f"blocks {list(self.released.positions.layers)}, severed last block (residual "
            f"{self.settings.severance_residual:g}), slot-query CAL decoder; input short side "
            f"{MIN_SIZE_TEST} (the release's, not short_side {self.settings.short_side}), "
            "ImageNet normalisation, padded to 32"
        )

    def _announce(self) -> None:
        logger.info("%s", self.describe())

    def _check(self, settings: DeopConfig, modules: DeopModules | None) -> None:
        super()._check(self.check_release(settings), modules)
        if settings.pooling == "mean":
            raise ValueError("deop.pooling must be auto or cal with the DeOP release (its CAL)")
        blocks = len(self.clip.model.visual.transformer.resblocks)
        deepest = max(self.released.positions.layers, default=0)
        if deepest >= blocks - 1:
            raise ValueError(
                f"the release's learned positions reach block {deepest} but this CLIP has "
                f"{blocks} blocks"
            )

    def encode(self, frames: Frames) -> torch.Tensor:
        return released_dense_features(
            self.clip.model.visual,
            frames.pixels,
            frames.mask_logits,
            self.released.positions,
            self.settings.severance_residual,
        )

    def embed(self, frames: Frames) -> torch.Tensor:
        features = self.encode(frames)
        masks = decoder_masks(frames.mask_logits, frames.grid)
        valid = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
        return self.modules.decoder(features, masks, valid)

    def scores(self, frames: Frames) -> torch.Tensor:
        embeddings = self.embed(frames)
        probs = torch.softmax(self.settings.logit_scale * embeddings @ self._queries.T, dim=-1)
        return self.semantic(probs, frames)
