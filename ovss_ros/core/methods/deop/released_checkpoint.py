"""The DeOP release's model file: every trained part of published DeOP from one detectron2 file.

The release (CongHan0808/DeOP, README "Evaluation"; ``scripts/deop_verifycoco.sh`` loads it as
``MODEL.WEIGHTS model_final.pth``) holds the whole meta-architecture's state dict:

- ``backbone.*``, ``sem_seg_head.*``: the frozen proposal network
  (:mod:`~ovss_ros.core.methods.deop.maskformer_weights`);
- ``clip_adapter.clip_model.*``: OpenAI CLIP ViT-B/16 (open_clip uses the same names), with
  ``visual.learned_position`` and ``visual.transformer.resblocks.{1..5}.learned_position``;
- ``decoder.*`` and ``query_embedding.weight``: the CAL decoder with its 100 slot positions;
- ``clip_adapter.non_object_embedding`` (1, 512): the "no object" text embedding;
- ``clip_adapter.prompt_learner.prefix_prompt`` (16, 512): the learned prompt context;
- ``criterion.*`` and the prompt learner's token buffers: not needed at inference.

CLIP itself is not trained by DeOP: :func:`check_clip_weights` only checks that the node's CLIP
is the one in the file (shapes, and every tensor equal within fp16 rounding).
Every refusal is a :class:`~ovss_ros.core.methods.deop.maskformer_weights.ProposalWeightsError`
naming the file and the first key that does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ovss_ros.core.methods.deop.heads import AnchorDecoder, DeopModules
from ovss_ros.core.methods.deop.maskformer import ProposalNetwork
from ovss_ros.core.methods.deop.maskformer_weights import (
    ProposalWeightsError,
    architecture_of,
    check_values,
    read_released,
    released_state_dict,
)
from ovss_ros.core.methods.deop.released import LearnedPositions, released_decoder_state

CLIP_PREFIX = "clip_adapter.clip_model."
VOID_KEY = "clip_adapter.non_object_embedding"
PROMPT_KEY = "clip_adapter.prompt_learner.prefix_prompt"
MIN_PROMPT_TOKENS = 4  # start, one word, "." (the class template "{}."), end
DECODER_HEADS = 8  # DeOP's decoder: nhead 8 (zero_shot_clipfeat_upsample_..._maskvit.py)
# DeOP's trained tensors besides the proposal network's (checked by released_state_dict)
DEOP_PARTS = ("decoder.", "query_embedding.")
DEOP_KEYS = (VOID_KEY, PROMPT_KEY)
_BLOCK_POSITION = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.learned_position")


@dataclass
class ReleasedDeop:
    """The trained parts of a released DeOP file, in eval mode with gradients off.

    ``modules``: the CAL decoder (slot queries), the "no object" embedding and the prompt
    context, as :class:`~ovss_ros.core.methods.deop.heads.DeopModules`; ``clip_state``: the
    file's CLIP tensors (open_clip names), for :func:`check_clip_weights`.
    """

    source: str
    proposals: ProposalNetwork
    positions: LearnedPositions
    modules: DeopModules
    clip_state: dict[str, torch.Tensor]

    def to(self, device: str | torch.device) -> ReleasedDeop:
        for module in (self.proposals, self.positions, self.modules):
            module.to(device)
        return self


def released_tensors(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path`` (mapped from the file) when it looks like a detectron2 DeOP file
    rather than an ovss_ros checkpoint: a ``torch.save`` dict without ovss_ros's ``format``
    whose state dict has ``backbone.`` keys; None otherwise, and for anything unreadable (the
    ovss_ros loader then says what is wrong). Give them to :func:`load_released_deop`, which
    then does not read the file again."""
    try:
        _, tensors = read_released(path, "DeOP model file")
    except ProposalWeightsError:
        return None
    return tensors if any(key.startswith("backbone.") for key in tensors) else None


def is_released_file(path: str | Path) -> bool:
    """Whether ``path`` is a detectron2 DeOP file (:func:`released_tensors`)."""
    return released_tensors(path) is not None


