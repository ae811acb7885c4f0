"""``method: twostream`` on the DeOP release's model file: the two-stream baseline as released,
on the release's MaskFormer proposals.

``ZeroShotMaskFormer`` with ``CLIP_ENSEMBLE: True`` (``mask_former/zero_shot_mask_former_model.py``
``semantic_inference``; ``clip_adapter/adapter.py`` ``MaskFormerClipAdapter``, ``utils.py``):

1. the proposal network's 100 masks (sigmoid at the input size) and its class probabilities:
   ``softmax(100 * cos(class_embed(query), texts + "no object"))`` without the void column;
2. each mask > 0.5 gives a box crop of the resized frame, the rest filled with CLIP's mean
   colour, resized to CLIP's input (bicubic), through CLIP: ``100 * cos`` with the same texts,
   softmax over the classes (void dropped before it); proposals with an empty mask keep 1;
3. the geometric ensemble (:func:`~ovss_ros.core.methods.deop.maskformer.clip_ensemble`,
   weight 0.8), a class seen where ``twostream.seen_classes`` names it (the release's
   ``trainable_flag`` of the test data set: COCO-Stuff's 156 seen classes, VOC's 15; ovss-eval
   gives these), every other class unseen (the release's rule for a data set without
   ``trainable_flag``, which is a robot's vocabulary unless told);
4. the release's semantic inference (:class:`~.published.ReleaseFrames`).

Departure: the release classifies with the *proposal model's* learned prompt and "no object"
embedding; its DeOP file holds DeOP's, which both streams use here (the proposal model's file is
not released). The input is DeOP's test size (short side 512, ``deop_verifycoco.sh``), so that
both run on the same proposals; the release's two-stream configuration
(``zero_shot_maskformer_R101c_bs32_60k.yaml``) tests at its base's ``MIN_SIZE_TEST`` 640.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.methods.deop.heads import DeopModules
from ovss_ros.core.methods.deop.maskformer import CLIP_ENSEMBLE_WEIGHT, clip_ensemble
from ovss_ros.core.methods.deop.proposal_segmentation import VOID, Frames
from ovss_ros.core.methods.deop.published import MIN_SIZE_TEST, ReleaseFrames
from ovss_ros.core.methods.deop.run_config import TwoStreamConfig
from ovss_ros.core.methods.deop.twostream import TwoStream
from ovss_ros.core.vocabulary import name_key

# INPUT.MIN_SIZE_TEST of the release's two-stream (proposal model) configuration: its base,
# configs/coco-stuff-164k-171/Base-COCOStuff164K-171.yaml (not used here: see the module note)
TWO_STREAM_MIN_SIZE_TEST = 640


class PublishedTwoStream(ReleaseFrames, TwoStream):
    """The two-stream baseline on the release's proposal network (``deop.checkpoint``).

    ``PublishedTwoStream(clip, settings=None, checkpoint=path)`` or ``released=``; the errors of
    :class:`~ovss_ros.core.methods.deop.published.PublishedDeop`.
    """

    def describe(self) -> str:
        arch = self.released.proposals.arch
        return (
            f"two-stream as released on {self.released.source}: MaskFormer proposals (ResNet-"
            f"{arch.depth}, {arch.queries} queries), one CLIP forward per mask crop, geometric "
            f"ensemble with the proposals' classes (weight {CLIP_ENSEMBLE_WEIGHT}; "
            f"{len(self.settings.seen_classes)} seen class names, the others unseen); input short "
            f"side {MIN_SIZE_TEST} (DeOP's; the release's two-stream configuration tests at "
            f"{TWO_STREAM_MIN_SIZE_TEST})"
        )

    def _check(self, settings: TwoStreamConfig, modules: DeopModules | None) -> None:
        super()._check(self.check_release(settings), modules)
        width, text = self.released.proposals.arch.embedding_dim, self.clip.model.visual.output_dim
        if width != text:
            raise ValueError(
                f"the release's proposal classifier is {width} wide, this CLIP's text space "
                f"{text}: set model ViT-B-16 and pretrained openai"
            )

    def seen_rows(self) -> torch.Tensor:
        """(text rows,) bool: whether each class text row (synonyms; background words last)
        belongs to a class ``seen_classes`` names (compared as vocabulary names are,
        ``name_key``); the ensemble's per-class ``trainable_flag``."""
        seen = {name_key(name) for name in self.settings.seen_classes}
        labels = [name_key(entry.name) in seen for entry in self.classes] + [False]
        owner = self._owner[self._owner != VOID]
        return torch.tensor(labels, dtype=torch.bool, device=owner.device)[owner]

    def scores(self, frames: Frames) -> torch.Tensor:
        keep = self._owner != VOID
        texts, void = self._queries[keep], self._queries[~keep]
        rows = torch.cat([texts, void])
        unit = F.normalize(frames.query_embeddings.float(), dim=-1)
        mask_cls = torch.softmax(self.settings.logit_scale * unit @ rows.T, dim=-1)[..., :-1]
        probs = torch.zeros((*mask_cls.shape[:2], len(self._owner)), device=mask_cls.device)
        step = self.settings.crop_batch
        for index, resized in enumerate(frames.resized):
            rgb = resized.round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
            masks = frames.proposals.masks[index]
            embeddings, valid = [], torch.zeros(masks.shape[0], dtype=torch.bool)
            for first in range(0, masks.shape[0], step):  # a batch of crops at a time
                every = torch.ones(min(step, masks.shape[0] - first), dtype=torch.bool)
                crops, slots = self.crops(
                    np.ascontiguousarray(rgb), masks[first : first + step], every
                )
                if slots:
                    embeddings.append(self.clip.model.encode_image(crops).float())
                    valid[[first + slot for slot in slots]] = True
            clip_logits = (
                self.settings.logit_scale * F.normalize(torch.cat(embeddings), dim=-1) @ rows.T
                if embeddings
                else rows.new_zeros((0, rows.shape[0]))
            )
            ensemble = clip_ensemble(
                mask_cls[index], clip_logits, valid.to(mask_cls.device), self.seen_rows()
            )
            probs[index][:, keep] = ensemble
        return self.semantic(probs, frames)
