"""Writing DeOP's detectron2 layout: what ``ovss-train-deop`` produces, the release reads back.

The inverse of :func:`~ovss_ros.core.methods.deop.maskformer_weights.released_state_dict` and
:func:`~ovss_ros.core.methods.deop.released.released_decoder_state`: our module names become the
official ones (CongHan0808/DeOP), so a trained proposal network is the release's stage-2 file
(``backbone.*``, ``sem_seg_head.*``, ``clip_adapter.non_object_embedding``), a trained prompt
is the release's prompt file (``clip_adapter.prompt_learner.prefix_prompt``), and a trained
DeOP is the release's ``model_final.pth`` (read by
:func:`~ovss_ros.core.methods.deop.released_checkpoint.load_released_deop`).
Files are ``torch.save({"model": state, "iteration": step})`` as detectron2's checkpointer
writes them, renamed into place whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ovss_ros.core.methods.deop.heads import AnchorDecoder
from ovss_ros.core.methods.deop.maskformer import ProposalNetwork
from ovss_ros.core.methods.deop.maskformer_weights import official_name
from ovss_ros.core.methods.deop.released import LearnedPositions
from ovss_ros.core.methods.deop.released_checkpoint import CLIP_PREFIX, PROMPT_KEY, VOID_KEY

# released_decoder_state's names, the other way round
_DECODER_OFFICIAL = (
    ("self_attn.", "self_attn."),
    ("cross_attn.", "multihead_attn_my."),
    ("ffn.0.", "linear1."),
    ("ffn.3.", "linear2."),
    ("norms.0.", "norm1."),
    ("norms.1.", "norm2."),
    ("norms.2.", "norm3."),
)


def proposal_tensors(network: ProposalNetwork) -> dict[str, torch.Tensor]:
    """The network's state under detectron2's names (``backbone.*``, ``sem_seg_head.*``), the
    query, key and value projections packed into ``in_proj`` tensors in that order."""
    chunks: dict[str, dict[int, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for name, value in network.state_dict().items():
        target = official_name(name, network.arch.stem)
        if target is None:
            continue
        key, chunk = target
        value = value.detach().cpu().float().clone()
        if chunk is None:
            state[key] = value
        else:
            chunks.setdefault(key, {})[chunk] = value
    for key, parts in chunks.items():
        state[key] = torch.cat([parts[index] for index in sorted(parts)])
    return state


def decoder_tensors(decoder: AnchorDecoder) -> dict[str, torch.Tensor]:
    """An AnchorDecoder with slot queries as ``decoder.*`` and ``query_embedding.weight``.

    The output layer's unused value slice of ``multihead_attn_my`` is written as zeros and
    ``decoder.norm`` (auxiliary outputs only) as the identity LayerNorm."""
    if not decoder.slots:
        raise ValueError("only a decoder with slot queries (slots > 0) has the release's layout")
    state: dict[str, torch.Tensor] = {}
    for name, value in decoder.state_dict().items():
        value = value.detach().cpu().float().clone()
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            for ours, theirs in _DECODER_OFFICIAL:
                if rest.startswith(ours):
                    state[f"decoder.layers.{index}.{theirs}{rest[len(ours) :]}"] = value
                    break
        elif name.startswith("out_attn."):
            state["decoder.outlayer.self_attn." + name[len("out_attn.") :]] = value
        elif name.startswith("out_norm."):
            state["decoder.outlayer.norm1." + name[len("out_norm.") :]] = value
        elif name == "query_embedding.weight":
            state[name] = value
    dim = decoder.config["dim"]
    for part in ("weight", "bias"):
        query = decoder.anchor_q.state_dict()[part].detach().cpu().float()
        key = decoder.anchor_k.state_dict()[part].detach().cpu().float()
        state[f"decoder.outlayer.multihead_attn_my.in_proj_{part}"] = torch.cat(
            [query, key, torch.zeros_like(query)]
        )
    state["decoder.norm.weight"] = torch.ones(dim)
    state["decoder.norm.bias"] = torch.zeros(dim)
    return state


def position_tensors(positions: LearnedPositions) -> dict[str, torch.Tensor]:
    """Learned positions under the release's CLIP names (``clip_adapter.clip_model.`` prefix)."""
    state = {CLIP_PREFIX + "visual.learned_position": positions.input.detach().cpu().float()}
    for layer, table in zip(positions.layers, positions.blocks, strict=True):
        key = f"{CLIP_PREFIX}visual.transformer.resblocks.{layer}.learned_position"
        state[key] = table.detach().cpu().float().clone()
    return state


def clip_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen CLIP's state (open_clip names = OpenAI's) under ``clip_adapter.clip_model.``."""
    return {CLIP_PREFIX + k: v.detach().cpu().float() for k, v in model.state_dict().items()}


def void_tensor(void: torch.Tensor) -> dict[str, torch.Tensor]:
    return {VOID_KEY: void.detach().cpu().float().reshape(1, -1).clone()}


def prompt_tensor(context: torch.Tensor) -> dict[str, torch.Tensor]:
    return {PROMPT_KEY: context.detach().cpu().float().clone()}


def write_detectron2(path: str | Path, state: dict[str, torch.Tensor], iteration: int) -> Path:
    """``torch.save({"model": state, "iteration": iteration})`` written to a temporary name and
    renamed into place (a reader never sees half a file)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": state, "iteration": iteration}, partial)
    os.replace(partial, path)
    return path
