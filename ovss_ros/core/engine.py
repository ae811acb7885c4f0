"""The segmentation engine: RGB image + vocabulary in, labels and confidence out.

One frame goes through four stages, each a method so that benchmarks can time them:
``preprocess`` (resize the uint8 image as OpenCV does, normalise on the model's device),
``encode`` (the dense CLIP forward, whole image or a batch of sliding windows), ``head``
(patch-text logits and the optional DSLO / FreeCP refinement) and ``postprocess`` (upsampling,
optional PAMR, softmax, synonyms, background; only labels and confidence return to the host).

Every frame is bounded before anything is allocated: the network input keeps the aspect ratio
with its short side at ``short_side`` unless that would make the long side longer than
``max_long_side`` (``resized_size``), so a 16x1 strip costs no more than a 2048x448 frame.

Changes are transactional: ``set_classes`` and ``reconfigure`` validate, then encode the text
with the new vocabulary/settings, and only then swap the state in; on any exception (bad input,
out of memory, Stopped) everything stays as it was. With a stop event (``Segmenter(config,
stop)``), text encoding and each inference stage raise Stopped once the event is set.

DSLO on the ``sd2`` affinity needs a second model, Stable Diffusion 2 (``Sd2Attention``): it is
loaded (on the CLIP model's device) when a config asks for it, at construction or in
``reconfigure``, and released when a config no longer does; its attention of each frame (of each
sliding window) replaces CLIP's affinity in DSLO. A failed load changes nothing.

Confidence is always CLIP's probability of the chosen class (softmax over all queries, max over
the class's synonyms), also when a refinement chose the class, so ``score_threshold`` means the
same thing for every method.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.clip.image_resize import opencv_bilinear_resize, resized_size
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.clip.text_encoding import TextEncoder, check_class_prompts, template_set
from ovss_ros.core.config import (
    LOAD_FIELDS,
    PIPELINE_METHODS,
    SD_LOAD_FIELDS,
    VLM_LOAD_FIELDS,
    EngineConfig,
    check_frame_budget,
)
from ovss_ros.core.frame_budget import POSTPROCESS_ELEMENTS, rows_per_chunk
from ovss_ros.core.method_pipelines import Pipeline, build_pipeline, needs_rebuild
from ovss_ros.core.methods.dense.forward import DenseOutput, dense_forward
from ovss_ros.core.methods.dense.jbu import jbu_weights, joint_bilateral_upsample
from ovss_ros.core.methods.dense.pamr import pamr_affinity, pamr_propagate
from ovss_ros.core.methods.dslo.dslo import dslo_scores
from ovss_ros.core.methods.dslo.sd2_attention import Sd2Attention
from ovss_ros.core.methods.freecp.freecp import background_wins, freecp, make_crop_classifier
from ovss_ros.core.segmentation import Segmentation, check_rgb, label_dtype
from ovss_ros.core.stopping import Stopped, check_stop
from ovss_ros.core.vocabulary import (
    ClassEntry,
    VocabularyError,
    check_query_count,
    parse_classes,
)

__all__ = ["EngineConfig", "Segmenter", "Stopped", "resized_size", "window_starts"]
logger = logging.getLogger(__name__)
T = TypeVar("T")
Box = tuple[int, int, int, int]  # top, left, height, width in resized-image pixels


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis covering [0, length); the last window ends at the edge."""
    if length <= crop:
        return [0]
    count = -(-(length - crop) // stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


@dataclass
class Encoded:
    """Dense forward of a batch: every image's windows (whole image = one window), image-major."""

    windows: torch.Tensor  # (images * len(boxes), 3, h, w) normalised pixels
    boxes: list[Box]  # the same windows for every image of the batch (they share one size)
    dense: DenseOutput
    size: tuple[int, int]  # resized image (H', W')
    # guide-dependent values postprocess computes once and reuses for every chunk of classes
    guides: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    def image(self, index: int) -> Encoded:
        """The part of the batch that belongs to image ``index``."""
        part = slice(index * len(self.boxes), (index + 1) * len(self.boxes))
        affinity = self.dense.affinity
        dense = DenseOutput(
            self.dense.features[part], None if affinity is None else affinity[part]
        )
        return Encoded(self.windows[part], self.boxes, dense, self.size)


@dataclass
class Reduced:
    """One pass of ``postprocess`` over the query maps, per input pixel (each (H, W))."""

    peak: torch.Tensor  # max over queries of the scaled logits
    total: torch.Tensor  # sum over queries of exp(scaled logit - peak)
    best: torch.Tensor  # best scaled class logit (of the classes allowed to win)
    best_query: torch.Tensor  # its query
    background: torch.Tensor  # best scaled background-word logit (-inf without any)

    def background_probability(self) -> torch.Tensor:
        return torch.exp(self.background - self.peak) / self.total


@dataclass(frozen=True)
class TextQueries:
    """Everything the text side hands inference, computed together and swapped in together."""

    embeddings: torch.Tensor  # (queries, D): class synonyms first, then background words
    owner: torch.Tensor  # (queries,) query -> label; len(classes) = background
    class_queries: int  # queries [0, this) are class synonyms
    class_text: torch.Tensor  # (classes, D) normalised mean over each class's synonyms
    descriptions: torch.Tensor  # (classes, D) for FreeCP's crop check


class Segmenter:
    """Segments RGB frames into the classes of its vocabulary. Not thread-safe: one caller.

    ``stop``: optional event shared with the caller's other threads (e.g. the node's shutdown).
    Once set, text encoding (between prompt batches) and ``segment_many`` (between stages and
    batch groups) raise Stopped; the engine never clears it.
    Raises ValueError for a bad config, ModelLoadError when the model (or, for DSLO on the sd2
    affinity, the Stable Diffusion model) cannot be loaded, Stopped.

    ``method`` pnp_ovss, deop or twostream: ``self.pipeline`` (method_pipelines.Pipeline) does
    the segmenting, built from this CLIP (and the VLM or a DeOP checkpoint it loads); switching
    to or between them in ``reconfigure`` builds the new pipeline first (transactional too).
    """

    def __init__(self, config: EngineConfig, stop: threading.Event | None = None) -> None:
        config.validate()
        self.config = config
        self.stop = stop
        self.clip = load_clip(config.model, config.pretrained, config.device, config.precision)
        # pnp_ovss / deop / twostream: their pipeline, which segments instead (method_pipelines)
        self.pipeline: Pipeline | None = None
        self.check_config(config)
        self.sd2: Sd2Attention | None = None  # the sd2 affinity's model, while in use
        self._sd2_key: tuple[str, str] | None = None  # (sd_model, sd_precision) of self.sd2
        self.sd2, self._sd2_key = self._sd2_for(config)
        self.text = TextEncoder(self.clip.model, self.clip.tokenizer, config.templates, stop)
        self.classes: list[ClassEntry] = []
        self._text_embeddings: torch.Tensor | None = None  # (queries, D)
        self._query_owner: torch.Tensor | None = None  # query -> label; len(classes) = background
        self._class_queries = 0  # queries [0, this) are class synonyms, the rest background words
        self._class_text: torch.Tensor | None = None  # (classes, D) mean over synonyms
        self._descriptions: torch.Tensor | None = None  # (classes, D) for FreeCP's crop check
        device, dtype = self.clip.device, torch.float32
        self._mean = torch.tensor(self.clip.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
        self._std = torch.tensor(self.clip.std, device=device, dtype=dtype).view(1, 3, 1, 1)
        if config.method in PIPELINE_METHODS:
            self.pipeline = build_pipeline(config, self.clip, self.text, [], None, stop)

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def set_classes(self, entries: Sequence[ClassEntry | str]) -> None:
        """Replace the vocabulary (parse_classes entries), encoding only new texts.

        Raises VocabularyError (invalid, or too many queries with the background words: nothing
        is encoded then), Stopped, or what the text tower raises (e.g. out of memory); on any
        exception the old vocabulary and its embeddings stay in force, unchanged.
        """
        self.update(classes=entries)

    def reconfigure(self, **changes: object) -> None:
        """Change runtime settings (EngineConfig fields) between frames.

        New templates or background words are encoded before anything changes. Raises
        ValueError (unknown or bad setting, a setting that needs a new model, too many queries),
        Stopped, or what the text tower raises; on any exception nothing changes.
        """
        self.update(**changes)

    def update(self, classes: Sequence[ClassEntry | str] | None = None, **changes: object) -> None:
        """Change the vocabulary and the settings together, as one transaction.

        ``classes``: the new vocabulary (parse_classes entries), or None to keep the one in
        force; ``changes``: EngineConfig fields. Everything is checked and built for the end
        state only, never for a mix of old and new: 1000 new class names with 1000 new
        background words are 2000 text queries, whatever was in force; method pnp_ovss with 3
        classes builds its prompt from those 3, not from the 40 in force. The text is encoded
        (and a VLM, checkpoint or Stable Diffusion model loaded) before anything changes.

        Raises VocabularyError (bad vocabulary, too many queries, a prompt too long for the
        VLM), ValueError (unknown or bad setting, a setting that needs a new model),
        ModelLoadError, Stopped, or what the text tower raises; on any exception nothing
        changes.
        """
        config = self._changed_config(changes)
        given = classes is not None
        vocabulary = parse_classes(classes) if given else self.classes
        check_query_count(vocabulary, config.background_words)
        self.check_vocabulary(vocabulary, config)
        if config.method in PIPELINE_METHODS:
            self._update_pipeline(config, vocabulary, given)
        else:
            self._update_dense(config, vocabulary, given)

    def _changed_config(self, changes: dict[str, object]) -> EngineConfig:
        """The config with ``changes``, checked against this model (``check_config``);
        ValueError for an unknown field or one that chooses another model."""
        unknown = set(changes) - {f.name for f in fields(EngineConfig)}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        reload = [
            n
            for n in (*LOAD_FIELDS, *VLM_LOAD_FIELDS)
            if n in changes and changes[n] != getattr(self.config, n)
        ]
        if reload:
            raise ValueError(f"{reload} need a new Segmenter (they choose the model)")
        if "background_words" in changes:
            if isinstance(changes["background_words"], str | bytes):
                raise ValueError("background_words must be a list of strings")
            changes["background_words"] = tuple(changes["background_words"])
        config = replace(self.config, **changes)
        self.check_config(config)
        return config

    def _update_dense(self, config: EngineConfig, classes: list[ClassEntry], given: bool) -> None:
        """``update`` to a dense method: text queries for ``classes`` and ``config`` encoded
        (and an SD model loaded) first, then everything swapped in."""
        templates = template_set(config.templates)
        encode = bool(classes) and (
            given
            or self.pipeline is not None  # back from a pipeline: the dense text state is stale
            or (templates, config.background_words)
            != (self.text.templates, self.config.background_words)
        )
        sd2, sd2_key = self._sd2_for(config)  # loads a new SD model only if needed
        queries = None
        try:
            if encode:
                queries = self._attempt(lambda: self._encode_queries(classes, config))
        except BaseException:
            if sd2 is not None and sd2 is not self.sd2:
                sd2.release()
            raise
        # Nothing below can fail (the SD settings were checked by _sd2_for).
        if sd2 is not None and sd2 is self.sd2:
            sd2.reconfigure(**config.sd2_settings())
        previous, self.sd2, self._sd2_key = self.sd2, sd2, sd2_key
        if previous is not None and previous is not sd2:
            previous.release()  # no longer used, or replaced by another model
        self.config, self.classes = config, classes
        self.text.set_templates(templates)
        if queries is not None:
            self._swap_in(queries)
        self.pipeline = None  # its memory (the VLM) goes with it

    def _update_pipeline(
        self, config: EngineConfig, classes: list[ClassEntry], given: bool
    ) -> None:
        """``update`` to a pnp_ovss / deop / twostream pipeline: built for ``classes`` (the VLM
        or a checkpoint loaded, the vocabulary encoded), or given ``classes``, before anything
        changes."""
        pipeline = self.pipeline
        if needs_rebuild(pipeline, config):
            pipeline = self._attempt(
                lambda: build_pipeline(
                    config, self.clip, self.text, classes, self.pipeline, self.stop
                )
            )
        elif given:  # transactional itself: the old vocabulary stays if it raises
            self._attempt(lambda: pipeline.core.set_classes(classes))
        if pipeline is not self.pipeline:
            logger.info("method %s", pipeline.describe()[0])
        self.config, self.pipeline, self.classes = config, pipeline, classes
        self._text_embeddings = self._query_owner = None  # dense text state: made on switching
        previous, self.sd2, self._sd2_key = self.sd2, None, None
        if previous is not None:
            previous.release()  # DSLO's sd2 affinity is not used by these methods
        self._class_text = self._descriptions = None

    def method_notice(self) -> tuple[str, bool]:
        """(the method that runs, in words; whether it deserves a warning), for logs: e.g. DeOP
        without a checkpoint runs training-free."""
        if self.pipeline is not None:
            return self.pipeline.describe()
        refinement = f" + {self.config.refinement}" if self.config.refinement != "none" else ""
        return f"{self.config.method}{refinement}", False

    def check_config(
        self, config: EngineConfig, classes: Sequence[ClassEntry] | None = None
    ) -> None:
        """Raise ValueError with the reason if ``config`` is bad or does not fit this model
        (``crop`` not whole patches, ``max_long_side`` below one patch; the sd settings against
        the SD model in use, when ``config`` keeps it): what ``reconfigure`` checks before it
        changes anything, for callers that validate ahead (the node). Whether a Stable
        Diffusion model that is not loaded yet loads is found out by loading it.

        ``classes`` (parsed): also the vocabulary against the method's loaded model where
        ``config`` keeps it (PnP-OVSS: the prompt with every class within the VLM's text
        positions); VocabularyError. Which of its texts encode is found out by encoding.

        The background words' prompts, and those of ``classes`` (parsed: the vocabulary that
        will be in force with ``config``) when given, are checked against the text model's
        context (``check_vocabulary``): a VocabularyError names the text and the limit.
        """
        config.validate()
        _check_fits_model(config, self.patch)
        if getattr(self, "text", None) is not None:  # None while the constructor runs
            self.check_vocabulary(classes or [], config)
        # The SD model in use (None while the constructor runs). The node calls this from
        # its executor thread while the worker may be replacing the model: a model released
        # meanwhile is not checked here, the worker's reconfigure checks the settings again.
        sd2, key = getattr(self, "sd2", None), getattr(self, "_sd2_key", None)
        if config.uses_sd2 and sd2 is not None and _sd2_key(config) == key:
            try:
                sd2.check(**config.sd2_settings())
            except RuntimeError:  # released by the worker meanwhile
                pass
        pipeline = self.pipeline  # the worker may replace it meanwhile: one reading
        if pipeline is not None:
            pipeline.check(config, classes)

    def check_vocabulary(
        self, classes: Sequence[ClassEntry], config: EngineConfig | None = None
    ) -> None:
        """Refuse a vocabulary whose prompts CLIP's text model would cut (PromptTooLong, a
        VocabularyError naming the class, the prompt, its tokens and the limit, e.g. 77).

        Checked: every synonym of every class with ``config``'s templates (default: the
        settings in force), each description as written, each background word of ``config``
        with the templates. Tokenizes only (counts are cached per text): cheap enough for a
        caller that validates a request before accepting it (the node, with ``check_config``).
        """
        config = config or self.config
        templates = template_set(config.templates)
        check_class_prompts(self.text, classes, templates, config.background_words)

    def _sd2_for(self, config: EngineConfig) -> tuple[Sd2Attention | None, tuple | None]:
        """The SD model ``config`` needs (None if none) and its key, without changing state.

        The one in use when ``config`` keeps its model and precision (its new settings checked
        by ``check_config``), else a new one loaded on the CLIP model's device. Raises
        ModelLoadError (what to set), ValueError (a setting this SD model refuses), Stopped
        (checked before and after loading; a model loaded meanwhile is released).
        """
        if not config.uses_sd2:
            return None, None
        key = _sd2_key(config)
        if self.sd2 is not None and key == self._sd2_key:
            return self.sd2, key
        check_stop(self.stop, "loading the Stable Diffusion model")
        sd2 = Sd2Attention.load(
            config.sd_model,
            device=str(self.clip.device),
            precision=config.sd_precision,
            **config.sd2_settings(),
        )
        if self.stop is not None and self.stop.is_set():
            sd2.release()
            check_stop(self.stop, "loading the Stable Diffusion model")
        logger.info("Stable Diffusion model %s loaded on %s", config.sd_model, sd2.device)
        return sd2, key

    def _attempt(self, encode: Callable[[], T]) -> T:
        """Run ``encode``; on failure bound the text cache it may have grown, then re-raise."""
        try:
            return encode()
        except BaseException:
            self.text.trim(self._texts(self.classes, self.config), self._sentences(self.classes))
            raise

    @staticmethod
    def _texts(classes: Sequence[ClassEntry], config: EngineConfig) -> list[str]:
        """The text queries: every synonym of every class, then the background words."""
        return [text for entry in classes for text in entry.synonyms] + list(
            config.background_words
        )

    @staticmethod
    def _sentences(classes: Sequence[ClassEntry]) -> list[str]:
        return [sentence for entry in classes for sentence in entry.descriptions]

    def _encode_queries(self, classes: list[ClassEntry], config: EngineConfig) -> TextQueries:
        """One text query per synonym and background word (``owner`` maps queries to labels),
        computed for ``classes`` and ``config`` without touching the current state."""
        texts = self._texts(classes, config)
        owner = [index for index, entry in enumerate(classes) for _ in entry.synonyms]
        class_queries = len(owner)  # then the background words
        owner += [len(classes)] * len(config.background_words)
        embeddings = self.text.embeddings(texts, template_set(config.templates))
        embeddings = embeddings.to(self.device)
        owner_tensor = torch.tensor(owner, device=self.device)
        per_class = torch.zeros(len(classes), embeddings.shape[1], device=self.device)
        synonyms = slice(0, class_queries)
        per_class.index_add_(0, owner_tensor[synonyms], embeddings[synonyms])
        class_text = F.normalize(per_class, dim=-1)
        descriptions = class_text.clone()
        for index, entry in enumerate(classes):
            if entry.descriptions:
                sentences = self.text.sentence_embeddings(entry.descriptions).to(self.device)
                descriptions[index] = F.normalize(sentences.mean(dim=0), dim=-1)
        return TextQueries(embeddings, owner_tensor, class_queries, class_text, descriptions)

    def _swap_in(self, queries: TextQueries) -> None:
        """Install new text state: plain assignments, nothing here can fail half-way."""
        self._text_embeddings = queries.embeddings
        self._query_owner = queries.owner
        self._class_queries = queries.class_queries
        self._class_text = queries.class_text
        self._descriptions = queries.descriptions

    def segment(self, rgb: np.ndarray) -> Segmentation:
        """Segment one HxWx3 uint8 RGB image with the current vocabulary."""
        return self.segment_many([rgb])[0]

    @torch.inference_mode()
    def segment_many(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        """Segment several images (e.g. one per camera): one forward per group of equal size.

        Each image: HxWx3 uint8 RGB, any H, W >= 1 (the network input is bounded by
        ``resized_size``); labels and confidence come back at HxW. Raises ValueError for a bad
        image, VocabularyError without classes, Stopped once the stop event is set (checked
        before each stage of each batch group and between postprocess's query chunks).
        """
        if not self.classes:
            raise VocabularyError("no classes set: call set_classes first")
        sizes = [check_rgb(rgb) for rgb in images]
        if self.pipeline is not None:
            return self.pipeline.segment_many(images, self.stop, self.config.score_threshold)
        pixels = []
        for rgb in images:
            check_stop(self.stop, "preprocess")
            pixels.append(self.preprocess(rgb))
        results: list[Segmentation | None] = [None] * len(images)
        for members in self.batch_groups(images):
            check_stop(self.stop, "encode")
            encoded = self.encode(torch.cat([pixels[i] for i in members]))
            check_stop(self.stop, "head")
            logits, scores = self.head(encoded)
            per_image = len(encoded.boxes)
            for slot, index in enumerate(members):
                check_stop(self.stop, "postprocess")
                part = slice(slot * per_image, (slot + 1) * per_image)
                results[index] = self.postprocess(
                    encoded.image(slot),
                    logits[part],
                    None if scores is None else scores[part],
                    sizes[index],
                )
        return results

    def batch_groups(self, images: Sequence[np.ndarray]) -> list[list[int]]:
        """Indices of the images that share one forward pass: those of equal network size."""
        if self.pipeline is not None:
            return self.pipeline.batch_groups(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, rgb in enumerate(images):
            groups.setdefault(self.network_size(rgb.shape[0], rgb.shape[1]), []).append(index)
        return list(groups.values())

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') the network sees for a ``height`` x ``width`` image (``resized_size`` with
        this config and model): every side at most ``max_long_side``, at least one patch."""
        return resized_size(
            height,
            width,
            self.config.short_side,
            self.patch,
            max_long_side=self.config.max_long_side,
        )

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Resize the uint8 HxWx3 image to ``network_size`` as the official pipeline does
        (``mmcv.imrescale``: ``cv2.resize`` with ``INTER_LINEAR`` on the uint8 image, no
        antialiasing), then normalise on the model's device: (1, 3, H', W') in the model's dtype.

        On the CPU that is OpenCV itself; on a GPU the image is uploaded once and resized there
        with ``opencv_bilinear_resize``, OpenCV's integer arithmetic bit for bit.
        """
        size = self.network_size(rgb.shape[0], rgb.shape[1])
        resize = size != tuple(rgb.shape[:2])
        if self.device.type == "cpu":
            if resize:
                rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
            image = torch.from_numpy(np.ascontiguousarray(rgb))
        else:
            image = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device, non_blocking=True)
            if resize:
                image = opencv_bilinear_resize(image, size)
        image = image.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        return ((image - self._mean) / self._std).to(self.clip.dtype)

    @property
    def patch(self) -> int:
        return self.clip.patch_size

    def encode(self, pixels: torch.Tensor) -> Encoded:
        """Dense forward of images (N, 3, H', W'), whole or as sliding windows, in one batch."""
        config = self.config
        height, width = pixels.shape[-2:]
        if config.crop:
            stride = config.stride or config.crop // 2
            boxes = [
                (top, left, min(config.crop, height), min(config.crop, width))
                for top in window_starts(height, config.crop, stride)
                for left in window_starts(width, config.crop, stride)
            ]
            crops = [pixels[..., y : y + h, x : x + w] for y, x, h, w in boxes]
            windows = torch.stack(crops, dim=1).flatten(0, 1)  # image-major
        else:
            boxes, windows = [(0, 0, height, width)], pixels
        affinity = {"dslo": config.affinity, "freecp": "mean"}.get(config.refinement)
        clip_affinity = None if affinity == "sd2" else affinity
        visual = self.clip.model.visual
        step = rows_per_chunk(_window_bytes(visual, windows), len(windows))
        parts = [
            dense_forward(visual, part, config.method, clip_affinity, config.pos_interpolation)
            for part in windows.split(step)
        ]
        dense = parts[0] if len(parts) == 1 else _joined(parts)
        if affinity == "sd2":
            check_stop(self.stop, "Stable Diffusion attention")
            dense = DenseOutput(dense.features, self.sd2_affinity(windows, dense.features))
        return Encoded(windows, boxes, dense, (height, width))

    def sd2_affinity(self, windows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """DSLO's sd2 affinity (n, h*w, h*w) of the windows (n, 3, H, W; normalised network
        input) on the CLIP patch grid of ``features`` (n, h, w, D): Stable Diffusion 2
        self-attention of each window's RGB image (``Sd2Attention.affinity``), one SD forward
        per window."""
        guide = (windows.float() * self._std + self._mean).clamp(0, 1)
        return self.sd2.affinity(guide, tuple(features.shape[1:3])).to(features.device)

    def head(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query logits (n, Q, h, w), and per-label refined scores (n, L, h, w) or None."""
        features = encoded.dense.features
        logits = torch.einsum("nhwd,qd->nqhw", features, self._text_embeddings)
        config = self.config
        if config.refinement == "dslo":
            scores = dslo_scores(
                self._label_logits(logits),
                encoded.dense.affinity,
                mode=config.dslo_mode,
                sinkhorn_iters=config.sinkhorn_iterations,
                epsilon=config.sinkhorn_epsilon,
                ipf_rounds=config.ipf_rounds,
                tau=config.velocity_tau,
                logit_scale=config.logit_scale,
            )
            return logits, scores
        if config.refinement == "freecp":
            return logits, torch.stack(
                [self._freecp(encoded, i) for i in range(len(encoded.windows))]
            )
        return logits, None

    def _label_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Max over each label's queries: (n, classes [+1 background], h, w)."""
        labels = len(self.classes) + bool(self.config.background_words)
        out = logits.new_full((logits.shape[0], labels, *logits.shape[2:]), float("-inf"))
        index = self._query_owner.view(1, -1, 1, 1).expand_as(logits)
        return out.scatter_reduce_(1, index, logits, reduce="amax")

    def _freecp(self, encoded: Encoded, window: int) -> torch.Tensor:
        """FreeCP's class scores (classes, h, w) of one window: refined maps of the kept
        classes, 0 for dropped ones; the background is formed after the windows are averaged
        (``postprocess``), as FreeCP's ``forward_slide`` and ``postprocess_result``."""
        features = encoded.dense.features[window]
        background = self._text_embeddings[self._class_queries :]
        classify = make_crop_classifier(
            self.clip.model.visual,
            self._descriptions,
            encoded.windows[window : window + 1],
            self.patch,
        )
        return freecp(
            features,
            self._class_text,
            encoded.dense.affinity[window],
            redundancy_threshold=self.config.freecp_redundancy,
            ambiguity_threshold=self.config.freecp_ambiguity,
            crop_classifier=classify,
            background_text=background if len(background) else None,
        )

    def _freecp_background(self, best: torch.Tensor) -> torch.Tensor:
        """(H, W) bool: pixels FreeCP leaves unlabeled, from the best window-averaged class
        score ``best``. With background words: FreeCP's background = 1 - best wins (ties too).
        Without: pixels where every class scores 0, i.e. no class survived purification in any
        window over them; the official code labels those with its first class (argmax of
        zeros), ovss_ros calls them unlabeled (``ovss-eval --protocol freecp`` scores them as
        the official does)."""
        if self.config.background_words:
            return background_wins(best)
        return best <= 0

    def postprocess(
        self,
        encoded: Encoded,
        logits: torch.Tensor,
        scores: torch.Tensor | None,
        size: tuple[int, int],
    ) -> Segmentation:
        """Upsample, PAMR, softmax, synonyms, background; copy labels/confidence back once.

        ``logits``: (n, Q, h, w) query logits of the image's n windows; ``scores``: (n, L, h, w)
        refined label scores or None; ``size``: the input (H, W). Pixel p gets the class whose
        best synonym has the largest ``softmax(logit_scale * logits)`` over all Q queries
        (README, conventions), unlabeled where a background word wins or the probability is
        below ``score_threshold``. With ``area_threshold`` (SCLIP's ``area_thd``), classes that
        label at most that share of the class-labelled pixels are dropped and their pixels go
        to the best remaining class (or background), as SCLIP's ``postprocess_result``.

        The maps reach the input size as in the official code (``_to_input``) a chunk of
        queries at a time (POSTPROCESS_ELEMENTS) and are reduced on the fly (running
        log-sum-exp, best class, best background word), so the peak memory does not grow with
        the number of queries; the result equals the whole softmax at once up to float
        rounding.
        """
        num_classes = len(self.classes)
        step = self._chunk(encoded, size)
        affinity = self._pamr_affinity(encoded, size) if self.config.pamr else None
        labels = best = None
        if scores is not None:
            best, labels = self._best_label(encoded, scores, size, step, affinity)
        reduced = self._reduce(encoded, logits, size, step, affinity, labels)
        if labels is None and self.config.area_threshold:
            dropped = self._small_classes(reduced)
            if dropped is not None:
                reduced = self._reduce(encoded, logits, size, step, affinity, None, dropped)
        confidence = torch.exp(reduced.best - reduced.peak) / reduced.total
        if labels is None:
            labels = self._query_owner[reduced.best_query]
            background = reduced.background_probability() > confidence
        elif self.config.refinement == "freecp":
            background = self._freecp_background(best)
        else:
            background = labels == num_classes  # the refinement's background channel
            labels = labels.clamp(max=num_classes - 1)
        dtype = label_dtype(num_classes)
        rejected = background | (confidence < self.config.score_threshold)
        labels = labels.masked_fill(rejected, int(np.iinfo(dtype).max))
        torch_dtype = torch.uint8 if dtype == np.uint8 else torch.int32
        labels_host, confidence_host = _to_host(labels.to(torch_dtype), confidence)
        return Segmentation(
            labels=labels_host.astype(dtype, copy=False),
            confidence=confidence_host,
            class_names=[c.name for c in self.classes],
        )

    def _reduce(
        self,
        encoded: Encoded,
        logits: torch.Tensor,
        size: tuple[int, int],
        step: int,
        affinity: torch.Tensor | None,
        labels: torch.Tensor | None,
        dropped: torch.Tensor | None = None,
    ) -> Reduced:
        """One pass over the query maps, ``step`` queries at a time (see ``Reduced``).

        ``labels`` (H, W): a refinement's choice; the best logit is then that class's best
        synonym. ``dropped`` (classes,) bool: classes that may not win (area threshold); they
        still count in the softmax's denominator, as SCLIP multiplies their probability by 0.
        """
        num_classes, class_queries = len(self.classes), self._class_queries
        device = logits.device
        peak = torch.full(size, float("-inf"), device=device)  # max of scaled logits
        total = torch.zeros(size, device=device)  # sum of exp(scaled logit - peak)
        best = torch.full(size, float("-inf"), device=device)  # best class logit
        best_query = torch.zeros(size, dtype=torch.long, device=device)
        background = torch.full(size, float("-inf"), device=device)
        owner = self._query_owner
        for start in range(0, logits.shape[1], step):
            if start:
                check_stop(self.stop, f"postprocess of queries {start}..")
            stop = min(start + step, logits.shape[1])
            maps = self._to_input(logits[:, start:stop], encoded, size, labels is None, affinity)
            maps = maps * self.config.logit_scale
            new_peak = torch.maximum(peak, maps.amax(dim=0))
            total = total * torch.exp(peak - new_peak) + torch.exp(maps - new_peak).sum(dim=0)
            peak = new_peak
            if labels is not None:  # the refinement chose: its class's best synonym
                target = labels.clamp(max=num_classes - 1)
                mine = owner[start:stop].view(-1, 1, 1) == target
                best = torch.maximum(best, maps.masked_fill(~mine, float("-inf")).amax(dim=0))
                continue
            split = min(max(class_queries - start, 0), stop - start)
            if split:  # first maximum wins ties, as argmax over the whole softmax would
                candidates = maps[:split]
                if dropped is not None:
                    banned = dropped[owner[start : start + split]].view(-1, 1, 1)
                    candidates = candidates.masked_fill(banned, float("-inf"))
                value, index = candidates.max(dim=0)
                better = value > best
                best = torch.where(better, value, best)
                best_query = torch.where(better, index + start, best_query)
            if split < stop - start:
                background = torch.maximum(background, maps[split:].amax(dim=0))
        return Reduced(peak, total, best, best_query, background)

    def _small_classes(self, reduced: Reduced) -> torch.Tensor | None:
        """Classes (bool, (classes,)) to drop under ``area_threshold``, or None if none labels
        any pixel: a class is kept iff its pixels are more than ``area_threshold`` times all
        class-labelled pixels (background-word pixels excluded; SCLIP's ``area_pred``)."""
        confidence = torch.exp(reduced.best - reduced.peak) / reduced.total
        labelled = reduced.background_probability() <= confidence
        labels = self._query_owner[reduced.best_query][labelled]
        counts = torch.bincount(labels, minlength=len(self.classes))
        dropped = counts <= self.config.area_threshold * counts.sum()
        return dropped if bool((dropped & (counts > 0)).any()) else None

    def _chunk(self, encoded: Encoded, size: tuple[int, int]) -> int:
        """Maps per chunk so that one chunk's largest buffer holds about POSTPROCESS_ELEMENTS."""
        windows = encoded.windows
        pixels = max(
            size[0] * size[1],
            encoded.size[0] * encoded.size[1],
            windows.shape[0] * windows.shape[-2] * windows.shape[-1],
        )
        return max(1, POSTPROCESS_ELEMENTS // pixels)

    def _to_input(
        self,
        maps: torch.Tensor,
        encoded: Encoded,
        size: tuple[int, int],
        refine: bool,
        affinity: torch.Tensor | None,
    ) -> torch.Tensor:
        """Window maps (n, K, h, w) -> (K, H, W) float32 at the input size.

        As NACLIP (``forward_feature``, ``predict``) and SCLIP: bilinear to each window, windows
        averaged into the resized image (H', W'), bilinear to the input size (two steps also
        for the whole image), then PAMR there (``affinity``, when configured). JBU, when
        configured, replaces the first step. Both only when ``refine``: they refine whichever
        maps decide the label.
        """
        jbu = refine and self.config.upsample == "jbu"
        maps = _resize(self.to_image(maps, encoded, jbu), size)
        if refine and affinity is not None:
            maps = pamr_propagate(affinity, maps[None].float())[0]
        return maps.float()

    def _pamr_affinity(self, encoded: Encoded, size: tuple[int, int]) -> torch.Tensor:
        """PAMR's affinity (1, 16, H, W) at the input size, guided by the normalised network
        input upsampled bilinearly to the input size (NACLIP's ``predict``); once per image."""
        guide = F.interpolate(
            self._full_resolution(encoded), size=size, mode="bilinear", align_corners=False
        )
        return pamr_affinity(guide)

    def _best_label(
        self,
        encoded: Encoded,
        scores: torch.Tensor,
        size: tuple[int, int],
        step: int,
        affinity: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W) max and argmax over the refined label scores (n, L, h, w) at the input size,
        taken a chunk of labels at a time (the first maximum wins, as ``argmax``)."""
        best = label = None
        for start in range(0, scores.shape[1], step):
            maps = self._to_input(scores[:, start : start + step], encoded, size, True, affinity)
            value, index = maps.max(dim=0)
            if best is None:
                best, label = value, index + start
            else:
                better = value > best
                best = torch.where(better, value, best)
                label = torch.where(better, index + start, label)
        return best, label

    def to_image(self, maps: torch.Tensor, encoded: Encoded, jbu: bool) -> torch.Tensor:
        """Window maps (n, K, h, w) -> one map of the resized image (K, H', W').

        Each window's patch map is upsampled to the window (bilinear, or JBU guided by the
        window), overlapping windows are averaged (NACLIP's ``forward_slide``). A window whose
        side is not whole patches had its remainder dropped by the patch embedding: its map is
        stretched over the whole window, as in the official code.
        """
        if jbu:
            guide = (encoded.windows.float() * self._std + self._mean).clamp(0, 1)
            weights = _per_frame(encoded, "jbu", lambda: jbu_weights(guide, maps.shape[-2:]))
            maps = joint_bilateral_upsample(maps.float(), guide, weights=weights)
        else:
            maps = F.interpolate(
                maps.float(), size=encoded.windows.shape[-2:], mode="bilinear", align_corners=False
            )
        if len(encoded.boxes) == 1:
            return maps[0]
        total = maps.new_zeros((maps.shape[1], *encoded.size))
        count = maps.new_zeros((1, *encoded.size))
        for (top, left, height, width), window in zip(encoded.boxes, maps, strict=True):
            total[:, top : top + height, left : left + width] += window
            count[:, top : top + height, left : left + width] += 1
        return total / count

    def _full_resolution(self, encoded: Encoded) -> torch.Tensor:
        """The resized input image (1, 3, H', W') reassembled from the windows (PAMR's guide)."""
        image = encoded.windows.new_zeros((1, 3, *encoded.size))
        for (top, left, height, width), window in zip(encoded.boxes, encoded.windows, strict=True):
            image[0, :, top : top + height, left : left + width] = window
        return image.float()


def _window_bytes(visual: torch.nn.Module, windows: torch.Tensor) -> int:
    """The largest activation of one window in the dense forward: its tokens times the MLP's
    hidden width (4 x the model width in CLIP), in the model's dtype."""
    tokens = (windows.shape[-2] // visual.patch_size[0]) * (
        windows.shape[-1] // visual.patch_size[1]
    )
    block = visual.transformer.resblocks[0]
    fc = getattr(getattr(block, "mlp", None), "c_fc", None)
    hidden = fc.out_features if isinstance(fc, torch.nn.Linear) else 4 * visual.conv1.out_channels
    return (tokens + 1) * hidden * windows.element_size()


def _joined(parts: Sequence[DenseOutput]) -> DenseOutput:
    """The dense output of window chunks, in order."""
    affinity = None
    if parts[0].affinity is not None:
        affinity = torch.cat([part.affinity for part in parts])
    return DenseOutput(torch.cat([part.features for part in parts]), affinity)


def _sd2_key(config: EngineConfig) -> tuple[str, ...]:
    """What chooses the SD model: a change of these loads it anew."""
    return tuple(getattr(config, name) for name in SD_LOAD_FIELDS)


def _per_frame(encoded: Encoded, key: str, compute: Callable[[], object]) -> object:
    """``compute()`` once per frame: guide-dependent weights (JBU, PAMR) that every chunk of
    classes in postprocess reuses instead of recomputing them."""
    if key not in encoded.guides:
        encoded.guides[key] = compute()
    return encoded.guides[key]


def _to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Copy results to the host with one synchronisation (pinned buffers on CUDA)."""
    if tensors[0].device.type != "cuda":
        return [t.numpy() for t in tensors]
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, tensor in zip(hosts, tensors, strict=True):
        host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [host.numpy() for host in hosts]


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def _check_fits_model(config: EngineConfig, patch: int) -> None:
    """Settings that depend on the model's patch size; raises ValueError."""
    if config.max_long_side < patch:
        raise ValueError(
            f"max_long_side {config.max_long_side} is below one patch of the model ({patch} px)"
        )
    if config.crop % patch:
        raise ValueError(f"crop {config.crop} must be a multiple of the patch {patch}")
    check_frame_budget(config, patch)