def load_released_deop(
    path: str | Path, tensors: dict[str, torch.Tensor] | None = None
) -> ReleasedDeop:
    """Read a released DeOP file (see the module docstring); ``tensors``: its tensors read
    already (:func:`released_tensors`). Raises ProposalWeightsError: the file checks of
    ``read_released``, a missing part, or a part whose keys or shapes do not fit."""
    if tensors is None:
        path, tensors = read_released(path, "DeOP model file")
    path = Path(path).expanduser()
    trained = {
        key: value
        for key, value in tensors.items()
        if key.startswith(DEOP_PARTS) or key in DEOP_KEYS or key.endswith(".learned_position")
    }
    check_values(trained, repr(str(path)))  # CLIP's own: compared with the loaded CLIP
    arch = architecture_of(tensors, path)
    proposals = ProposalNetwork(arch)
    proposals.load_state_dict(released_state_dict(tensors, arch, path), strict=False)
    clip_state = {
        k[len(CLIP_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CLIP_PREFIX)
    }
    positions = _positions(clip_state, path)
    decoder = _decoder(tensors, path)
    if decoder.slots != arch.queries:
        raise ProposalWeightsError(
            f"{str(path)!r}: the decoder has {decoder.slots} slot queries "
            f"('query_embedding.weight') but the proposal network {arch.queries} queries; "
            "DeOP ties slot i to MaskFormer query i, so the two must be equal"
        )
    void = _tensor(tensors, VOID_KEY, path).float()
    context = None if PROMPT_KEY not in tensors else _tensor(tensors, PROMPT_KEY, path, ndim=2)
    modules = DeopModules.create(
        decoder.config["dim"],
        decoder={k: v for k, v in decoder.config.items() if k != "dim"},
        void=True,
        prompt=None
        if context is None
        else {"width": context.shape[1], "length": context.shape[0]},
    )
    modules.decoder = decoder
    if tuple(void.shape) != tuple(modules.void.shape):
        raise ProposalWeightsError(
            f"{str(path)!r}: {VOID_KEY!r} has shape {tuple(void.shape)}, the decoder needs "
            f"{tuple(modules.void.shape)}"
        )
    modules.void.data = void
    if context is not None:
        modules.prompt.context.data = context.float()
    released = ReleasedDeop(f"{path} (DeOP release)", proposals, positions, modules, clip_state)
    for module in (proposals, positions, modules):
        module.eval().requires_grad_(False)
    return released


def _tensor(
    tensors: dict[str, torch.Tensor], key: str, path: Path, ndim: int | None = None
) -> torch.Tensor:
    """``tensors[key]``; ProposalWeightsError if it is missing or not ``ndim``-D and
    non-empty."""
    if key not in tensors:
        raise ProposalWeightsError(
            f"{str(path)!r} has no {key!r}: not a DeOP model file (the release's "
            "model_final.pth holds the proposal network, CLIP, the decoder and its embeddings)"
        )
    tensor = tensors[key]
    if ndim is not None and (tensor.ndim != ndim or tensor.numel() == 0):
        raise ProposalWeightsError(
            f"{str(path)!r}: {key!r} has shape {tuple(tensor.shape)}; a non-empty {ndim}-D "
            "tensor is needed"
        )
    return tensor


def _positions(clip_state: dict[str, torch.Tensor], path: Path) -> LearnedPositions:
    """LearnedPositions from the file's ``learned_position`` tensors (popped from the state)."""
    table = _tensor(clip_state, "visual.learned_position", path).float()
    layers = sorted(
        int(match[1]) for key in clip_state if (match := _BLOCK_POSITION.fullmatch(key))
    )
    side = round(max(table.shape[0] - 1, 0) ** 0.5) if table.ndim == 2 else 0
    if side < 1 or side * side + 1 != table.shape[0]:
        raise ProposalWeightsError(
            f"{str(path)!r}: visual.learned_position has shape {tuple(table.shape)}; a "
            "(1 + n*n, width) table is needed"
        )
    positions = LearnedPositions(table.shape[1], layers, side)
    state = {"input": table}
    for index, layer in enumerate(layers):
        key = f"visual.transformer.resblocks.{layer}.learned_position"
        state[f"blocks.{index}"] = clip_state.pop(key).float()
    clip_state.pop("visual.learned_position")
    reason = state_mismatch(positions.state_dict(), state, "the input table")
    if reason:
        raise ProposalWeightsError(f"{str(path)!r}: learned positions: {reason}")
    positions.load_state_dict(state)
    return positions


def _decoder(tensors: dict[str, torch.Tensor], path: Path) -> AnchorDecoder:
    slots, dim = _tensor(tensors, "query_embedding.weight", path, ndim=2).shape
    layers = {key.split(".")[2] for key in tensors if key.startswith("decoder.layers.")}
    feedforward = _tensor(tensors, "decoder.layers.0.linear1.weight", path, ndim=2).shape[0]
    try:
        decoder = AnchorDecoder(
            dim, DECODER_HEADS, layers=len(layers), feedforward=feedforward, slots=slots
        )
        state = {k: v.float() for k, v in released_decoder_state(tensors).items()}
    except KeyError as error:
        raise ProposalWeightsError(f"{str(path)!r} has no {error.args[0]!r}") from None
    except (RuntimeError, ValueError) as error:
        reason = " ".join(str(error).split())[:300]
        raise ProposalWeightsError(f"{str(path)!r}: decoder: {reason}") from None
    reason = state_mismatch(decoder.state_dict(), state)
    if reason:
        raise ProposalWeightsError(f"{str(path)!r}: decoder: {reason}")
    decoder.load_state_dict(state, strict=True)
    return decoder


def state_mismatch(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    needs: str = "the decoder",
) -> str:
    """The first key of ``state`` that does not fit a module's ``expected`` state dict
    (missing, unexpected or of another shape, in that order; ``needs`` names what sets the
    shape) and how many do not; "" when all fit. (``load_state_dict`` lists every one, hundreds
    of lines for a file of another size.)"""
    missing = [key for key in expected if key not in state]
    extra = [key for key in state if key not in expected]
    shaped = [
        key for key in expected if key in state and state[key].shape != expected[key].shape
    ]
    count = len(missing) + len(extra) + len(shaped)
    if not count:
        return ""
    if missing:
        first = f"no {missing[0]!r}"
    elif extra:
        first = f"an unexpected {extra[0]!r}"
    else:
        key = shaped[0]
        first = (
            f"{key!r} has shape {tuple(state[key].shape)}, {needs} needs "
            f"{tuple(expected[key].shape)}"
        )
    return first + (f" ({count} keys do not fit in all)" if count > 1 else "")


def check_clip_weights(released: ReleasedDeop, model: nn.Module) -> None:
    """Raise ProposalWeightsError unless ``model`` (an open_clip CLIP) is the file's CLIP:
    the same tensor names and shapes, and every value equal within fp16 rounding."""
    ours = model.state_dict()
    widths = {
        "the decoder": (released.modules.decoder.config["dim"], model.visual.output_dim),
        "the prompt context": (
            None if released.modules.prompt is None else released.modules.prompt.context.shape[1],
            model.token_embedding.weight.shape[1],
        ),
        "the learned positions": (
            released.positions.input.shape[1],
            model.visual.class_embedding.shape[-1],
        ),
    }
    for part, (width, expected) in widths.items():
        if width is not None and width != expected:
            raise ProposalWeightsError(
                f"{released.source}: {part} is {width} wide, the loaded CLIP's needs {expected}:"
                " set model ViT-B-16 and pretrained openai"
            )
    prompt, window = released.modules.prompt, getattr(model, "context_length", None)
    length = 0 if prompt is None else prompt.context.shape[0]
    if window is not None and length > window - MIN_PROMPT_TOKENS:
        raise ProposalWeightsError(
            f"{released.source}: its learned prompt context has {length} tokens; the loaded "
            f"CLIP reads {window} text tokens, so at most {window - MIN_PROMPT_TOKENS} leave room "
            f"for a class name ({MIN_PROMPT_TOKENS} tokens: start, a word, '.', end)"
        )
    for key, value in released.clip_state.items():  # every shape first: the architecture
        if key not in ours or tuple(ours[key].shape) != tuple(value.shape):
            shape = tuple(ours[key].shape) if key in ours else "no such tensor"
            raise ProposalWeightsError(
                f"{released.source}: its CLIP's {key!r} {tuple(value.shape)} does not fit the "
                f"loaded CLIP ({shape}): DeOP was trained on OpenAI CLIP ViT-B/16; set model "
                "ViT-B-16 and pretrained openai"
            )
    for key, value in released.clip_state.items():
        if not torch.allclose(ours[key].float().cpu(), value.float(), rtol=1e-3, atol=1e-3):
            raise ProposalWeightsError(
                f"{released.source}: the loaded CLIP's {key!r} differs from the file's: DeOP "
                "runs on the CLIP it was trained on; set model ViT-B-16 and pretrained openai"
            )
