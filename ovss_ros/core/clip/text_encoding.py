"""Text embeddings of class names, cached per text so a vocabulary change encodes only new words.

Prompts are cut after the last end-of-text token of the batch before the text tower (the text mask
is causal, so the tokens after the end token never influence it): 10x faster on a CPU with the
same result as open_clip's ``encode_text``.

A prompt longer than the text model's context (CLIP: 77 tokens, start and end included) is
refused (:class:`PromptTooLong`), never cut: the tokenizer would cut it silently, and two names
that differ only after the cut would get one embedding, so the second could never win a pixel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F

from ovss_ros.core.clip.templates import (  # noqa: F401 (re-exported)
    MAX_TEMPLATE_LENGTH,
    MAX_TEMPLATES,
    SINGLE_TEMPLATE,
    template_set,
)
from ovss_ros.core.stopping import check_stop
from ovss_ros.core.vocabulary import ClassEntry, VocabularyError, quoted

SENTENCE = ("{}",)  # class descriptions are encoded as written, without templates
PROMPT_BATCH = 256
# Cached embeddings kept beyond those in use: above this many, TextEncoder.trim forgets the rest
# (a full vocabulary is at most MAX_QUERIES words and MAX_CLASSES x MAX_DESCRIPTIONS sentences).
CACHE_LIMIT = 20000
# A prompt whose token count, summed over its parts (the template around ``{}`` and the text,
# tokenized apart), is this close to the context is tokenized whole: the word boundary where a
# text meets its template moves the count by at most one in practice (test_text_encoding
# measures it on random names with the 80 ImageNet templates).
JUNCTION_SLACK = 4


class PromptTooLong(VocabularyError):
    """A prompt has more tokens than the text model reads; ``str(error)`` says which, the limit."""


def context_length(model: torch.nn.Module, tokenizer: Callable) -> int | None:
    """Tokens the text tower reads, start and end tokens included (open_clip CLIP: 77): the
    smaller of the tokenizer's ``context_length`` and the model's, None if neither says."""
    limits = [
        getattr(tokenizer, "context_length", None),
        getattr(model, "context_length", None),
    ]
    limits = [int(limit) for limit in limits if isinstance(limit, int) and limit > 0]
    return min(limits) if limits else None


def _tokens_without_ends(tokenizer: Callable) -> Callable[[str], int] | None:
    """``text -> tokens of text`` without start/end tokens, for open_clip's tokenizers (BPE
    ``SimpleTokenizer``: ``encode``; Hugging Face ones: their ``tokenizer``); None for others."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):
        return lambda text: len(tokenizer.encode(text))
    inner = getattr(tokenizer, "tokenizer", None)
    if callable(inner):
        return lambda text: len(inner(text, add_special_tokens=False)["input_ids"])
    return None


def _ends(tokenizer: Callable) -> int:
    """Start/end tokens the tokenizer adds around a text (BPE: 2)."""
    inner = getattr(tokenizer, "tokenizer", None)
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id") or not callable(inner):
        return 2
    return len(inner("")["input_ids"])


def check_class_prompts(
    encoder: TextEncoder,
    classes: Sequence[ClassEntry],
    templates: tuple[str, ...],
    background_words: Sequence[str] = (),
    reserve: int = 0,
) -> None:
    """Refuse a vocabulary whose prompts the text model would cut (``check_lengths``), naming
    the class (and the synonym or description): every synonym with ``templates``, each
    description as written, each background word with ``templates``; ``reserve`` tokens of
    the context are taken by something else (a learned prompt context). Raises PromptTooLong."""
    for entry in classes:
        names = [
            "class" if text == entry.name else f"class {quoted(entry.name)}: synonym"
            for text in entry.synonyms
        ]
        encoder.check_lengths(entry.synonyms, templates, names, reserve)
        described = [f"class {quoted(entry.name)}: description"] * len(entry.descriptions)
        encoder.check_lengths(entry.descriptions, SENTENCE, described, reserve)
    words = ["background word"] * len(background_words)
    encoder.check_lengths(background_words, templates, words, reserve)


