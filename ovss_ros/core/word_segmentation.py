"""Segment one image for a vocabulary of its own, leaving the Segmenter's vocabulary alone.

What the node's ``~/segment`` service does with a request ("segment this frame for these
words"): the method in force is copied for the request's words only, on the Segmenter's loaded
models (CLIP, its text encoder and cache; DSLO's Stable Diffusion model, PnP-OVSS's VLM, a DeOP
checkpoint: reused, never loaded again), with the settings in force (templates, background
words, method settings). The copy segments the image and is dropped; the Segmenter's
vocabulary, method and embeddings are never changed, so the streaming frames before and after
are segmented as if the request had never come.

Two halves, so that the frames never wait for the words' encoding: ``prepare_words`` (the slow
half: the words' texts encoded, the method copy built) runs on a thread beside the frames, on the
encoding stream (``side_encoding``); ``segment_prepared`` (one forward pass) runs on the thread
that segments the frames (the Segmenter is not thread-safe for that), between two frames, while
the Segmenter's ``generation`` is still the one the copy was prepared at (a change put in force
meanwhile may have released what the copy shares: prepare it again). The text encoder may be
encoding a change on the change encoder's thread meanwhile: a newer change superseding that one
stops this encoding too (Stopped, its ``cancel`` being the encoder's stop while it runs): the
caller tries again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from ovss_ros.core.clip.templates import template_set
from ovss_ros.core.clip.text_encoding import TextEncoder
from ovss_ros.core.method_pipelines import Pipeline, build_pipeline
from ovss_ros.core.methods.dense.method import DenseMethod
from ovss_ros.core.segmentation import Segmentation, check_rgb
from ovss_ros.core.segmenter import Segmenter
from ovss_ros.core.vocabulary import ClassEntry, VocabularyError, check_query_count

T = TypeVar("T")


def check_words(segmenter: Segmenter, classes: Sequence[ClassEntry]) -> None:
    """Refuse ``classes`` (parsed, ``parse_classes``) for a one-off segmentation with the
    settings in force, before anything is encoded: none, too many queries with the background
    words, a prompt CLIP's text model would cut, a prompt the method's model cannot take
    (PnP-OVSS's VLM). Raises VocabularyError (a ValueError) with the reason."""
    if not classes:
        raise VocabularyError("no words: give at least one")
    config = segmenter.config
    check_query_count(list(classes), config.background_words)
    segmenter.check_config(config, list(classes))


def segment_with_words(
    segmenter: Segmenter, rgb: np.ndarray, classes: Sequence[ClassEntry]
) -> Segmentation:
    """Segment ``rgb`` (HxWx3 uint8) into ``classes`` (parsed) with the method and settings in
    force, changing nothing of ``segmenter``; labels (HxW uint8 or uint16) and confidence (HxW
    float32) as ``Segmenter.segment``.

    Raises VocabularyError (``check_words``), ValueError for a bad image, Stopped (the node's
    stop, or a superseded change's encoding beside it), or what the text tower or the forward
    pass raise (e.g. out of memory).
    """
    check_rgb(rgb)
    return segment_prepared(segmenter, prepare_words(segmenter, classes), rgb)


def prepare_words(segmenter: Segmenter, classes: Sequence[ClassEntry]) -> DenseMethod | Pipeline:
    """``segment_with_words``'s slow half, for a thread beside the frames: ``classes`` checked
    (``check_words``), their texts encoded on the encoding stream, the method copy built. Raises
    as ``segment_with_words`` (not for the image); ``segmenter`` is left as it is."""
    check_words(segmenter, classes)
    with segmenter.side.encoding():
        return word_method(segmenter, list(classes))


def segment_prepared(
    segmenter: Segmenter, method: DenseMethod | Pipeline, rgb: np.ndarray
) -> Segmentation:
    """Segment ``rgb`` (HxWx3 uint8) with ``method`` (``prepare_words``): one forward pass, on
    the frames' stream, on the thread that segments the frames. Raises ValueError for a bad
    image, Stopped, or what the forward pass raises."""
    check_rgb(rgb)
    with torch.inference_mode(), segmenter.side.frames():
        return method.segment_many([rgb])[0]


class WordsText:
    """The Segmenter's text encoder as a words copy sees it: its model, cache and stop shared,
    the templates its own (those in force when the copy began). The copy's methods set the
    templates of the encoder they hold (``set_templates``, at build or commit): on the shared
    encoder that would put the copy's templates under the streaming method while the worker
    commits a change, or under a change the change encoder prepares, both on other threads."""

    def __init__(self, text: TextEncoder, templates: tuple[str, ...]) -> None:
        self._text = text
        self.templates = templates

    def __getattr__(self, name: str) -> object:
        return getattr(self._text, name)

    def set_templates(self, templates: str | tuple[str, ...]) -> None:
        """This copy's templates (a template_set string, or its result); raises ValueError."""
        self.templates = templates if isinstance(templates, tuple) else template_set(templates)

    def check_lengths(
        self,
        texts: Sequence[str],
        templates: tuple[str, ...] | None = None,
        *more: object,
        **options: object,
    ) -> None:
        """``TextEncoder.check_lengths`` (raises PromptTooLong), with this copy's templates by
        default."""
        templates = self.templates if templates is None else templates
        self._text.check_lengths(texts, templates, *more, **options)

    def embeddings(
        self, texts: Sequence[str], templates: tuple[str, ...] | None = None
    ) -> torch.Tensor:
        """``TextEncoder.embeddings`` ((len(texts), D)), with this copy's templates by default."""
        return self._text.embeddings(texts, self.templates if templates is None else templates)


def word_method(segmenter: Segmenter, classes: list[ClassEntry]) -> DenseMethod | Pipeline:
    """A method like the one in force, ready for ``classes``, sharing the loaded models (the
    text encoder through ``WordsText``: the encoder in force is never changed)."""
    config, current = segmenter.config, segmenter.method
    text = WordsText(segmenter.text, template_set(config.templates))
    if isinstance(current, DenseMethod):
        method = DenseMethod(segmenter.clip, text, config, segmenter.stop)
        # The Stable Diffusion model in force (DSLO's sd2 affinity) is shared, never reloaded;
        # the copy is dropped without ``release``, which would free it.
        method.sd2, method._sd2_key = current.sd2, current._sd2_key
        prepared = method.prepare(config, classes, True, _untrimmed)
        method.commit(prepared)  # the copy's state only (the templates are those in force)
        return method
    return build_pipeline(config, segmenter.clip, text, classes, current, segmenter.stop)


def _untrimmed(encode: Callable[[], T]) -> T:
    """Run ``encode`` without ``Segmenter._attempt``'s trim of the text cache on failure: the
    trim replaces the shared cache, which a change being encoded on another thread is filling."""
    return encode()
