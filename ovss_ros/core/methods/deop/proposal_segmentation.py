"""What DeOP and the two-stream baseline share: proposals in, classes per proposal, labels out.

A frame goes: resize (short side, whole patches) -> class-agnostic proposals (soft masks on the
mask grid) -> a method-specific embedding per proposal (:meth:`ProposalSegmenter.embed`) ->
softmax over the text queries (the vocabulary's synonyms, background words and, with a
checkpoint, DeOP's learned "no object") -> MaskFormer's semantic inference
``scores[c] = sum_k p_k(c) m_k`` -> labels, confidence.

MaskFormer semantic inference as in DeOP (``semantic_inference``: ``softmax(logits)[..., :-1]``,
``einsum("qc,qhw->chw")``), with one addition that does not change the argmax: the scores are
divided by the total mask weight at each pixel, so they are probabilities (a convex combination
of the covering proposals' class probabilities) and ``score_threshold`` means what it means for
the other methods. A class's probability is the max over its synonyms (as in the engine); the
"no object" probability is dropped; a background word beating every class leaves the pixel
unlabeled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.clip.image_resize import resized_size
from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.clip.text_encoding import TextEncoder, check_class_prompts
from ovss_ros.core.frame_budget import POSTPROCESS_ELEMENTS, check_proposal_masks, frame_grid
from ovss_ros.core.methods.dense.forward import interpolate_pos_embed, residual_block
from ovss_ros.core.methods.deop.checkpoint import Checkpoint, load_checkpoint
from ovss_ros.core.methods.deop.heads import DeopModules
from ovss_ros.core.methods.deop.proposals import (
    Proposals,
    cluster_proposals,
    learned_proposals,
    superpixel_proposals,
)
from ovss_ros.core.methods.deop.run_config import ProposalConfig
from ovss_ros.core.segmentation import Segmentation, check_rgb, label_dtype
from ovss_ros.core.vocabulary import ClassEntry, VocabularyError, parse_classes

logger = logging.getLogger(__name__)
VOID = -1  # owner of the "no object" query: it belongs to no label


def tokens_before_last_block(
    visual: torch.nn.Module, pixels: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens (N, 1 + h*w, C) entering the ViT's last block, and the patch grid (h, w).

    The open_clip forward up to the last residual block: patch embedding, class token, the
    positional embedding resized to the grid, ln_pre, blocks 1..L-1.
    """
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(visual, grid).to(x.dtype)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = residual_block(block, x)
    return x, grid


@dataclass
class Frames:
    """One batch of equally sized frames on their way through a pipeline."""

    images: list[np.ndarray]  # the input uint8 RGB frames
    pixels: torch.Tensor  # (N, 3, H', W') normalised, resized
    tokens: torch.Tensor | None  # (N, 1 + h*w, C) before the last block, when computed
    grid: tuple[int, int]  # patch grid (h, w)
    proposals: Proposals | None = None
    # The DeOP release's proposal network (published.py): mask logits (N, Q, H'/4, W'/4), query
    # embeddings (N, Q, E), and the resized frames before normalisation (N, 3, H', W'), 0-255.
    mask_logits: torch.Tensor | None = None
    query_embeddings: torch.Tensor | None = None
    resized: torch.Tensor | None = None


