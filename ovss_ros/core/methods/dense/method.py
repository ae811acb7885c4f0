"""The dense CLIP family as one method: NACLIP, SCLIP, ClearCLIP, MaskCLIP, vanilla and the
FreeCP variants, with DSLO / FreeCP refinement, PAMR and JBU.

One frame goes through four stages, each a method so that benchmarks can time them:
``preprocess`` (resize the uint8 image as OpenCV does, normalise on the model's device),
``encode`` (the dense CLIP forward, whole image or a batch of sliding windows), ``head``
(patch-text logits and the optional DSLO / FreeCP refinement) and ``postprocess`` (upsampling,
optional PAMR, softmax, synonyms, background; only labels and confidence return to the host;
``postprocess.py``).

Changes come in two steps: ``prepare`` encodes the text queries of a new vocabulary / settings
(and loads Stable Diffusion 2 for DSLO's sd2 affinity) without changing anything, ``commit``
swaps them in and cannot fail half-way. The Segmenter (``core/segmenter.py``) drives them.

Confidence is always CLIP's probability of the chosen class (softmax over all queries, max over
the class's synonyms), also when a refinement chose the class, so ``score_threshold`` means the
same thing for every method.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ovss_ros.core.clip.image_resize import opencv_bilinear_resize, resized_size
from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.clip.text_encoding import TextEncoder, query_texts, template_set
from ovss_ros.core.config import EngineConfig
from ovss_ros.core.frame_budget import rows_per_chunk
from ovss_ros.core.method_context import Loaded
from ovss_ros.core.methods.dense import fused
from ovss_ros.core.methods.dense.encoded import (
    Encoded,
    TextQueries,
    joined,
    window_bytes,
    window_starts,
)
from ovss_ros.core.methods.dense.forward import DenseOutput, dense_forward
from ovss_ros.core.methods.dense.postprocess import DensePostprocess
from ovss_ros.core.methods.dslo.dslo import dslo_scores
from ovss_ros.core.methods.dslo.sd2_attention import Sd2Attention
from ovss_ros.core.methods.freecp.freecp import freecp, make_crop_classifier
from ovss_ros.core.segmentation import Segmentation, check_rgb
from ovss_ros.core.stopping import check_stop
from ovss_ros.core.vocabulary import ClassEntry

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DensePrepared:
    """What ``DenseMethod.prepare`` made for a change, not yet in force."""

    config: EngineConfig
    classes: list[ClassEntry]
    templates: list[str]
    sd2: Sd2Attention | None
    sd2_key: tuple | None
    queries: TextQueries | None  # None: the text state in force stays


class DenseMethod(DensePostprocess):
    """The dense family behind the Segmenter. Not thread-safe: one caller.

    Shares the Segmenter's loaded CLIP (``clip``), text encoder (its cache and templates) and
    stop event. ``stop`` set: text encoding and each stage raise Stopped.
    """

    def __init__(
        self,
        clip: LoadedClip,
        text: TextEncoder,
        config: EngineConfig,
        stop: threading.Event | None = None,
    ) -> None:
        self.clip, self.text, self.config, self.stop = clip, text, config, stop
        self.classes: list[ClassEntry] = []
        self.sd2: Sd2Attention | None = None  # the sd2 affinity's model, while in use
        self._sd2_key: tuple | None = None  # (dslo.sd.model, .precision) of self.sd2
        self._text_embeddings: torch.Tensor | None = None  # (queries, D)
        self._query_owner: torch.Tensor | None = None  # query -> label; len(classes) = background
        self._class_queries = 0  # queries [0, this) are class synonyms, the rest background words
        self._class_text: torch.Tensor | None = None  # (classes, D) mean over synonyms
        self._descriptions: torch.Tensor | None = None  # (classes, D) for FreeCP's crop check
        device, dtype = self.clip.device, torch.float32
        self._mean = torch.tensor(self.clip.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
        self._std = torch.tensor(self.clip.std, device=device, dtype=dtype).view(1, 3, 1, 1)
        fused.warm_up(device)  # the CPU kernel ready before the first frame

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def patch(self) -> int:
        return self.clip.patch_size

    def prepare(
        self,
        config: EngineConfig,
        classes: list[ClassEntry],
        given: bool,
        attempt: Callable[[Callable[[], T]], T],
    ) -> DensePrepared:
        """Everything a change to ``config`` / ``classes`` needs, without changing any state:
        the text queries (encoded through ``attempt``, which bounds the text cache on failure)
        when the vocabulary, templates or background words change, and the Stable Diffusion
        model when a new one is needed. Raises what encoding or loading raises; a model loaded
        here is released then."""
        templates = template_set(config.templates)
        encode = bool(classes) and (
            given
            or self._text_embeddings is None  # new to this family: no text state yet
            or (templates, config.background_words)
            != (self.text.templates, self.config.background_words)
        )
        sd2, sd2_key = self._sd2_for(config)  # loads a new SD model only if needed
        queries = None
        try:
            if encode:
                queries = attempt(lambda: self._encode_queries(classes, config))
        except BaseException:
            if sd2 is not None and sd2 is not self.sd2:
                sd2.release()
            raise
        return DensePrepared(config, classes, templates, sd2, sd2_key, queries)

    def commit(self, prepared: DensePrepared) -> None:
        """Swap ``prepared`` in: nothing here can fail (the SD settings were checked)."""
        sd2, config = prepared.sd2, prepared.config
        if sd2 is not None and sd2 is self.sd2:
            sd2.reconfigure(**config.sd2_settings())
        previous, self.sd2, self._sd2_key = self.sd2, sd2, prepared.sd2_key
        if previous is not None and previous is not sd2:
            previous.release()  # no longer used, or replaced by another model
        self.config, self.classes = config, prepared.classes
        self.text.set_templates(prepared.templates)
        if prepared.queries is not None:
            self._swap_in(prepared.queries)

    def release(self) -> None:
        """Free the Stable Diffusion model, if one is loaded."""
        previous, self.sd2, self._sd2_key = self.sd2, None, None
        if previous is not None:
            previous.release()

    def describe(self) -> tuple[str, bool]:
        """(the method that runs, in words; whether it deserves a warning), for logs: e.g.
        ``naclip + dslo (velocity, naclip affinity)``, ``sclip + freecp (redundancy 0.15,
        ambiguity 0.7)``."""
        config = self.config
        refinement = {"dslo": config.dslo, "freecp": config.freecp}.get(config.refinement)
        return f"{config.method}{f' + {refinement.summary()}' if refinement else ''}", False

    def check(self, config: EngineConfig, classes: Sequence[ClassEntry] | None = None) -> None:
        """The sd settings of ``config`` against the SD model in use, when ``config`` keeps it;
        ValueError. The node calls this from its executor thread while the worker may be
        replacing the model: a model released meanwhile is not checked here, the worker's
        change checks the settings again."""
        sd2, key = self.sd2, self._sd2_key
        if config.uses_sd2 and sd2 is not None and config.sd2_key() == key:
            try:
                sd2.check(**config.sd2_settings())
            except RuntimeError:  # released by the worker meanwhile
                pass

    def _sd2_for(self, config: EngineConfig) -> tuple[Sd2Attention | None, tuple | None]:
        """The SD model ``config`` needs (None if none) and its key, without changing state.

        The one in use when ``config`` keeps its model and precision (its new settings checked
        by ``check_config``), else a new one loaded on the CLIP model's device. Raises
        ModelLoadError (what to set), ValueError (a setting this SD model refuses), Stopped
        (checked before and after loading; a model loaded meanwhile is released).
        """
        if not config.uses_sd2:
            return None, None
        key = config.sd2_key()
        if self.sd2 is not None and key == self._sd2_key:
            return self.sd2, key
        check_stop(self.stop, "loading the Stable Diffusion model")
        sd2 = Sd2Attention.load(
            config.dslo.sd.model,
            device=str(self.clip.device),
            precision=config.dslo.sd.precision,
            **config.sd2_settings(),
        )
        if self.stop is not None and self.stop.is_set():
            sd2.release()
            check_stop(self.stop, "loading the Stable Diffusion model")
        logger.info("Stable Diffusion model %s loaded on %s", config.dslo.sd.model, sd2.device)
        return sd2, key

    def _encode_queries(self, classes: list[ClassEntry], config: EngineConfig) -> TextQueries:
        """One text query per synonym and background word (``owner`` maps queries to labels),
        computed for ``classes`` and ``config`` without touching the current state."""
        texts = query_texts(classes, config.background_words)
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

    @torch.inference_mode()
    def segment_many(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        """Segment images (HxWx3 uint8 RGB, checked by the caller): one forward per group of
        equal network size; Stopped once the stop event is set (before each stage of each batch
        group and between postprocess's query chunks)."""
        sizes = [check_rgb(rgb) for rgb in images]
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

    def encode(self, pixels: torch.Tensor) -> Encoded:
        """Dense forward of images (N, 3, H', W'), whole or as sliding windows, in one batch."""
        config = self.config
        height, width = pixels.shape[-2:]
        if config.dense.crop:
            stride = config.dense.stride or config.dense.crop // 2
            boxes = [
                (top, left, min(config.dense.crop, height), min(config.dense.crop, width))
                for top in window_starts(height, config.dense.crop, stride)
                for left in window_starts(width, config.dense.crop, stride)
            ]
            crops = [pixels[..., y : y + h, x : x + w] for y, x, h, w in boxes]
            windows = torch.stack(crops, dim=1).flatten(0, 1)  # image-major
        else:
            boxes, windows = [(0, 0, height, width)], pixels
        affinity = {"dslo": config.dslo.affinity, "freecp": "mean"}.get(config.refinement)
        clip_affinity = None if affinity == "sd2" else affinity
        visual = self.clip.model.visual
        step = rows_per_chunk(window_bytes(visual, windows), len(windows))
        parts = [
            dense_forward(
                visual, part, config.method, clip_affinity, config.dense.pos_interpolation
            )
            for part in windows.split(step)
        ]
        dense = parts[0] if len(parts) == 1 else joined(parts)
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
                mode=config.dslo.mode,
                sinkhorn_iters=config.dslo.sinkhorn_iterations,
                epsilon=config.dslo.sinkhorn_epsilon,
                ipf_rounds=config.dslo.ipf_rounds,
                tau=config.dslo.velocity_tau,
                logit_scale=config.dense.logit_scale,
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
            redundancy_threshold=self.config.freecp.redundancy,
            ambiguity_threshold=self.config.freecp.ambiguity,
            crop_classifier=classify,
            background_text=background if len(background) else None,
        )


def update_dense(
    current: object, config: EngineConfig, classes: list[ClassEntry], given: bool, loaded: Loaded
) -> DenseMethod:
    """The dense family's update (``core.method.FamilyUpdate``): the DenseMethod in force, or a
    new one on the loaded CLIP, with the change prepared (text encoded, an SD model loaded),
    then committed. On any exception the method in force is unchanged."""
    dense = current if isinstance(current, DenseMethod) else None
    dense = dense or DenseMethod(loaded.clip, loaded.text, config, loaded.stop)
    dense.commit(dense.prepare(config, classes, given, loaded.attempt))
    return dense
