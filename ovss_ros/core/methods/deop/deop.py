"""DeOP: decoupled one-pass classification of mask proposals (Han et al., ICCV 2023).

Two-stream methods classify ~100 mask proposals by passing ~100 masked crops through CLIP. DeOP
passes the frame through CLIP once and classifies every proposal from the dense features:

1. CLIP blocks 1..L-1 run unchanged (:func:`tokens_before_last_block`);
2. *patch severance* in the last block (:func:`severed_last_block`): the tokens do not mix (the
   attention is the identity), each token's value is weighted by the proposal masks covering it
   (the sum over proposals of their share of that patch), and the residual is kept at 1.0 by
   default (``deop.severance_residual``); the FFN is kept. As released:
   ``multi_head_attention_forward_vit_softmax_noattn`` (the sigmoid masks, summed over
   proposals, times each token's value) inside ``ResidualAttentionBlockVitPosition``, the
   learned-position block the released scripts run, whose residual scaling is commented out
   (``third_party/CLIP/clip/model.py`` of CongHan0808/DeOP; the plain
   ``ResidualAttentionBlockVit`` scales layer 11's residual by 0.2). Then ln_post, projection,
   L2 norm;
3. each proposal's embedding: the CAL decoder's heat-map-weighted pool of those dense features
   (:class:`~ovss_ros.core.methods.deop.heads.AnchorDecoder`, trained), or without a checkpoint
   the plain mask-weighted mean of them;
4. softmax over the text embeddings (templates, or the learned prompt context) and DeOP's "no
   object", then MaskFormer's semantic inference (``proposal_segmentation``).

``method: deop`` needs a checkpoint (``EngineConfig`` refuses it without one). The same
pipeline without one, superpixel or cluster proposals and mean pooling, is ovss_ros's own
training-free method ``superpixel_clip`` (:class:`SuperpixelClip`; residual 0.2 by default): on
SLIC superpixels, a partition, every patch's weight is 1, so its severed features do not depend
on the proposals. Deliberate departures from the release, also in the module docs they concern:
CLIP stays frozen (the release also learns positional embeddings for blocks 1-5 when training
DeOP); the decoder's queries come from the proposals (no MaskFormer slots).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.methods.deop.heads import DeopModules, mean_pool
from ovss_ros.core.methods.deop.proposal_segmentation import (
    Frames,
    ProposalSegmenter,
    tokens_before_last_block,
)
from ovss_ros.core.methods.deop.proposals import Proposals
from ovss_ros.core.methods.deop.run_config import DeopConfig, SuperpixelClipConfig
from ovss_ros.core.methods.deop.settings import SEVERANCE_RESIDUAL

logger = logging.getLogger(__name__)


def token_weights(patch_masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Severance value weights (N, 1 + h*w): per patch the sum over proposals of their share.

    ``patch_masks`` (N, K, h, w) in [0, 1]; padding proposals (``valid`` False) count nothing.
    The class token's weight is the number of proposals (the release prepends a column of ones
    per proposal); it never reaches a patch, since the tokens do not mix.
    """
    masks = patch_masks * valid[:, :, None, None]
    per_patch = masks.sum(dim=1).flatten(1)
    return torch.cat([valid.sum(dim=1, keepdim=True).to(per_patch.dtype), per_patch], dim=1)


def severed_last_block(
    block: torch.nn.Module,
    x: torch.Tensor,
    weights: torch.Tensor,
    residual: float = SEVERANCE_RESIDUAL,
) -> torch.Tensor:
    """The last residual block with patch severance: (N, L, C) -> (N, L, C).

    ``x' = residual * x + out_proj(w * v)``, ``x' += mlp(ln_2(x'))`` where ``v`` is the value
    projection of ``ln_1(x)`` and ``w`` (N, L) the token weights of :func:`token_weights`.
    Identity attention: token i's output depends on token i alone.
    """
    attn = block.attn
    width = x.shape[-1]
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
    out = block.ls_1(attn.out_proj(v * weights[..., None].to(v.dtype)))
    x = residual * x + out
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def severed_features(
    visual: torch.nn.Module,
    tokens: torch.Tensor,
    grid: tuple[int, int],
    proposals: Proposals,
    cells: int,
    residual: float = SEVERANCE_RESIDUAL,
) -> torch.Tensor:
    """Dense features (N, h, w, D), normalised, in text space: severed block, ln_post, proj."""
    weights = token_weights(proposals.on_patches(cells), proposals.valid)
    x = severed_last_block(visual.transformer.resblocks[-1], tokens, weights, residual)
    x = visual.ln_post(x[:, 1:]) @ visual.proj
    return F.normalize(x.float(), dim=-1).reshape(x.shape[0], *grid, -1)


