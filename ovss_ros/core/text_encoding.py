"""Text embeddings of class names, cached per text so a vocabulary change encodes only new words.

Prompts are cut to the longest real prompt before the text tower (the text mask is causal, so the
tokens after the end token never influence it): 10x faster on a CPU with the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F

SINGLE_TEMPLATE = ("a photo of a {}.",)
PROMPT_BATCH = 256


def template_set(templates: str) -> tuple[str, ...]:
    """``imagenet`` (the 80 OpenAI templates), ``single``, or custom templates joined by ``|``."""
    if templates == "imagenet":
        return tuple(fill("{}") for fill in open_clip.OPENAI_IMAGENET_TEMPLATES)
    if templates == "single":
        return SINGLE_TEMPLATE
    custom = tuple(t.strip() for t in templates.split("|") if t.strip())
    if not custom or any("{}" not in t for t in custom):
        raise ValueError(
            f"bad templates {templates!r}: use imagenet, single, or {{}}-templates joined by |"
        )
    return custom


class TextEncoder:
    """Encodes texts as the normalised mean of their prompt embeddings, with a per-text cache."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, templates: str = "imagenet"):
        self.model = model
        self.tokenizer = tokenizer
        self.templates = template_set(templates)
        self.cache: dict[tuple[bool, str], torch.Tensor] = {}
        self.prompts_encoded = 0  # counts text-tower work, for tests and diagnostics

    def set_templates(self, templates: str) -> None:
        """New templates change every templated embedding; sentence embeddings stay cached."""
        new = template_set(templates)
        if new != self.templates:
            self.templates = new
            self.cache = {key: value for key, value in self.cache.items() if not key[0]}

    def embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D) embeddings; only texts not in the cache reach the text tower."""
        return self._cached(texts, self.templates)

    def sentence_embeddings(self, sentences: Sequence[str]) -> torch.Tensor:
        """(len(sentences), D) embeddings of whole sentences (class descriptions): no templates."""
        return self._cached(sentences, ("{}",))

    def _cached(self, texts: Sequence[str], templates: tuple[str, ...]) -> torch.Tensor:
        templated = templates == self.templates  # the key keeps words and sentences apart
        missing = [t for t in dict.fromkeys(texts) if (templated, t) not in self.cache]
        if missing:
            prompts = [template.format(text) for text in missing for template in templates]
            encoded = torch.cat(
                [
                    self.encode_prompts(prompts[i : i + PROMPT_BATCH])
                    for i in range(0, len(prompts), PROMPT_BATCH)
                ]
            )
            per_text = F.normalize(encoded.float(), dim=-1).reshape(
                len(missing), len(templates), -1
            )
            for text, embedding in zip(
                missing, F.normalize(per_text.mean(dim=1), dim=-1), strict=True
            ):
                self.cache[templated, text] = embedding
        return torch.stack([self.cache[templated, t] for t in texts])

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-tower forward, cut to the longest real prompt where the model allows it."""
        self.prompts_encoded += len(prompts)
        tokens = self.tokenizer(prompts).to(next(self.model.parameters()).device)
        model = self.model
        if not _can_cut(model):
            return model.encode_text(tokens)
        length = int((tokens != 0).sum(dim=1).max())
        tokens = tokens[:, :length]
        dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(dtype) + model.positional_embedding[:length].to(dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # end token: highest id
        return x @ model.text_projection


def _can_cut(model: torch.nn.Module) -> bool:
    """The cut forward mirrors CLIP.encode_text for the built-in causal text tower only."""
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "text_pool_type", "argmax") == "argmax"
        and getattr(model, "attn_mask", None) is not None
        and isinstance(model.text_projection, torch.Tensor)
    )
