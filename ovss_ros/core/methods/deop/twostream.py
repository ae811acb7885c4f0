"""The two-stream baseline DeOP replaces: every proposal's masked crop through CLIP.

Proposal classification as in ZegFormer / SimBaseline (``MaskFormerClipAdapter`` in
CongHan0808/DeOP, ``mask_former/modeling/clip_adapter/adapter.py`` and ``utils.py``): each
proposal's mask, thresholded at 0.5 at the input resolution, gives a bounding box; the crop keeps
the pixels inside the mask and fills the rest with CLIP's mean colour, is resized to CLIP's input
size (bicubic) and goes through ``encode_image``; the normalised image embedding is classified
against the same text queries as DeOP, and the same semantic inference makes the labels. So one
CLIP image forward per proposal (batched by ``crop_batch``) instead of DeOP's single pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.frame_budget import check_crop_batch
from ovss_ros.core.methods.deop.proposal_segmentation import (
    Frames,
    ProposalSegmenter,
)
from ovss_ros.core.methods.deop.run_config import TwoStreamConfig

MASK_THRESHOLD = 0.5  # the adapter's mask_thr


def crop_dimensions(clip: LoadedClip) -> tuple[int, int]:
    """(tokens of one crop at CLIP's input size, the MLP's hidden width) of ``clip``."""
    visual = clip.model.visual
    size = visual.image_size
    height, width = (size, size) if isinstance(size, int) else size
    tokens = (height // clip.patch_size) * (width // clip.patch_size) + 1
    fc = getattr(getattr(visual.transformer.resblocks[0], "mlp", None), "c_fc", None)
    hidden = fc.out_features if isinstance(fc, torch.nn.Linear) else 4 * visual.conv1.out_channels
    return tokens, hidden


def check_crop_cost(clip: LoadedClip, crops: int, setting: str = "twostream.crop_batch") -> None:
    """FrameBudgetError naming ``setting`` when one forward of ``clip`` over ``crops`` crops
    exceeds the per-frame budget (``frame_budget.check_crop_batch`` with this CLIP's cost)."""
    tokens, hidden = crop_dimensions(clip)
    check_crop_batch(crops, tokens, hidden, setting=setting)


class TwoStream(ProposalSegmenter):
    """Two-stream proposal classification behind the ``Segmenter`` surface.

    ``TwoStream(clip, settings=None, checkpoint=None)``: a DeOP checkpoint is optional; from it
    the learned proposal head, prompt context and "no object" embedding are used (its CAL
    decoder is not: that is DeOP's part).
    """

    settings_type = TwoStreamConfig
    name = "twostream"

    def embed(self, frames: Frames) -> torch.Tensor:
        proposals = frames.proposals
        out = proposals.masks.new_zeros(
            (*proposals.valid.shape, int(self.clip.model.visual.output_dim))
        )
        step = self.settings.crop_batch
        for index, rgb in enumerate(frames.images):
            masks, valid = proposals.masks[index], proposals.valid[index]
            for first in range(0, masks.shape[0], step):  # crops made a batch at a time
                crops, slots = self.crops(
                    rgb, masks[first : first + step], valid[first : first + step]
                )
                if not slots:
                    continue
                embeddings = self.clip.model.encode_image(crops)
                slots = [first + slot for slot in slots]
                out[index, slots] = F.normalize(embeddings.float(), dim=-1)
        return out

    def _check(self, settings: TwoStreamConfig, modules) -> None:
        """As ProposalSegmenter's, and the crop batch against this CLIP's per-crop cost."""
        super()._check(settings, modules)
        check_crop_cost(self.clip, settings.crop_batch)

    def crops(
        self, rgb, masks: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, list[int]]:
        """Normalised masked crops (M, 3, S, S) of one image and the proposal index of each.

        Each proposal's mask is upsampled to the image on its own (one H x W map at a time,
        not proposals x H x W)."""
        height, width = rgb.shape[:2]
        image = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1).float() / 255.0
        fill = self._mean[0]
        size = self.clip.model.visual.image_size
        size = size if isinstance(size, tuple | list) else (size, size)
        crops, slots = [], []
        for k in range(masks.shape[0]):
            if not bool(valid[k]):
                continue
            binary = F.interpolate(
                masks[None, k : k + 1].float(), (height, width), mode="bilinear"
            )
            binary = binary[0, 0] > MASK_THRESHOLD
            rows, cols = binary.any(dim=1), binary.any(dim=0)
            if not bool(rows.any()):
                continue  # nothing left after the threshold: the proposal stays unclassified
            top, bottom = int(rows.nonzero()[0]), int(rows.nonzero()[-1]) + 1
            left, right = int(cols.nonzero()[0]), int(cols.nonzero()[-1]) + 1
            keep = binary[top:bottom, left:right].float()
            crop = image[:, top:bottom, left:right] * keep + (1 - keep) * fill
            crop = F.interpolate(crop[None], size=tuple(size), mode="bicubic", align_corners=False)
            crops.append(((crop - self._mean) / self._std).to(self.clip.dtype))
            slots.append(k)
        if not crops:
            return image.new_zeros((0, 3, *size)), []
        return torch.cat(crops), slots
