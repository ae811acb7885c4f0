"""Learned prompt context: trainable word vectors in front of each class name (CoOp-style).

DeOP's "learnable" prompt learner (``LearnablePromptExtractor`` in CongHan0808/DeOP,
``mask_former/modeling/clip_adapter/text_prompt.py``; Zhou et al., CoOp, IJCV 2022): the text
tower reads ``[start] ctx_1 .. ctx_M <name tokens> . [end]`` where the M context vectors are
parameters shared by all classes (M = 16, initialised N(0, 0.02), no suffix), and the class
embedding is the projected output at the end token. CLIP stays frozen; only the context learns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn


def supports_prompt_context(model: nn.Module) -> bool:
    """The built-in causal open_clip text tower (argmax pooling at the end token)."""
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "text_pool_type", "argmax") == "argmax"
        and getattr(model, "attn_mask", None) is not None
        and isinstance(model.text_projection, torch.Tensor)
    )


class PromptContext(nn.Module):
    """M context vectors of the text tower's width; :meth:`encode` gives class embeddings."""

    def __init__(self, width: int, length: int = 16, init_std: float = 0.02) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"prompt context length must be >= 1, got {length}")
        self.config = {"width": width, "length": length}
        self.context = nn.Parameter(torch.randn(length, width) * init_std)

    @property
    def length(self) -> int:
        return self.context.shape[0]

    def encode(self, model: nn.Module, tokenizer: Callable, texts: Sequence[str]) -> torch.Tensor:
        """Normalised embeddings (len(texts), D); differentiable with respect to the context.

        Raises ValueError for a model whose text tower is not open_clip's causal transformer.
        A name that does not fit in the text window beside the context is a ValueError.
        """
        if not supports_prompt_context(model):
            raise ValueError("learned prompt context needs an open_clip CLIP text tower")
        device = self.context.device
        tokens = tokenizer([f"{text}." for text in texts]).to(device)  # [start] name . [end]
        lengths = (tokens != 0).sum(dim=1)
        longest = int(lengths.max()) + self.length
        if longest > tokens.shape[1]:
            raise ValueError(
                f"a class name is too long for {self.length} context tokens in the "
                f"{tokens.shape[1]}-token text window"
            )
        tokens = tokens[:, : longest - self.length]
        dtype = model.transformer.get_cast_dtype()
        words = model.token_embedding(tokens).to(dtype)
        context = self.context.to(dtype).unsqueeze(0).expand(len(texts), -1, -1)
        x = torch.cat([words[:, :1], context, words[:, 1:]], dim=1)[:, :longest]
        x = x + model.positional_embedding[:longest].to(dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:longest, :longest])
        x = model.ln_final(x)
        x = x[torch.arange(len(texts), device=device), lengths - 1 + self.length]
        return F.normalize((x @ model.text_projection).float(), dim=-1)
