"""The segmentation engine: RGB image + vocabulary in, labels and confidence out.

Pre-processing runs on the model's device (the uint8 image is uploaded once), the whole pipeline
stays there, and only the label map and confidence come back to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.dense_clip import LAST_BLOCK_MODES, patch_features
from ovss_ros.core.model_loading import load_clip
from ovss_ros.core.segmentation import Segmentation, label_dtype
from ovss_ros.core.text_encoding import TextEncoder, template_set
from ovss_ros.core.vocabulary import ClassEntry, VocabularyError, parse_classes

logger = logging.getLogger(__name__)

# Fields that need a new model when they change; everything else can change between frames.
LOAD_FIELDS = ("model", "pretrained", "device", "precision")


@dataclass
class EngineConfig:
    """Everything that decides how a frame is segmented (node parameters map onto these)."""

    model: str = "ViT-B-16"  # open_clip name, or a path to an open_clip model-config JSON
    pretrained: str = "laion2b_s34b_b88k"  # open_clip tag, checkpoint file, or none (random)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | fp16 | bf16 (half precision on a GPU only)
    short_side: int = 448  # resize so the short side is this many pixels; 0 keeps the size
    crop: int = 0  # sliding-window size in pixels; 0 = whole image in one forward
    stride: int = 0  # sliding-window stride; 0 = crop / 2
    method: str = "naclip"  # last-block attention: naclip | sclip | clearclip | maskclip | vanilla
    templates: str = "imagenet"  # imagenet (80) | single | custom templates joined by |
    background_words: tuple[str, ...] = ()  # texts that mean "none of the classes"
    score_threshold: float = 0.0  # pixels whose best class probability is below are unlabeled
    logit_scale: float = 40.0  # softmax temperature of the standard protocol

    def validate(self) -> None:
        """Raise ValueError with the reason for the first bad value."""
        if self.method not in LAST_BLOCK_MODES:
            raise ValueError(
                f"unknown method {self.method!r}: use one of {list(LAST_BLOCK_MODES)}"
            )
        for name in ("short_side", "crop", "stride"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.stride and not self.crop:
            raise ValueError("stride needs crop > 0 (sliding window)")
        if self.stride > self.crop:
            raise ValueError(
                f"stride {self.stride} larger than crop {self.crop} would skip pixels"
            )
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")
        if any(not isinstance(w, str) or not w.strip() for w in self.background_words):
            raise ValueError("background_words must be non-empty strings")
        template_set(self.templates)


def resized_size(height: int, width: int, short_side: int, patch: int) -> tuple[int, int]:
    """Size after scaling the short side to ``short_side``, rounded to whole patches."""
    scale = short_side / min(height, width) if short_side else 1.0
    return (
        max(patch, round(height * scale / patch) * patch),
        max(patch, round(width * scale / patch) * patch),
    )


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis covering [0, length); the last window ends at the edge."""
    if length <= crop:
        return [0]
    count = -(-(length - crop) // stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


class Segmenter:
    """Segments RGB frames into the classes of its vocabulary. Not thread-safe: one caller."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self.clip = load_clip(config.model, config.pretrained, config.device, config.precision)
        self.text = TextEncoder(self.clip.model, self.clip.tokenizer, config.templates)
        self.classes: list[ClassEntry] = []
        self._text_embeddings: torch.Tensor | None = None
        self._query_owner: torch.Tensor | None = None
        device, dtype = self.clip.device, torch.float32
        self._mean = torch.tensor(self.clip.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
        self._std = torch.tensor(self.clip.std, device=device, dtype=dtype).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def set_classes(self, entries: Sequence[ClassEntry | str]) -> None:
        """Replace the vocabulary; raises VocabularyError, leaving the old one, when invalid."""
        self.classes = parse_classes(entries)
        self._encode_queries()

    def reconfigure(self, **changes: object) -> None:
        """Change runtime settings between frames; raises ValueError and changes nothing if bad."""
        unknown = set(changes) - {f.name for f in fields(EngineConfig)}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        reload = [
            name
            for name in LOAD_FIELDS
            if name in changes and changes[name] != getattr(self.config, name)
        ]
        if reload:
            raise ValueError(f"{reload} need a new Segmenter (they choose the model)")
        if "background_words" in changes:
            changes["background_words"] = tuple(changes["background_words"])
        config = replace(self.config, **changes)
        config.validate()
        self.config = config
        self.text.set_templates(config.templates)
        if self.classes:
            self._encode_queries()

    def _encode_queries(self) -> None:
        """One text query per synonym and background word; ``owner`` maps queries to labels."""
        texts, owner = [], []
        for index, entry in enumerate(self.classes):
            texts += entry.synonyms
            owner += [index] * len(entry.synonyms)
        texts += self.config.background_words
        owner += [len(self.classes)] * len(self.config.background_words)
        self._text_embeddings = self.text.embeddings(texts).to(self.device)
        self._query_owner = torch.tensor(owner, device=self.device)

    @torch.inference_mode()
    def segment(self, rgb: np.ndarray) -> Segmentation:
        """Segment one HxWx3 uint8 RGB image with the current vocabulary."""
        if not self.classes:
            raise VocabularyError("no classes set: call set_classes first")
        height, width = _check_rgb(rgb)
        pixels = self.preprocess(rgb)
        logits = self.logits(pixels)
        return self.postprocess(logits, (height, width))

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Upload the uint8 image once, then resize and normalise on the model's device."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device, non_blocking=True)
        image = image.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        size = resized_size(
            rgb.shape[0], rgb.shape[1], self.config.short_side, self.clip.patch_size
        )
        if size != tuple(image.shape[-2:]):
            image = F.interpolate(
                image, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        return ((image - self._mean) / self._std).to(self.clip.dtype)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch-text cosine logits (queries, h, w): one forward, or averaged sliding windows."""
        config, visual = self.config, self.clip.model.visual
        if not config.crop:
            features = patch_features(visual, pixels, config.method)[0]
            return torch.einsum("hwd,qd->qhw", features, self._text_embeddings)
        crop, stride = config.crop, config.stride or config.crop // 2
        height, width = pixels.shape[-2:]
        if crop % self.clip.patch_size:
            raise ValueError(
                f"crop {crop} must be a multiple of the patch size {self.clip.patch_size}"
            )
        boxes = [
            (top, left, min(crop, height), min(crop, width))
            for top in window_starts(height, crop, stride)
            for left in window_starts(width, crop, stride)
        ]
        windows = torch.cat([pixels[..., y : y + h, x : x + w] for y, x, h, w in boxes])
        features = patch_features(visual, windows, config.method)
        window_logits = torch.einsum("nhwd,qd->nqhw", features, self._text_embeddings)
        window_logits = F.interpolate(
            window_logits, size=windows.shape[-2:], mode="bilinear", align_corners=False
        )
        total = pixels.new_zeros((len(self._query_owner), height, width), dtype=torch.float32)
        count = pixels.new_zeros((1, height, width), dtype=torch.float32)
        for (top, left, h, w), logits in zip(boxes, window_logits, strict=True):
            total[:, top : top + h, left : left + w] += logits
            count[:, top : top + h, left : left + w] += 1
        return total / count

    def postprocess(self, logits: torch.Tensor, size: tuple[int, int]) -> Segmentation:
        """Upsample, softmax, max over synonyms, background; copy labels/confidence back once."""
        logits = F.interpolate(
            logits[None].float(), size=size, mode="bilinear", align_corners=False
        )[0]
        probs = torch.softmax(self.config.logit_scale * logits, dim=0)
        num_classes = len(self.classes)
        owner = self._query_owner.view(-1, 1, 1).expand_as(probs)
        per_label = probs.new_zeros((num_classes + 1, *size))
        per_label.scatter_reduce_(0, owner, probs, reduce="amax", include_self=True)
        confidence, labels = per_label[:num_classes].max(dim=0)
        dtype = label_dtype(num_classes)
        unlabeled = np.iinfo(dtype).max
        rejected = (per_label[num_classes] > confidence) | (
            confidence < self.config.score_threshold
        )
        labels = labels.masked_fill(rejected, unlabeled).to(torch.int32)
        return Segmentation(
            labels=labels.cpu().numpy().astype(dtype),
            confidence=confidence.cpu().numpy(),
            class_names=[c.name for c in self.classes],
        )


def _check_rgb(rgb: np.ndarray) -> tuple[int, int]:
    if (
        not isinstance(rgb, np.ndarray)
        or rgb.ndim != 3
        or rgb.shape[2] != 3
        or rgb.dtype != np.uint8
    ):
        shape = getattr(rgb, "shape", None)
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {type(rgb).__name__} {shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"empty image {rgb.shape}")
    return rgb.shape[0], rgb.shape[1]
