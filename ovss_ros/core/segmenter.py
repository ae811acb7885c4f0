"""The Segmenter: RGB image + vocabulary in, labels and confidence out, whatever the method.

A small facade over the method families (``core/methods/``): it loads CLIP, holds the text
encoder (its cache is shared by every family), the vocabulary in force, the stop event and the
current method (``method``: the dense family's ``DenseMethod``, or the ``Pipeline`` of pnp_ovss /
deop / twostream / superpixel_clip), and delegates segmenting to it.

Every frame is bounded before anything is allocated: the network input keeps the aspect ratio
with its short side at ``short_side`` unless that would make the long side longer than
``max_long_side`` (``resized_size``), so a 16x1 strip costs no more than a 2048x448 frame.

Changes are transactional: ``update`` (``set_classes``, ``reconfigure``) validates, then lets
the method prepare everything slow (the text encoded with the new vocabulary/settings, a Stable
Diffusion model, a VLM or a DeOP checkpoint loaded), and only then swaps the state in; on any
exception (bad input, out of memory, Stopped) everything stays as it was. With a stop event
(``Segmenter(config, stop)``), text encoding and each inference stage raise Stopped once the
event is set.

The two halves can run on two threads (the node does): ``prepare_update`` on one, while
another keeps calling ``segment_many`` with the state in force, then ``commit`` between two
frames on the segmenting thread (``side_encoding``: the encoding's CUDA stream and CPU threads).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ovss_ros.core.clip.image_resize import resized_size
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.clip.text_encoding import (
    SENTENCE,
    TextEncoder,
    check_class_prompts,
    description_texts,
    query_texts,
    template_set,
)
from ovss_ros.core.config import LOAD_FIELDS, PIPELINE_METHODS, EngineConfig, check_fits_model
from ovss_ros.core.method import Method, MethodChange, prepare_for
from ovss_ros.core.method_context import Loaded
from ovss_ros.core.method_pipelines import Pipeline, check_with_clip
from ovss_ros.core.methods.dense.encoded import window_starts
from ovss_ros.core.methods.dslo.sd2_attention import Sd2Attention
from ovss_ros.core.segmentation import Segmentation, check_rgb
from ovss_ros.core.side_encoding import SideEncoding
from ovss_ros.core.stopping import AnyEvent, Stopped
from ovss_ros.core.vocabulary import (
    ClassEntry,
    VocabularyError,
    check_query_count,
    parse_classes,
)

__all__ = [
    "EngineConfig",
    "PreparedUpdate",
    "Segmenter",
    "Stopped",
    "resized_size",
    "window_starts",
]
logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PreparedUpdate:
    """A change made ready by ``Segmenter.prepare_update``, not in force: the config and the
    vocabulary it puts in force, the method's prepared change, and the Segmenter state it was
    prepared against (``generation``: a commit in between makes it stale)."""

    config: EngineConfig
    classes: list[ClassEntry]
    change: MethodChange
    generation: int


class Segmenter:
    """Segments RGB frames into the classes of its vocabulary. Not thread-safe: one caller,
    except that one other thread may run ``prepare_update`` (one at a time, never beside
    ``commit``) while the caller segments.

    ``stop``: optional event shared with the caller's other threads (e.g. the node's shutdown).
    Once set, text encoding (between prompt batches) and ``segment_many`` (between stages and
    batch groups) raise Stopped; the engine never clears it.
    Raises ValueError for a bad config, ModelLoadError when the model (or, for DSLO on the sd2
    affinity, the Stable Diffusion model) cannot be loaded, Stopped.

    ``method``: the method in force. The dense family (``DenseMethod``) for the last-block modes;
    for pnp_ovss, deop, twostream or superpixel_clip a ``Pipeline`` (method_pipelines) built
    from this CLIP (and the VLM or a DeOP checkpoint it loads); switching to or between them in
    ``update`` builds the new one first (transactional too).
    """

    def __init__(self, config: EngineConfig, stop: threading.Event | None = None) -> None:
        config.validate()
        self.config = config
        self.stop = stop
        self.clip = load_clip(config.model, config.pretrained, config.device, config.precision)
        self.method: Method | None = None
        self.check_config(config)
        self.text = TextEncoder(self.clip.model, self.clip.tokenizer, config.templates, stop)
        self.classes: list[ClassEntry] = []
        self.side = SideEncoding(self.clip.device)
        self._generation = 0  # commits so far
        self._commit_prepared(self._prepare(config, [], False))

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def patch(self) -> int:
        return self.clip.patch_size

    @property
    def generation(self) -> int:
        """Changes committed so far: a method prepared beside the frames (``word_segmentation``)
        is stale once it differs."""
        return self._generation

    @property
    def pipeline(self) -> Pipeline | None:
        """The pipeline method's pipeline in force (pnp_ovss, deop, ...), or None (a dense
        method)."""
        return self.method if isinstance(self.method, Pipeline) else None

    @property
    def sd2(self) -> Sd2Attention | None:
        """DSLO's Stable Diffusion model in use, or None."""
        return getattr(self.method, "sd2", None)

    def set_classes(self, entries: Sequence[ClassEntry | str]) -> None:
        """Replace the vocabulary (parse_classes entries), encoding only new texts.

        Raises VocabularyError (invalid, or too many queries with the background words: nothing
        is encoded then), Stopped, or what the text tower raises (e.g. out of memory); on any
        exception the old vocabulary and its embeddings stay in force, unchanged.
        """
        self.update(classes=entries)

    def reconfigure(self, changes: Mapping[str, object] | None = None, **shared: object) -> None:
        """Change runtime settings between frames: ``changes`` by full dotted name
        (``{"dense.crop": 224}``), ``shared`` top-level settings as keywords
        (``method="sclip"``).

        New templates or background words are encoded before anything changes. Raises
        ValueError (unknown or bad setting, a setting that needs a new model, too many queries),
        Stopped, or what the text tower raises; on any exception nothing changes.
        """
        self.update(None, changes, **shared)

    def update(
        self,
        classes: Sequence[ClassEntry | str] | None = None,
        changes: Mapping[str, object] | None = None,
        **shared: object,
    ) -> None:
        """Change the vocabulary and the settings together, as one transaction.

        ``classes``: the new vocabulary (parse_classes entries), or None to keep the one in
        force; ``changes``: settings by full dotted name (``pnp.layer``), ``shared``: top-level
        settings as keywords. Everything is checked and built for the end
        state only, never for a mix of old and new: 1000 new class names with 1000 new
        background words are 2000 text queries, whatever was in force; method pnp_ovss with 3
        classes builds its prompt from those 3, not from the 40 in force. The text is encoded
        (and a VLM, checkpoint or Stable Diffusion model loaded) before anything changes.

        Raises VocabularyError (bad vocabulary, too many queries, a prompt too long for the
        VLM), ValueError (unknown or bad setting, a setting that needs a new model),
        ModelLoadError, Stopped, or what the text tower raises; on any exception nothing
        changes.
        """
        self.commit(self.prepare_update(classes, changes, **shared))

    def prepare_update(
        self,
        classes: Sequence[ClassEntry | str] | None = None,
        changes: Mapping[str, object] | None = None,
        cancel: threading.Event | None = None,
        **shared: object,
    ) -> PreparedUpdate:
        """``update``'s slow half, changing nothing in force: checks, encodes and loads for the
        end state, on the encoding stream (``side_encoding``). May run on a thread of its own
        while another segments (at most one such thread; never beside ``commit``).

        ``cancel``: set, the encoding stops like on the stop event (Stopped), e.g. when a newer
        change supersedes this one; the texts encoded whole by then stay cached. Raises as
        ``update``; then nothing changed.
        """
        config = self._changed_config({**(changes or {}), **shared})
        given = classes is not None
        vocabulary = parse_classes(classes) if given else self.classes
        check_query_count(vocabulary, config.background_words)
        self.check_vocabulary(vocabulary, config)
        stop, self.text.stop = self.text.stop, AnyEvent(self.stop, cancel)
        try:
            with self.side.encoding():
                return self._prepare(config, vocabulary, given)
        finally:
            self.text.stop = stop

    def commit(self, prepared: PreparedUpdate) -> None:
        """Put ``prepared`` in force (cheap: plain assignments, cannot fail) on the segmenting
        thread, between two frames. Raises RuntimeError, changing nothing, if another change
        was committed since it was prepared (it was prepared against an older state)."""
        if prepared.generation != self._generation:
            raise RuntimeError("a change prepared against an older state cannot be committed")
        self._commit_prepared(prepared)

    def discard(self, prepared: PreparedUpdate) -> None:
        """Drop ``prepared`` unapplied, freeing what was loaded for it only."""
        prepared.change.discard()

    def texts_to_encode(
        self,
        classes: Sequence[ClassEntry | str] | None = None,
        changes: Mapping[str, object] | None = None,
    ) -> int:
        """How many texts (class synonyms, background words, descriptions) a change would send
        to the text tower: those not cached with its templates; 0 for a change that keeps the
        vocabulary, templates and background words. For diagnostics: raises ValueError (or
        VocabularyError) for a change ``update`` would refuse."""
        config = self.config.replace(dict(changes or {}))
        vocabulary = parse_classes(classes) if classes is not None else self.classes
        templates = template_set(config.templates)
        same_words = config.background_words == self.config.background_words
        if classes is None and templates == self.text.templates and same_words:
            return 0
        texts = query_texts(vocabulary, config.background_words)
        sentences = description_texts(vocabulary)
        if config.method in PIPELINE_METHODS:
            # The change builds a new pipeline, which encodes every text itself (DeOP with its
            # learned prompt, outside this cache): all of them count.
            return len(dict.fromkeys(texts)) + len(dict.fromkeys(sentences))
        cache = self.text.cache
        return sum((templates, t) not in cache for t in dict.fromkeys(texts)) + sum(
            (SENTENCE, t) not in cache for t in dict.fromkeys(sentences)
        )

    def _changed_config(self, changes: dict[str, object]) -> EngineConfig:
        """The config with ``changes`` (dotted names), checked against this model
        (``check_config``); ValueError for an unknown setting or one that chooses another
        model."""
        config = self.config.replace(changes)  # ValueError: unknown or renamed
        current, wanted = self.config.flat(), config.flat()
        reload = [n for n in LOAD_FIELDS if current[n] != wanted[n]]
        if reload:
            raise ValueError(f"{reload} need a new Segmenter (they choose the model)")
        self.check_config(config)
        return config

    def _prepare(
        self, config: EngineConfig, classes: list[ClassEntry], given: bool
    ) -> PreparedUpdate:
        """The family of ``config.method`` prepares the change of the method in force to
        ``config`` and ``classes`` (the text encoded, a model or a checkpoint loaded; a new
        method when the family changes) without putting it in force."""
        loaded = Loaded(self.clip, self.text, self.stop, self._attempt)
        change = prepare_for(config.method)(self.method, config, classes, given, loaded)
        return PreparedUpdate(config, classes, change, self._generation)

    def _commit_prepared(self, prepared: PreparedUpdate) -> None:
        """Swap ``prepared`` in and release the previous method if it was replaced."""
        previous, method = self.method, prepared.change.method
        # First: a method being prepared beside the frames that fails on what the commit swaps
        # (the text cache) sees a new generation, and is prepared again (``word_segmentation``).
        self._generation += 1
        prepared.change.commit()
        self.config, self.classes, self.method = prepared.config, prepared.classes, method
        if previous is not None and previous is not method:
            previous.release()  # e.g. DSLO's sd2 affinity, not used by the pipelines

    def method_notice(self) -> tuple[str, bool]:
        """(the method that runs, in words; whether it deserves a warning), for logs: e.g. DeOP
        without a checkpoint runs training-free."""
        return self.method.describe()

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
        check_fits_model(config, self.patch)
        if getattr(self, "text", None) is not None:  # None while the constructor runs
            self.check_vocabulary(classes or [], config)
        if getattr(self, "clip", None) is not None:
            check_with_clip(config, self.clip)
        method = self.method  # the worker may replace it meanwhile: one reading
        if method is not None:
            method.check(config, classes)

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

    def _attempt(self, encode: Callable[[], T]) -> T:
        """Run ``encode``; on failure bound the text cache it may have grown, then re-raise."""
        try:
            return encode()
        except BaseException:
            self.text.trim(
                query_texts(self.classes, self.config.background_words),
                description_texts(self.classes),
            )
            raise

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
        for rgb in images:
            check_rgb(rgb)
        with self.side.frames():
            return self.method.segment_many(images)

    def batch_groups(self, images: Sequence[np.ndarray]) -> list[list[int]]:
        """Indices of the images that share one forward pass (the method's rule: those of
        equal network size; PnP-OVSS: one image at a time)."""
        return self.method.batch_groups(images)