class Deop(ProposalSegmenter):
    """DeOP behind the ``Segmenter`` surface (``set_classes``, ``segment``, ``segment_many``,
    ``reconfigure``), built on an already loaded CLIP.

    ``Deop(clip, settings=None, checkpoint=None)``: ``checkpoint`` is a file written by
    ``ovss-train-deop`` (CheckpointError when missing, corrupt or made for another CLIP);
    ``settings`` default to the checkpoint's, else :class:`DeopConfig` defaults. Without a
    checkpoint or ``modules`` it runs training-free (what :class:`SuperpixelClip` is) and warns.
    """

    settings_type = DeopConfig
    name = "deop"

    def __init__(
        self,
        clip: LoadedClip,
        settings: DeopConfig | None = None,
        checkpoint: str | None = None,
        modules: DeopModules | None = None,
    ) -> None:
        super().__init__(clip, settings, checkpoint, modules)
        self._announce()

    def _announce(self) -> None:
        """Log what runs: the trained method, or a warning without trained modules."""
        if self.modules is None:
            logger.warning(
                "DeOP without a checkpoint: training-free %s proposals and plain mean pooling "
                "over each proposal's mask (no CAL decoder, no learned prompt), which is "
                "method superpixel_clip, not DeOP. Set deop.checkpoint to a file from "
                "ovss-train-deop for the trained method.",
                self.proposal_source(),
            )
        else:
            source = self.checkpoint.path if self.checkpoint else "memory"
            logger.info(
                "DeOP with trained modules from %s: %s pooling, %s proposals",
                source,
                self.pooling(),
                self.proposal_source(),
            )
            saved = self.checkpoint.settings if self.checkpoint else {}
            trained = saved.get("severance_residual")
            current = self.settings.severance_residual
            if isinstance(trained, int | float) and trained != current:
                # Checkpoints made before 1.0 became the default were trained at 0.2.
                logger.warning(
                    "DeOP checkpoint %s was trained with severance_residual %g but "
                    "deop.severance_residual is %g: set it to %g for the features its heads "
                    "were trained on",
                    source,
                    trained,
                    current,
                    trained,
                )

    def pooling(self, settings: DeopConfig | None = None) -> str:
        """What ``auto`` resolves to: the CAL decoder when one is loaded, else mean pooling."""
        pooling = (settings or self.settings).pooling
        if pooling != "auto":
            return pooling
        has_decoder = self.modules is not None and self.modules.decoder is not None
        return "cal" if has_decoder else "mean"

    def _check(self, settings: DeopConfig, modules: DeopModules | None) -> None:
        super()._check(settings, modules)
        if settings.pooling == "cal" and (modules is None or modules.decoder is None):
            raise ValueError(
                "deop.pooling cal needs a DeOP checkpoint with a CAL decoder: set "
                "deop.checkpoint, or use deop.pooling mean"
            )

    def needs_tokens(self) -> bool:
        return True  # the severed last block needs them anyway

    def encode(self, frames: Frames) -> torch.Tensor:
        """Severed dense features (N, h, w, D) for the batch's proposals."""
        return severed_features(
            self.clip.model.visual,
            frames.tokens,
            frames.grid,
            frames.proposals,
            self.settings.mask_cells,
            self.settings.severance_residual,
        )

    def embed(self, frames: Frames) -> torch.Tensor:
        features = self.encode(frames)
        patch_masks = frames.proposals.on_patches(self.settings.mask_cells)
        if self.pooling() == "cal":
            return self.modules.decoder(features, patch_masks, frames.proposals.valid)
        return mean_pool(features, patch_masks)


class SuperpixelClip(Deop):
    """``method: superpixel_clip``, ovss_ros's training-free method: DeOP's pipeline without a
    checkpoint. Superpixel (SLIC) or cluster (k-means) proposals, the value-only severed last
    block (:func:`severed_features`, residual ``superpixel_clip.severance_residual``, 0.2 by
    default), each proposal's mask-weighted mean of those features, softmax over the text
    embeddings, MaskFormer's semantic inference. Not DeOP: no proposal network, no CAL decoder.

    ``SuperpixelClip(clip, settings=None)`` (default :class:`SuperpixelClipConfig`); ValueError
    for settings that need a checkpoint (``proposal_source`` learned, ``pooling`` cal).
    """

    settings_type = SuperpixelClipConfig
    name = "superpixel_clip"

    def __init__(self, clip: LoadedClip, settings: DeopConfig | None = None) -> None:
        super().__init__(clip, settings)

    def _announce(self) -> None:
        logger.info(
            "superpixel_clip (training-free): %s proposals, severed last block (residual %g), "
            "mean pooling",
            self.proposal_source(),
            self.settings.severance_residual,
        )


__all__ = [
    "Deop",
    "SuperpixelClip",
    "SuperpixelClipConfig",
    "DeopConfig",
    "severed_features",
    "severed_last_block",
    "token_weights",
    "tokens_before_last_block",
]
