"""The trained parts of DeOP: the classification anchor learning (CAL) decoder and its companions.

:class:`AnchorDecoder` follows DeOP's decoder (``TransformerDecoderLinear`` with one
``TransformerDecoderLayerLinear`` and the ``TransformerDecoderOutLayerLinear`` output layer, in
``mask_former/modeling/transformer/transformer.py`` of CongHan0808/DeOP; paper section 3.3):

1. queries, one per proposal, pass a DETR decoder layer (self-attention between proposals,
   cross-attention to the dense CLIP features with sine positions, FFN; post-norm);
2. the output layer (self-attention, norm) then computes per head a *heat map* over the patches,
   ``softmax(q k^T / sqrt(d_head))`` multiplied by the proposal's mask, and pools the *unprojected*
   dense CLIP features with it (each head pools its own channel slice; no output projection),
   so the proposal embedding stays in CLIP's joint space; it is L2-normalised.

Queries: released DeOP's 100 queries are slots tied to its MaskFormer's 100 queries: zero
content and a learned position per slot (``query_embedding = nn.Embedding(100, 512)``), built
with ``slots=100``. Proposals without slot identity (superpixels, clusters, the small proposal
head of ``ovss-train-deop``) use ``slots=0``: linear maps of the proposal's mean CLIP feature
give the query content and the query position (a departure from the release).

:class:`DeopModules` holds everything a checkpoint trains: the decoder, the "no object"
embedding that DeOP appends to the text embeddings (``non_object_embedding``), the optional
learned prompt context and the optional proposal head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ovss_ros.core.methods.deop.prompt_context import PromptContext
from ovss_ros.core.methods.deop.proposals import ProposalHead, sine_positions


class _DecoderLayer(nn.Module):
    """DETR post-norm decoder layer: self-attention, cross-attention, FFN, each add & norm."""

    def __init__(self, dim: int, heads: int, feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, feedforward),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(feedforward, dim),
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, memory, pos, padding):
        q = tgt + query_pos
        tgt = self.norms[0](
            tgt + self.dropout(self.self_attn(q, q, tgt, key_padding_mask=padding)[0])
        )
        attended = self.cross_attn(tgt + query_pos, memory + pos, memory)[0]
        tgt = self.norms[1](tgt + self.dropout(attended))
        return self.norms[2](tgt + self.dropout(self.ffn(tgt)))


def mean_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean of dense features (N, h, w, D) per proposal (N, K, h, w): (N, K, D).

    The plain pooling used without a trained decoder; L2-normalised (an empty mask gives 0).
    """
    pooled = torch.einsum("nkhw,nhwd->nkd", masks.to(features.dtype), features)
    return F.normalize(pooled, dim=-1)