class TextEncoder:
    """Encodes texts as the normalised mean of their prompt embeddings, with a per-text cache.

    ``stop``: an event checked before every batch of PROMPT_BATCH prompts; once it is set, an
    encoding raises Stopped; the texts whose prompts were all encoded by then stay cached (a
    change that supersedes a stopped one does not encode them again).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable,
        templates: str = "imagenet",
        stop: threading.Event | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.templates = template_set(templates)
        self.stop = stop
        # (templates, text) -> (D,) embedding; sentences are cached under SENTENCE.
        self.cache: dict[tuple[tuple[str, ...], str], torch.Tensor] = {}
        self.prompts_encoded = 0  # counts text-tower work, for tests and diagnostics
        self.context_length = context_length(model, tokenizer)
        self._count = _tokens_without_ends(tokenizer)
        self._ends = _ends(tokenizer)
        self._counts: dict[str, int] = {}  # text -> tokens without start/end (bounded)

    def token_count(self, text: str) -> int | None:
        """Tokens of ``text`` without the start and end tokens (cached); None when the tokenizer
        cannot count apart from the model (then prompts are not checked)."""
        if self._count is None:
            return None
        if text not in self._counts:
            if len(self._counts) > CACHE_LIMIT:
                self._counts = {}
            self._counts[text] = self._count(text)
        return self._counts[text]

    def check_lengths(
        self,
        texts: Sequence[str],
        templates: tuple[str, ...] | None = None,
        names: Sequence[str] | None = None,
        reserve: int = 0,
    ) -> None:
        """Refuse texts whose prompt with one of ``templates`` (default: the current ones) has
        more tokens, start and end included, than the text model reads (``context_length``).

        ``names``: how the reason names each text (default ``text``), e.g. ``class 'tv'``;
        ``reserve``: context tokens taken by something else (a learned prompt context).
        Each text and each template's parts are tokenized once (cached); only a prompt whose
        parts come within JUNCTION_SLACK of the limit is tokenized whole. Raises PromptTooLong
        naming the text, the prompt, its token count and the limit.
        """
        if self.context_length is None or self._count is None:
            return
        limit = self.context_length - reserve
        templates = self.templates if templates is None else templates
        parts = [
            sum(self.token_count(part) for part in template.split("{}", 1))
            for template in templates
        ]
        longest = max(parts, default=0)
        for index, text in enumerate(texts):
            count = self.token_count(text) + self._ends
            if count + longest <= limit - JUNCTION_SLACK:
                continue
            for template, overhead in zip(templates, parts, strict=True):
                if count + overhead <= limit - JUNCTION_SLACK:
                    continue
                prompt = template.format(text)
                tokens = self.token_count(prompt) + self._ends
                if tokens > limit:
                    name = names[index] if names is not None else "text"
                    beside = f" beside {reserve} learned context tokens" if reserve else ""
                    raise PromptTooLong(
                        f"{name} {quoted(text)} is too long for the text model: the prompt "
                        f"{quoted(prompt)} has {tokens} tokens, more than the {limit} it reads"
                        f"{beside} "
                        "(the rest would be cut, so names that differ only after the cut would "
                        "get one embedding): shorten it"
                        + (" or the template" if template != "{}" else "")
                    )

    def set_templates(self, templates: str | tuple[str, ...]) -> None:
        """Use new templates (a template_set string, or its result); raises ValueError if bad.

        Embeddings made with other templates leave the cache; sentence embeddings stay.
        """
        new = templates if isinstance(templates, tuple) else template_set(templates)
        if new != self.templates:
            self.templates = new
            self.cache = {k: v for k, v in self.cache.items() if k[0] in (new, SENTENCE)}

    def trim(self, texts: Sequence[str], sentences: Sequence[str]) -> None:
        """Above CACHE_LIMIT cached embeddings, keep only those of ``texts`` (current templates)
        and ``sentences``: the cache of a long-running node stays bounded."""
        if len(self.cache) > CACHE_LIMIT:
            keep = {(self.templates, t) for t in texts} | {(SENTENCE, s) for s in sentences}
            self.cache = {k: v for k, v in self.cache.items() if k in keep}

    def embeddings(
        self, texts: Sequence[str], templates: tuple[str, ...] | None = None
    ) -> torch.Tensor:
        """(len(texts), D) embeddings with ``templates`` (default: the current ones); only texts
        not in the cache reach the text tower. Raises PromptTooLong (``check_lengths``) before
        encoding anything, Stopped (see ``stop``), or what the model raises (e.g. out of
        memory), leaving the current templates and cached entries unchanged (texts whose
        prompts were all encoded before the error are added to the cache).
        """
        return self._cached(texts, self.templates if templates is None else templates)

    def sentence_embeddings(self, sentences: Sequence[str]) -> torch.Tensor:
        """(len(sentences), D) embeddings of whole sentences (class descriptions): no templates.
        Raises as ``embeddings``."""
        return self._cached(sentences, SENTENCE)

    def _cached(self, texts: Sequence[str], templates: tuple[str, ...]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if (templates, t) not in self.cache]
        if missing:
            self.check_lengths(missing, templates)
            prompts = [template.format(text) for text in missing for template in templates]
            batches: list[torch.Tensor] = []
            done = 0  # texts of ``missing`` cached so far
            for start in range(0, len(prompts), PROMPT_BATCH):
                check_stop(self.stop, f"text prompts {start}..{len(prompts)}")
                batches.append(self.encode_prompts(prompts[start : start + PROMPT_BATCH]))
                done = self._cache_whole(missing, templates, batches, done)
        return torch.stack([self.cache[templates, t] for t in texts])

    def _cache_whole(
        self,
        missing: list[str],
        templates: tuple[str, ...],
        batches: list[torch.Tensor],
        done: int,
    ) -> int:
        """Cache the texts of ``missing`` from index ``done`` on whose prompts are all encoded
        (``batches``: the prompt embeddings so far, in order; the batches are those of a whole
        encoding, so the numbers are the same): an encoding stopped half-way (a superseding
        change, shutdown) keeps what it finished. Returns the new ``done``."""
        encoded = sum(len(batch) for batch in batches) // len(templates)
        if encoded <= done:
            return done
        rows = torch.cat(batches)[done * len(templates) : encoded * len(templates)]
        per_text = F.normalize(rows.float(), dim=-1).reshape(encoded - done, len(templates), -1)
        for text, embedding in zip(
            missing[done:encoded], F.normalize(per_text.mean(dim=1), dim=-1), strict=True
        ):
            self.cache[templates, text] = embedding
        return encoded

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-tower forward, cut after the batch's last end token where the model allows it.

        The end token is where ``encode_text`` pools: the highest token id (``argmax``). The
        cut is not the count of non-zero ids: open_clip's tokenizer gives a lone ``!`` the id 0
        (open_clip issue #453), so ``sign reading "exit!".`` has a 0 before its end token.
        """
        self.prompts_encoded += len(prompts)
        tokens = self.tokenizer(prompts).to(next(self.model.parameters()).device)
        model = self.model
        if not _can_cut(model):
            return model.encode_text(tokens)
        ends = tokens.argmax(dim=-1)  # end-of-text positions, as encode_text pools
        length = int(ends.max()) + 1
        tokens = tokens[:, :length]
        dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(dtype) + model.positional_embedding[:length].to(dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0]), ends]
        return x @ model.text_projection


def _can_cut(model: torch.nn.Module) -> bool:
    """The cut forward mirrors CLIP.encode_text for the built-in causal text tower only."""
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "text_pool_type", "argmax") == "argmax"
        and getattr(model, "attn_mask", None) is not None
        and isinstance(model.text_projection, torch.Tensor)
    )


def query_texts(classes: Sequence[ClassEntry], background_words: Sequence[str]) -> list[str]:
    """The text queries of a vocabulary: every synonym of every class, then the background
    words."""
    return [text for entry in classes for text in entry.synonyms] + list(background_words)


def description_texts(classes: Sequence[ClassEntry]) -> list[str]:
    """Every description sentence of every class, in order."""
    return [sentence for entry in classes for sentence in entry.descriptions]
