"""Weights of DeOP's proposal network: the authors' detectron2 checkpoints and a folder format.

**Released checkpoints.** DeOP's release (CongHan0808/DeOP, README) ships detectron2 ``.pth``
files: ``torch.save({"model": state_dict, ...})`` of the whole meta-architecture. The proposal
network's tensors are those under ``backbone.`` and ``sem_seg_head.``, named after detectron2's
modules (``backbone.stem.conv1.norm.running_mean``, ``backbone.res4.22.conv2.weight``,
``sem_seg_head.pixel_decoder.adapter_1.weight``, ``sem_seg_head.predictor.transformer.decoder.
layers.5.self_attn.in_proj_weight``...). :data:`KEY_RULES` maps every tensor of
:class:`~ovss_ros.core.methods.deop.maskformer.ProposalNetwork` (timm / transformers names) to
its detectron2 name, written from the official modules (detectron2 ``resnet.py`` and DeepLab's
stem, MaskFormer's ``pixel_decoder.py``, ``transformer.py``, ``transformer_predictor.py``,
DeOP's ``zero_shot_transformer_predictor.py``). Attention ``in_proj`` tensors are split into the
query, key and value projections in that order (``nn.MultiheadAttention``). FrozenBN has no
``num_batches_tracked``. The file's other tensors (``clip_adapter.*``, ``decoder.*``,
``query_embedding.weight``, ``criterion.*``) are returned untouched for DeOP's own loader.

The architecture is read from the tensors' shapes (depth from res4's block count, the stem from
its layers, widths, queries and decoder layers); what shapes cannot tell (attention heads, res5
dilations) comes from the released configuration (:data:`~.maskformer.R101C`, ``R50``).

**Folder format** (ours): ``config.json`` (format, version, architecture) and
``model.safetensors`` with the network's own names (:func:`save_proposal_network`).

Every refusal is a :class:`ProposalWeightsError` (a ValueError) naming the file, the first key
that does not fit and what to do.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ovss_ros.core.file_checks import (
    FileCheckError,
    check_safetensors,
    check_torch_archive,
    read_json,
)
from ovss_ros.core.methods.deop.maskformer import (
    R50,
    R101C,
    MaskFormerArchitecture,
    ProposalNetwork,
)

FORMAT = "ovss_ros.maskformer"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# A released DeOP file holds the proposal network (~60M parameters), CLIP ViT-B/16 (~150M) and
# possibly the optimiser's state: a few GB at most.
MAX_RELEASED_BYTES = 4 << 30
PROPOSAL_PREFIXES = ("backbone.", "sem_seg_head.")
_NORM = r"(weight|bias|running_mean|running_var)"
_STEM_DEEPLAB = {"0": "conv1", "3": "conv2", "6": "conv3"}
_STEM_NORM_DEEPLAB = {"1": "conv1", "4": "conv2"}
_ATTENTION = {"self_attn": "self_attn", "encoder_attn": "multihead_attn"}
_LAYER_NORMS = {
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
}
_QKV = {"q": 0, "k": 1, "v": 2}


class ProposalWeightsError(ValueError):
    """Proposal-network weights cannot be used; ``str(error)`` says why and what to do."""


# (our name pattern, detectron2 name or a function of the match) for the deeplab stem; the
# basic stem (R50) differs only in its first two rules (:func:`official_name`).
def _backbone_rules(stem: str) -> list[tuple[str, object]]:
    if stem == "deeplab":
        stem_rules: list[tuple[str, object]] = [
            (r"backbone\.conv1\.([036])\.weight", lambda m: f"stem.{_STEM_DEEPLAB[m[1]]}.weight"),
            (rf"backbone\.conv1\.([14])\.{_NORM}", lambda m: f"stem.{_STEM_NORM_DEEPLAB[m[1]]}"
             f".norm.{m[2]}"),
            (rf"backbone\.bn1\.{_NORM}", r"stem.conv3.norm.\1"),
        ]  # fmt: skip
    else:
        stem_rules = [
            (r"backbone\.conv1\.weight", "stem.conv1.weight"),
            (rf"backbone\.bn1\.{_NORM}", r"stem.conv1.norm.\1"),
        ]
    return [
        *stem_rules,
        (r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight",
         lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
        (rf"backbone\.layer(\d)\.(\d+)\.bn(\d)\.{_NORM}",
         lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
        (r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight",
         lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
        (rf"backbone\.layer(\d)\.(\d+)\.downsample\.1\.{_NORM}",
         lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
    ]  # fmt: skip


# transformers' FPN lists its lateral layers from the coarsest (res4) to the finest (res2);
# detectron2 numbers them by stride: adapter_3 / layer_3 for res4 ... adapter_1 / layer_1.
HEAD_RULES: list[tuple[str, object]] = [
    (r"pixel_decoder\.fpn\.stem\.0\.weight", "pixel_decoder.layer_4.weight"),
    (r"pixel_decoder\.fpn\.stem\.1\.(weight|bias)", r"pixel_decoder.layer_4.norm.\1"),
    (r"pixel_decoder\.fpn\.layers\.(\d)\.proj\.0\.weight",
     lambda m: f"pixel_decoder.adapter_{3 - int(m[1])}.weight"),
    (r"pixel_decoder\.fpn\.layers\.(\d)\.proj\.1\.(weight|bias)",
     lambda m: f"pixel_decoder.adapter_{3 - int(m[1])}.norm.{m[2]}"),
    (r"pixel_decoder\.fpn\.layers\.(\d)\.block\.0\.weight",
     lambda m: f"pixel_decoder.layer_{3 - int(m[1])}.weight"),
    (r"pixel_decoder\.fpn\.layers\.(\d)\.block\.1\.(weight|bias)",
     lambda m: f"pixel_decoder.layer_{3 - int(m[1])}.norm.{m[2]}"),
    (r"pixel_decoder\.mask_projection\.(weight|bias)", r"pixel_decoder.mask_features.\1"),
    (r"predictor\.queries_embedder\.weight", "predictor.query_embed.weight"),
    (r"predictor\.input_projection\.(weight|bias)", r"predictor.input_proj.\1"),
    (r"predictor\.decoder\.layers\.(\d+)\.(self_attn|encoder_attn)\.o_proj\.(weight|bias)",
     lambda m: f"predictor.transformer.decoder.layers.{m[1]}.{_ATTENTION[m[2]]}.out_proj.{m[3]}"),
    (r"predictor\.decoder\.layers\.(\d+)\.(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)",
     lambda m: (f"predictor.transformer.decoder.layers.{m[1]}.{_ATTENTION[m[2]]}"
                f".in_proj_{m[4]}", _QKV[m[3]])),
    (r"predictor\.decoder\.layers\.(\d+)\.(\w+_layer_norm)\.(weight|bias)",
     lambda m: f"predictor.transformer.decoder.layers.{m[1]}.{_LAYER_NORMS[m[2]]}.{m[3]}"),
    (r"predictor\.decoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)",
     r"predictor.transformer.decoder.layers.\1.linear\2.\3"),
    (r"predictor\.decoder\.layernorm\.(weight|bias)", r"predictor.transformer.decoder.norm.\1"),
    (r"(mask_embed|class_embed)\.(\d)\.0\.(weight|bias)", r"predictor.\1.layers.\2.\3"),
]  # fmt: skip


def official_name(ours: str, stem: str) -> tuple[str, int | None] | None:
    """The detectron2 key of one of our tensor names, with the chunk of an ``in_proj`` tensor
    (0, 1, 2 = query, key, value) or None; None for a tensor the release does not hold
    (``num_batches_tracked``). Raises KeyError for a name no rule covers (a bug)."""
    if ours.endswith("num_batches_tracked"):
        return None
    if ours.startswith("backbone."):
        rules, prefix = _backbone_rules(stem), "backbone."
    else:
        rules, prefix = HEAD_RULES, "sem_seg_head."
    for pattern, target in rules:
        match = re.fullmatch(pattern, ours)
        if match is None:
            continue
        name = target(match) if callable(target) else match.expand(target)
        name, chunk = name if isinstance(name, tuple) else (name, None)
        return prefix + name, chunk
    raise KeyError(f"no detectron2 name for {ours!r}")


@dataclass
class LoadedProposalNetwork:
    """A proposal network in eval mode, where it came from, and the file's other tensors
    (DeOP's ``clip_adapter.*``, ``decoder.*``, ``query_embedding.weight`` in a released file)."""

    network: ProposalNetwork
    source: str
    other: dict[str, torch.Tensor]


def read_released(
    path: str | Path, what: str = "proposal network checkpoint"
) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tensors of a detectron2 checkpoint (``{"model": state_dict, ...}`` or a bare state
    dict), mapped from the file; non-tensor entries are dropped; ``what`` names the file.

    Raises ProposalWeightsError: not a regular file, not a ``torch.save`` archive, a compressed
    record, over MAX_RELEASED_BYTES (all checked before reading), unreadable, no tensors.
    """
    try:
        path = Path(path).expanduser()
        check_torch_archive(path, what, MAX_RELEASED_BYTES)
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileCheckError as error:
        raise ProposalWeightsError(str(error)) from None
    except Exception as error:  # the unpickler and the zip reader raise many types
        raise ProposalWeightsError(
            f"{what} {str(path)!r} is unreadable ({type(error).__name__}: {str(error)[:300]}): "
            "give the .pth file of the DeOP release or a folder from save_proposal_network"
        ) from None
    state = content.get("model", content) if isinstance(content, dict) else None
    tensors = (
        {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if isinstance(state, dict)
        else {}
    )
    if not tensors:
        raise ProposalWeightsError(
            f"{what} {str(path)!r} holds no state dict (a dict of tensors, or one under "
            "'model'): give the .pth file of the DeOP release"
        )
    return path, tensors


def check_values(state: dict[str, torch.Tensor], where: str) -> None:
    """Raise ProposalWeightsError naming the first tensor of ``state`` (``where``: the file,
    for the message) that is not floating point or not finite: it would give NaN scores."""
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            kind = str(tensor.dtype).removeprefix("torch.")
            raise ProposalWeightsError(f"{where}: {name!r} is {kind}; weights are floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise ProposalWeightsError(
                f"{where}: {name!r} holds NaN or infinite values: the file is damaged"
            )


def architecture_of(tensors: dict[str, torch.Tensor], path: Path) -> MaskFormerArchitecture:
    """The architecture a detectron2 state dict's shapes declare (see the module docstring)."""

    def shape(key: str, ndim: int = 2) -> tuple[int, ...]:
        if key not in tensors:
            raise ProposalWeightsError(
                f"{str(path)!r} has no {key!r}: not a MaskFormer proposal network checkpoint "
                "(the DeOP release's model_final.pth holds one)"
            )
        found = tuple(tensors[key].shape)
        if len(found) != ndim:
            raise ProposalWeightsError(
                f"{str(path)!r}: {key!r} has shape {found}; the proposal network needs a "
                f"{ndim}-D tensor there"
            )
        return found

    deeplab = "backbone.stem.conv3.weight" in tensors
    shape("backbone.stem.conv1.weight", ndim=4)
    res4 = {key.split(".")[2] for key in tensors if key.startswith("backbone.res4.")}
    depth = {6: 50, 23: 101}.get(len(res4))
    if depth is None:
        raise ProposalWeightsError(
            f"{str(path)!r}: res4 has {len(res4)} blocks; a ResNet-50 has 6 and a ResNet-101 23"
        )
    predictor = "sem_seg_head.predictor."
    layers = {
        key.split(".")[5]
        for key in tensors
        if key.startswith(predictor + "transformer.decoder.layers.")
    }
    queries, hidden = shape(predictor + "query_embed.weight")
    embed_layers = len({k for k in tensors if k.startswith(predictor + "class_embed.layers.")})
    last_embed = max(embed_layers // 2 - 1, 0)  # no head at all: layers.0 is named missing
    base = R101C if deeplab else R50
    arch = replace(
        base,
        depth=depth,
        stem="deeplab" if deeplab else "basic",
        conv_dim=shape("sem_seg_head.pixel_decoder.layer_4.weight", ndim=4)[0],
        mask_dim=shape("sem_seg_head.pixel_decoder.mask_features.weight", ndim=4)[0],
        hidden_dim=hidden,
        queries=queries,
        feedforward=shape(predictor + "transformer.decoder.layers.0.linear1.weight")[0],
        decoder_layers=len(layers),
        embedding_dim=shape(predictor + f"class_embed.layers.{last_embed}.weight")[0],
        embed_hidden_dim=shape(predictor + "class_embed.layers.0.weight")[0],
        embed_layers=embed_layers // 2,
    )
    try:
        return arch.check()
    except ValueError as error:
        raise ProposalWeightsError(f"{str(path)!r}: {error}") from None


def released_state_dict(
    tensors: dict[str, torch.Tensor], arch: MaskFormerArchitecture, path: Path
) -> dict[str, torch.Tensor]:
    """Our state dict from a detectron2 one, through :func:`official_name`; raises
    ProposalWeightsError naming the first missing key, the first key of the proposal network
    no tensor of ours takes, or the first shape that differs."""
    with torch.device("meta"):  # names and shapes only
        network = ProposalNetwork(arch)
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, expected in network.state_dict().items():
        target = official_name(name, arch.stem)
        if target is None:
            continue
        key, chunk = target
        if key not in tensors:
            raise ProposalWeightsError(
                f"{str(path)!r} has no {key!r} (for {name}): not a checkpoint of this "
                f"proposal network ({arch.depth} layers, {arch.stem} stem)"
            )
        value = tensors[key]
        if chunk is not None and value.shape[0] % 3 == 0:
            value = value.chunk(3)[chunk]
        if tuple(value.shape) != tuple(expected.shape):
            raise ProposalWeightsError(
                f"{str(path)!r}: {key!r} has shape {tuple(tensors[key].shape)}, the network "
                f"needs {tuple(expected.shape)} for {name}"
            )
        ours[name] = value
        used.add(key)
    check_values({key: tensors[key] for key in sorted(used)}, repr(str(path)))
    unmatched = sorted(
        key for key in tensors if key.startswith(PROPOSAL_PREFIXES) and key not in used
    )
    if unmatched:
        raise ProposalWeightsError(
            f"{str(path)!r}: {unmatched[0]!r} (and {len(unmatched) - 1} more) matches no tensor "
            "of the proposal network: not a checkpoint of DeOP's MaskFormer"
        )
    return ours


def load_proposal_network(
    path: str | Path, device: str | torch.device = "cpu"
) -> LoadedProposalNetwork:
    """A proposal network from a released detectron2 ``.pth`` file or a folder written by
    :func:`save_proposal_network`, in eval mode on ``device`` with gradients off.

    Raises ProposalWeightsError (see :func:`read_released`, :func:`released_state_dict`,
    :func:`read_folder`).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        arch, state = read_folder(path)
        other: dict[str, torch.Tensor] = {}
        source = f"{path} (ovss_ros folder)"
    else:
        path, tensors = read_released(path)
        arch = architecture_of(tensors, path)
        state = released_state_dict(tensors, arch, path)
        other = {k: v for k, v in tensors.items() if not k.startswith(PROPOSAL_PREFIXES)}
        source = f"{path} (detectron2 checkpoint)"
    network = ProposalNetwork(arch)
    missing, unexpected = network.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:  # read_folder and released_state_dict rule this out
        raise ProposalWeightsError(f"{path}: missing {missing[:1]}, unexpected {unexpected[:1]}")
    network.to(device).eval().requires_grad_(False)
    return LoadedProposalNetwork(network, source, other)


def save_proposal_network(network: ProposalNetwork, folder: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created if needed)."""
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "version": VERSION, "architecture": network.arch.to_dict()}
    weights = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    partial = folder / (WEIGHTS_NAME + ".partial")
    save_file(weights, str(partial))
    os.replace(partial, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_folder(folder: Path) -> tuple[MaskFormerArchitecture, dict[str, torch.Tensor]]:
    """The architecture and weights of a :func:`save_proposal_network` folder.

    Raises ProposalWeightsError: no or invalid config.json (format, version, architecture),
    a weights file that is not a valid safetensors file or holds more than the architecture,
    a missing, extra or misshapen tensor.
    """
    from safetensors.torch import load_file

    what = "proposal network folder"
    try:
        config = read_json(folder / CONFIG_NAME, f"{what} config")
    except FileCheckError as error:
        raise ProposalWeightsError(str(error)) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ProposalWeightsError(
            f"{folder}/{CONFIG_NAME} is not an ovss_ros proposal network config (format "
            f"{FORMAT!r})"
        )
    if config.get("version") != VERSION:
        raise ProposalWeightsError(
            f"{folder}/{CONFIG_NAME}: format version {config.get('version')!r}; this ovss_ros "
            f"reads {VERSION}"
        )
    try:
        arch = MaskFormerArchitecture.from_dict(config.get("architecture"))
    except (TypeError, ValueError) as error:
        raise ProposalWeightsError(f"{folder}/{CONFIG_NAME}: architecture: {error}") from None
    with torch.device("meta"):
        expected = ProposalNetwork(arch).state_dict()
    budget = sum(t.numel() * 4 for t in expected.values()) * 2
    try:
        check_safetensors(folder / WEIGHTS_NAME, f"{what} weights", budget)
        state = load_file(str(folder / WEIGHTS_NAME))
    except FileCheckError as error:
        raise ProposalWeightsError(str(error)) from None
    except Exception as error:  # safetensors raises its own types
        raise ProposalWeightsError(f"{folder}/{WEIGHTS_NAME} is unreadable ({error})") from None
    for name, tensor in expected.items():
        if name not in state:
            raise ProposalWeightsError(f"{folder}/{WEIGHTS_NAME} has no {name!r}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ProposalWeightsError(
                f"{folder}/{WEIGHTS_NAME}: {name!r} has shape {tuple(state[name].shape)}, the "
                f"architecture needs {tuple(tensor.shape)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ProposalWeightsError(f"{folder}/{WEIGHTS_NAME}: unexpected tensor {extra[0]!r}")
    return arch, state