class AnchorDecoder(nn.Module):
    """Classification anchor learning: per proposal a heat map, and the heat-pooled embedding.

    ``forward(features, masks, valid)``: dense CLIP features (N, h, w, D) (normalised, in text
    space), proposal shares of each patch (N, K, h, w) in [0, 1], validity (N, K) bool ->
    proposal embeddings (N, K, D), L2-normalised. ``D`` must divide by ``heads`` and be even.
    With ``slots`` > 0, K must equal ``slots`` (proposal k is query slot k).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        layers: int = 1,
        feedforward: int = 1024,
        dropout: float = 0.1,
        slots: int = 0,
    ) -> None:
        super().__init__()
        if dim % heads or dim % 2:
            raise ValueError(f"decoder width {dim} must be even and divide by heads {heads}")
        self.config = {
            "dim": dim,
            "heads": heads,
            "layers": layers,
            "feedforward": feedforward,
            "dropout": dropout,
        } | ({"slots": slots} if slots else {})
        self.heads = heads
        self.slots = slots
        if slots:  # DeOP's query_embedding: a position per slot, zero content
            self.query_embedding = nn.Embedding(slots, dim)
        else:
            self.query = nn.Linear(dim, dim)
            self.query_pos = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(
            _DecoderLayer(dim, heads, feedforward, dropout) for _ in range(layers)
        )
        self.out_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.out_norm = nn.LayerNorm(dim)
        self.anchor_q = nn.Linear(dim, dim)
        self.anchor_k = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def heat_maps(
        self, features: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Per head and proposal, the masked attention over patches: (N, K, heads, h*w)."""
        n, h, w, dim = features.shape
        dtype = self.out_norm.weight.dtype  # the decoder's (float32 unless made otherwise)
        memory = features.reshape(n, h * w, dim).to(dtype)
        pos = sine_positions((h, w), dim, memory.device).to(dtype)
        flat = masks.reshape(n, masks.shape[1], h * w).to(dtype)
        pooled = F.normalize(torch.einsum("nkp,npd->nkd", flat, memory), dim=-1)
        tgt, query_pos = self.queries(pooled)
        padding = ~valid
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, pos, padding)
        q = tgt + query_pos
        tgt = self.out_norm(
            tgt + self.dropout(self.out_attn(q, q, tgt, key_padding_mask=padding)[0])
        )
        head_dim = dim // self.heads
        q = self.anchor_q(tgt + query_pos).reshape(n, -1, self.heads, head_dim)
        k = self.anchor_k(memory + pos).reshape(n, h * w, self.heads, head_dim)
        logits = torch.einsum("nkhc,nphc->nkhp", q, k) * head_dim**-0.5
        heat = self.dropout(logits.softmax(dim=-1)) * flat[:, :, None, :]
        return heat

    def queries(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query content and position (N, K, D) from the proposals' pooled features."""
        if not self.slots:
            return self.query(pooled), self.query_pos(pooled)
        if pooled.shape[1] != self.slots:
            raise ValueError(f"{pooled.shape[1]} proposals for a decoder of {self.slots} slots")
        query_pos = self.query_embedding.weight[None].expand(pooled.shape[0], -1, -1)
        return torch.zeros_like(query_pos), query_pos

    def forward(
        self, features: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        n, h, w, dim = features.shape
        heat = self.heat_maps(features, masks, valid)
        memory = features.reshape(n, h * w, self.heads, dim // self.heads).to(heat.dtype)
        pooled = torch.einsum("nkhp,nphc->nkhc", heat, memory).reshape(n, -1, dim)
        return F.normalize(pooled, dim=-1)


class DeopModules(nn.Module):
    """Everything ``ovss-train-deop`` trains, rebuilt from ``architecture`` (a plain dict).

    ``architecture``: ``embed_dim`` (CLIP's joint-space width D), ``decoder`` (AnchorDecoder
    keyword arguments, or None for plain mask pooling), ``void`` (bool: a learned "no object"
    text embedding), ``prompt`` (PromptContext arguments or None), ``proposal_head``
    (ProposalHead arguments or None).
    """

    def __init__(self, architecture: dict) -> None:
        super().__init__()
        self.architecture = {k: v for k, v in architecture.items()}
        dim = int(architecture["embed_dim"])
        decoder = architecture.get("decoder")
        self.decoder = (
            AnchorDecoder(**{k: v for k, v in decoder.items() if k != "dim"}, dim=dim)
            if decoder
            else None
        )
        self.void = (
            nn.Parameter(torch.randn(1, dim) * dim**-0.5) if architecture.get("void") else None
        )
        prompt = architecture.get("prompt")
        self.prompt = PromptContext(**prompt) if prompt else None
        head = architecture.get("proposal_head")
        self.proposal_head = ProposalHead(**head) if head else None

    @classmethod
    def create(
        cls,
        embed_dim: int,
        decoder: dict | None = None,
        void: bool = True,
        prompt: dict | None = None,
        proposal_head: dict | None = None,
    ) -> DeopModules:
        """Build with default sub-configurations filled in from the modules' own defaults."""
        return cls(
            {
                "embed_dim": embed_dim,
                "decoder": None if decoder is None else AnchorDecoder(embed_dim, **decoder).config,
                "void": void,
                "prompt": None if prompt is None else PromptContext(**prompt).config,
                "proposal_head": None
                if proposal_head is None
                else ProposalHead(**proposal_head).config,
            }
        )

    def void_embedding(self) -> torch.Tensor | None:
        """The normalised "no object" embedding (1, D), or None."""
        return None if self.void is None else F.normalize(self.void, dim=-1)