class ProposalSegmenter:
    """Base of the proposal-classification pipelines; subclasses implement :meth:`embed`.

    Same surface as ``ovss_ros.core.Segmenter``: ``set_classes``, ``segment``, ``segment_many``,
    ``reconfigure`` (transactional), the same ``Segmentation`` out. Not thread-safe.
    """

    settings_type: type[ProposalConfig] = ProposalConfig
    name = "proposals"

    def __init__(
        self,
        clip: LoadedClip,
        settings: ProposalConfig | None = None,
        checkpoint: str | None = None,
        modules: DeopModules | None = None,
    ) -> None:
        """``clip``: a ``load_clip`` result. ``checkpoint``: a DeOP checkpoint file (its settings
        become the defaults when ``settings`` is None); ``modules``: trained modules in memory
        instead of a file (training's validation). Raises CheckpointError or ValueError.
        """
        self.clip = clip
        self.checkpoint: Checkpoint | None = None
        self.modules = modules
        if checkpoint:
            self.checkpoint = load_checkpoint(checkpoint, clip)
            self.modules = self.checkpoint.modules
        if settings is None:
            saved = self.checkpoint.settings if self.checkpoint else {}
            known = {f.name for f in fields(self.settings_type)}
            settings = self.settings_type(**{k: v for k, v in saved.items() if k in known})
            if isinstance(settings.background_words, list):
                settings = replace(settings, background_words=tuple(settings.background_words))
        self._check(settings, self.modules)
        self.settings = settings
        self.text = TextEncoder(clip.model, clip.tokenizer, settings.templates)
        self.classes: list[ClassEntry] = []
        self._queries: torch.Tensor | None = None  # (Q, D)
        self._owner: torch.Tensor | None = None  # (Q,) label per query, VOID for no object
        self._prompt_cache: dict[str, torch.Tensor] = {}
        device = clip.device
        self._mean = torch.tensor(clip.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(clip.std, device=device).view(1, 3, 1, 1)

    # --- configuration ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def patch(self) -> int:
        return self.clip.patch_size

    @property
    def uses_void(self) -> bool:
        """Whether the trained "no object" embedding joins the text queries."""
        return self.modules is not None and self.modules.void is not None

    def proposal_source(self, settings: ProposalConfig | None = None) -> str:
        """The source ``auto`` resolves to: learned when a proposal head is loaded."""
        source = (settings or self.settings).proposal_source
        if source != "auto":
            return source
        has_head = self.modules is not None and self.modules.proposal_head is not None
        return "learned" if has_head else "superpixels"

    def _check(self, settings: ProposalConfig, modules: DeopModules | None) -> None:
        """Validate ``settings`` against what is loaded; raise ValueError. Subclasses extend."""
        settings.validate()
        if settings.proposal_source == "learned" and (
            modules is None or modules.proposal_head is None
        ):
            raise ValueError(
                "deop.proposal_source learned needs a DeOP checkpoint trained with a proposal "
                "head: use superpixels or clusters, or load such a checkpoint"
            )
        check_proposal_masks(settings.proposals, self.largest_grid(settings), settings.mask_cells)
        head = None if modules is None else modules.proposal_head
        if head is not None and settings.proposal_source in ("auto", "learned"):
            if head.cells != settings.mask_cells:
                raise ValueError(
                    f"the checkpoint's proposal head predicts {head.cells} mask cells per patch; "
                    f"set deop.mask_cells to {head.cells}"
                )

    def largest_grid(self, settings: ProposalConfig) -> tuple[int, int]:
        """The patch grid of the largest frame ``settings`` allow (``max_long_side`` by
        ``short_side``, or square at ``max_long_side`` when ``short_side`` is 0)."""
        return frame_grid(settings.short_side, settings.max_long_side, self.patch)

    def reconfigure(self, **changes: object) -> None:
        """Change settings between frames; raises ValueError and changes nothing if bad."""
        unknown = set(changes) - {f.name for f in fields(self.settings_type)}
        if unknown:
            raise ValueError(f"unknown {self.name} settings {sorted(unknown)}")
        if "background_words" in changes:
            words = changes["background_words"]
            if isinstance(words, str) or not isinstance(words, Sequence):
                raise ValueError("background_words must be a list of strings")
            changes["background_words"] = tuple(words)
        settings = replace(self.settings, **changes)
        self._check(settings, self.modules)
        text_changed = (settings.templates, settings.background_words) != (
            self.settings.templates,
            self.settings.background_words,
        )
        self.text.set_templates(settings.templates)
        self.settings = settings
        if self.classes and text_changed:
            self._encode_queries()

    def load_checkpoint(self, path: str | None) -> None:
        """Switch to another checkpoint (None: none); on any error nothing changes."""
        checkpoint = load_checkpoint(path, self.clip) if path else None
        modules = checkpoint.modules if checkpoint else None
        self._check(self.settings, modules)
        self.checkpoint, self.modules = checkpoint, modules
        self._prompt_cache = {}
        if self.classes:
            self._encode_queries()

    def set_classes(self, entries: Sequence[ClassEntry | str]) -> None:
        """Replace the vocabulary; raises VocabularyError, leaving the old one, when invalid."""
        classes = parse_classes(entries)
        prompt = None if self.modules is None else self.modules.prompt
        if prompt is None:  # the templates' prompts
            check_class_prompts(
                self.text, classes, self.text.templates, self.settings.background_words
            )
        else:  # [start] context name . [end] (PromptContext.encode)
            names = [replace(entry, descriptions=()) for entry in classes]  # not encoded here
            check_class_prompts(self.text, names, ("{}.",), (), reserve=prompt.length)
        previous = self.classes
        self.classes = classes
        try:
            self._encode_queries()
        except Exception:
            self.classes = previous
            raise

    def settings_dict(self) -> dict:
        """The current settings as plain data (what a checkpoint stores)."""
        return asdict(self.settings)

    # --- text ---------------------------------------------------------------------------------

    def class_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D): the learned prompt context when loaded, else the templates."""
        prompt = None if self.modules is None else self.modules.prompt
        if prompt is None:
            return self.text.embeddings(texts).to(self.device)
        missing = [t for t in dict.fromkeys(texts) if t not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                encoded = prompt.encode(self.clip.model, self.clip.tokenizer, missing)
            self._prompt_cache.update(zip(missing, encoded, strict=True))
        return torch.stack([self._prompt_cache[t] for t in texts])

    def _encode_queries(self) -> None:
        texts, owner = [], []
        for index, entry in enumerate(self.classes):
            texts += entry.synonyms
            owner += [index] * len(entry.synonyms)
        queries = [self.class_embeddings(texts)] if texts else []
        background = list(self.settings.background_words)
        if background:
            queries.append(self.text.embeddings(background).to(self.device))
            owner += [len(self.classes)] * len(background)
        if self.uses_void:
            queries.append(self.modules.void_embedding().detach().to(self.device))
            owner.append(VOID)
        self._queries = torch.cat(queries).float()
        self._owner = torch.tensor(owner, device=self.device)

    # --- inference ----------------------------------------------------------------------------

    def segment(self, rgb: np.ndarray) -> Segmentation:
        """Segment one HxWx3 uint8 RGB image with the current vocabulary."""
        return self.segment_many([rgb])[0]

    @torch.inference_mode()
    def segment_many(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        """Segment several images; one batch per group of equal resized size."""
        if not self.classes:
            raise VocabularyError("no classes set: call set_classes first")
        for rgb in images:
            check_rgb(rgb)
        results: list[Segmentation | None] = [None] * len(images)
        for members in self.batch_groups(images):
            frames = self.prepare([images[i] for i in members])
            scores = self.scores(frames)
            for slot, index in enumerate(members):
                results[index] = self.postprocess(scores[slot], images[index].shape[:2])
        return results

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to (``resized_size``), as the dense
        family's ``network_size``."""
        return resized_size(
            height,
            width,
            self.settings.short_side,
            self.patch,
            max_long_side=self.settings.max_long_side,
        )

    def batch_groups(self, images: Sequence[np.ndarray]) -> list[list[int]]:
        """Indices of the images that share one batch: those of equal resized size."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, rgb in enumerate(images):
            groups.setdefault(self.network_size(*rgb.shape[:2]), []).append(index)
        return list(groups.values())

    def prepare(self, images: list[np.ndarray]) -> Frames:
        """Resize and normalise on the device; tokens and proposals of the batch."""
        pixels = torch.cat([self.preprocess(rgb) for rgb in images])
        frames = Frames(list(images), pixels, None, self._grid(pixels))
        if self.needs_tokens():
            frames.tokens, frames.grid = tokens_before_last_block(self.clip.model.visual, pixels)
        frames.proposals = self.propose(frames)
        return frames

    def needs_tokens(self) -> bool:
        """Whether the pipeline runs CLIP blocks 1..L-1 on the whole frame."""
        return self.proposal_source() != "superpixels"

    def _grid(self, pixels: torch.Tensor) -> tuple[int, int]:
        return pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Upload the uint8 image, resize to whole patches and normalise: (1, 3, H', W')."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device)
        image = image.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        size = self.network_size(*rgb.shape[:2])
        if size != tuple(image.shape[-2:]):
            image = F.interpolate(
                image, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        return ((image - self._mean) / self._std).to(self.clip.dtype)

    def propose(self, frames: Frames) -> Proposals:
        """Class-agnostic proposals of the batch on the mask grid."""
        settings, cells = self.settings, self.settings.mask_cells
        source = self.proposal_source()
        h, w = frames.grid
        if source == "superpixels":
            return superpixel_proposals(
                frames.images,
                (h * cells, w * cells),
                settings.proposals,
                settings.superpixel_compactness,
                self.device,
            )
        patches = frames.tokens[:, 1:].reshape(len(frames.images), h, w, -1)
        if source == "clusters":
            return cluster_proposals(
                patches, settings.proposals, cells, settings.cluster_iterations
            )
        return learned_proposals(self.modules.proposal_head, patches, settings.proposals)[0]

    def embed(self, frames: Frames) -> torch.Tensor:
        """Proposal embeddings (N, K, D), L2-normalised, in CLIP's joint space."""
        raise NotImplementedError

    def scores(self, frames: Frames) -> torch.Tensor:
        """Per-label scores on the mask grid (N, labels, Hm, Wm); labels = classes + 1."""
        embeddings = self.embed(frames)
        probs = torch.softmax(self.settings.logit_scale * embeddings @ self._queries.T, dim=-1)
        return semantic_scores(self.label_probabilities(probs), frames.proposals)

    def label_probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        """Query probabilities (N, K, Q) -> per label (N, K, classes + 1): max over synonyms;
        the last label is background (background words); "no object" is dropped."""
        labels = len(self.classes) + 1
        keep = self._owner != VOID
        owner = self._owner[keep].view(1, 1, -1).expand(*probs.shape[:2], -1)
        out = probs.new_zeros((*probs.shape[:2], labels))
        return out.scatter_reduce_(2, owner, probs[..., keep], reduce="amax", include_self=True)

    def postprocess(
        self, scores: torch.Tensor, size: tuple[int, int], coverage: torch.Tensor | None = None
    ) -> Segmentation:
        """Scores (labels, Hm, Wm) -> input size, labels (255/65535 unlabeled), confidence.

        ``coverage`` (Hm, Wm): scores not yet normalised per pixel (MaskFormer's plain sum):
        the labels are their argmax, the confidence (and ``score_threshold``) the best score
        over the coverage upsampled alike.

        Bilinear upsampling to ``size`` and the argmax over classes are taken a chunk of labels
        at a time (about POSTPROCESS_ELEMENTS per chunk; the first maximum wins, as ``max``),
        so the memory does not grow with labels x pixels; equal to upsampling all at once.
        """
        num_classes = len(self.classes)
        step = max(1, POSTPROCESS_ELEMENTS // (size[0] * size[1]))
        confidence = labels = None
        for start in range(0, num_classes, step):
            value, index = _upsample(scores[start : min(start + step, num_classes)], size).max(0)
            if confidence is None:
                confidence, labels = value, index
                continue
            better = value > confidence
            confidence = torch.where(better, value, confidence)
            labels = torch.where(better, index + start, labels)
        rejected = torch.zeros_like(labels, dtype=torch.bool)
        if self.settings.background_words:  # they win ties (without words the channel is 0)
            rejected = _upsample(scores[num_classes:], size)[0] >= confidence
        if coverage is not None:
            confidence = confidence / _upsample(coverage[None], size)[0].clamp(min=1e-6)
        rejected |= confidence < self.settings.score_threshold
        dtype = label_dtype(num_classes)
        labels = labels.masked_fill(rejected, int(np.iinfo(dtype).max))
        torch_dtype = torch.uint8 if dtype == np.uint8 else torch.int32
        return Segmentation(
            labels=labels.to(torch_dtype).cpu().numpy().astype(dtype, copy=False),
            confidence=confidence.cpu().numpy(),
            class_names=[c.name for c in self.classes],
        )


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) -> (K, H, W) float32, bilinear."""
    return F.interpolate(maps[None].float(), size=size, mode="bilinear")[0]


def semantic_scores(label_probs: torch.Tensor, proposals: Proposals) -> torch.Tensor:
    """MaskFormer semantic inference, normalised per pixel: (N, L, Hm, Wm).

    ``sum_k p_k(l) m_k / sum_k m_k`` with label probabilities (N, K, L) and masks (N, K, Hm, Wm)
    (padding proposals have zero masks). Pixels no proposal covers score 0.
    """
    masks = proposals.masks.float()
    total = torch.einsum("nkl,nkhw->nlhw", label_probs.float(), masks)
    coverage = masks.sum(dim=1, keepdim=True)
    return total / coverage.clamp(min=1e-6)
