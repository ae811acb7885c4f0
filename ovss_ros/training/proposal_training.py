"""Stage ``proposals``: DeOP's MaskFormer proposal network on the seen classes.

The release's step 2 (``scripts/train_learned_prompts_maskformer.sh``: ``ZeroShotMaskFormer``,
``zero_shot_maskformer_R101c_bs32_60k.yaml`` with ``MASK_FORMER.ONLY_MASKFORMER True``): the
:class:`~ovss_ros.core.methods.deop.maskformer.ProposalNetwork` whose queries are classified by
``100 * cos`` against the frozen CLIP text embeddings of the seen classes (the stage-1 learned
prompt when given, as the release's ``PROMPT_CHECKPOINT``; the prompt templates otherwise) and a
learned "no object" embedding, trained with MaskFormer's set criterion
(:mod:`~ovss_ros.training.set_criterion`, deep supervision over the decoder layers). AdamW 1e-4
(backbone x 0.1), weight decay 1e-4 (none on norms and embeddings), poly, full-model gradient
clipping 0.01, batch 32, 60k iterations, short side in {320..960}, crop 640 padded to 640,
SSD colour augmentation.

Initialisation as MaskFormer's: the transformer decoder's matrices ``xavier_uniform_``
(``Transformer._reset_parameters``, ``transformer/transformer.py``), the input projection
``c2_xavier_fill`` (``transformer_predictor.py``); transformers' MaskFormer modules start at its
own normal(0.02), with which the zero-content queries leave the decoder all alike and the set
criterion cannot tell them apart (every query's mask the same).

Departures: the backbone starts from random weights (the release starts R101c from
detectron2's ImageNet ``R-103.pkl``, which is not shipped here), so its batch norms train with
batch statistics (detectron2's FrozenBN keeps ImageNet's; a random start's statistics (mean 0,
variance 1) would shrink res5 to about 1/100 of its input's scale, near constant in space, and
collapse the queries likewise).

Output: ``<output>/proposal_model.pth`` in the release's detectron2 layout (``backbone.*``,
``sem_seg_head.*``, ``clip_adapter.non_object_embedding``), read by ``load_proposal_network`` and
by stage ``deop``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.clip.text_encoding import TextEncoder
from ovss_ros.core.methods.deop.maskformer import (
    MaskFormerArchitecture,
    ProposalNetwork,
    class_logits,
    prepare_images,
    semantic_inference,
)
from ovss_ros.core.methods.deop.maskformer_weights import ProposalWeightsError, read_released
from ovss_ros.core.methods.deop.prompt_context import PromptContext
from ovss_ros.core.methods.deop.release_writer import (
    proposal_tensors,
    void_tensor,
    write_detectron2,
)
from ovss_ros.core.methods.deop.released_checkpoint import PROMPT_KEY
from ovss_ros.core.vocabulary import ClassEntry
from ovss_ros.training.deop_data import TrainingData, collate
from ovss_ros.training.released_data import SemanticCrops
from ovss_ros.training.set_criterion import set_losses
from ovss_ros.training.stage_loop import (
    StageConfig,
    fingerprint,
    param_groups,
    poly_factor,
    segmentation_miou,
)

OUTPUT_NAME = "proposal_model.pth"


def read_prompt(path: str | Path, width: int) -> torch.Tensor:
    """The learned prompt context (L, width) of a prompt file (stage ``prompt``'s
    ``prompt.pth``, the release's prompt file or its DeOP file). Raises ProposalWeightsError."""
    path, tensors = read_released(path, "prompt file")
    context = tensors.get(PROMPT_KEY)
    if context is None or context.ndim != 2 or context.shape[1] != width or not len(context):
        shape = None if context is None else tuple(context.shape)
        raise ProposalWeightsError(
            f"{str(path)!r}: {PROMPT_KEY!r} is {shape}; a (length, {width}) prompt context for "
            "this CLIP's text tower is needed (stage prompt writes one)"
        )
    if not bool(torch.isfinite(context).all()):
        raise ProposalWeightsError(f"{str(path)!r}: the prompt context is not finite")
    return context.float()


def class_names(data: TrainingData, indices: list[int] | None = None) -> list[str]:
    """The class names (first synonym) of ``data``'s label values ``indices`` (all: None)."""
    chosen = range(len(data.classes)) if indices is None else indices
    return [ClassEntry.parse(data.classes[i]).name for i in chosen]


def text_embeddings(
    clip: LoadedClip, names: list[str], prompt: PromptContext | None, templates: str
) -> torch.Tensor:
    """Normalised class embeddings (K, D): the learned prompt's (differentiable in it) or the
    templates' (no gradient)."""
    if prompt is not None:
        return prompt.encode(clip.model, clip.tokenizer, names).float()
    with torch.no_grad():
        encoder = TextEncoder(clip.model, clip.tokenizer, templates)
        return F.normalize(encoder.embeddings(names).float().to(clip.device), dim=-1)


class ProposalParts(nn.Module):
    """What stage ``proposals`` trains: the network and the "no object" embedding."""

    def __init__(self, arch: MaskFormerArchitecture) -> None:
        super().__init__()
        self.network = maskformer_init(ProposalNetwork(arch))
        dim = arch.embedding_dim
        self.void = nn.Parameter(torch.randn(1, dim) * dim**-0.5)


def maskformer_init(network: ProposalNetwork) -> ProposalNetwork:
    """``network`` with MaskFormer's initialisation of its transformer predictor: every matrix of
    the decoder ``xavier_uniform_`` (``Transformer._reset_parameters``), the input projection
    ``c2_xavier_fill`` (kaiming uniform, a = 1, bias 0); the query embeddings stay N(0, 1).
    Source: ``mask_former/modeling/transformer/transformer.py`` and
    ``transformer_predictor.py`` (MaskFormer, DeOP)."""
    for param in network.predictor.decoder.layers.parameters():
        if param.dim() > 1:
            nn.init.xavier_uniform_(param)
    projection = network.predictor.input_projection
    if projection is not None:  # None where res5's width is the decoder's
        nn.init.kaiming_uniform_(projection.weight, a=1)
        nn.init.zeros_(projection.bias)
    return network


def layer_outputs(
    network: ProposalNetwork, images: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(class embeddings (N, Q, E), mask logits (N, Q, H/4, W/4)) of every decoder layer, the
    last the network's output: each layer's queries after the decoder's shared LayerNorm, as
    MaskFormer's ``aux_outputs`` (``transformer_predictor.py``)."""
    features = network.features(images)
    pixels = network.pixel_decoder(features).last_hidden_state
    decoder = network.predictor.decoder
    captured: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in decoder.layers
    ]
    try:
        network.predictor(features[-1])
    finally:
        for hook in hooks:
            hook.remove()
    outputs = []
    for hidden in captured:
        queries = decoder.layernorm(hidden)
        masks = torch.einsum("nqc,nchw->nqhw", network.mask_embed(queries), pixels)
        outputs.append((network.class_embed(queries), masks))
    return outputs


def to_images(rgb: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> float (B, 3, H, W) 0-255 on ``device``."""
    tensor = torch.as_tensor(np.ascontiguousarray(rgb)).to(device)
    return tensor.permute(0, 3, 1, 2).float()


class ProposalStage:
    """Stage ``proposals`` for :func:`~ovss_ros.training.stage_loop.run_stage`."""

    name = "proposals"
    schedule = staticmethod(poly_factor)

    def __init__(
        self,
        clip: LoadedClip,
        data: TrainingData,
        config: StageConfig,
        arch: MaskFormerArchitecture,
        prompt: torch.Tensor | None = None,
    ) -> None:
        self.clip, self.data, self.config = clip, data, config.validate()
        clip.model.requires_grad_(False)
        text_width = int(clip.model.token_embedding.weight.shape[1])
        self.prompt = None
        if prompt is not None:
            self.prompt = PromptContext(text_width, prompt.shape[0]).to(clip.device)
            self.prompt.context.data = prompt.to(clip.device)
            self.prompt.requires_grad_(False)
        output_dim = int(clip.model.visual.output_dim)
        if arch.embedding_dim != output_dim:
            raise ValueError(
                f"the proposal network's embedding_dim {arch.embedding_dim} must be CLIP's text "
                f"embedding width {output_dim}"
            )
        self.parts = ProposalParts(arch).to(clip.device)
        self.seen_text = self.texts(data.seen)
        network = self.parts.network
        modules = {
            "backbone": network.backbone,
            "head": nn.ModuleList([network.pixel_decoder, network.predictor]),
            "embed": nn.ModuleList([network.mask_embed, network.class_embed]),
        }
        groups = param_groups(modules, config.lr, config.weight_decay)
        groups.append({"params": [self.parts.void], "lr": config.lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    def texts(self, indices: list[int] | None) -> torch.Tensor:
        names = class_names(self.data, indices)
        return text_embeddings(self.clip, names, self.prompt, self.config.templates)

    def trainable(self) -> nn.Module:
        return self.parts

    def frozen_inputs(self) -> dict[str, str]:
        """Fingerprints (``stage_loop.fingerprint``) of the frozen CLIP and the frozen prompt
        context (``--prompt``; "none": the templates)."""
        if not hasattr(self, "_inputs"):
            prompt = None if self.prompt is None else self.prompt.state_dict()
            self._inputs = {
                "CLIP": fingerprint(self.clip.model.state_dict()),
                "prompt (--prompt)": fingerprint(prompt),
            }
        return self._inputs

    def dataset(self, length: int) -> SemanticCrops:
        c = self.config
        return SemanticCrops(
            self.data, c.short_sides, c.crop, c.pad, c.seed, c.color_aug, length=length
        )

    def collate(self, batch: list) -> tuple[np.ndarray, np.ndarray]:
        return collate(batch)

    def losses(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
        rgb, labels = batch
        images, _ = prepare_images(to_images(rgb, self.clip.device))
        targets = torch.as_tensor(labels).long().to(self.clip.device)
        layers = [
            (class_logits(embed, self.seen_text, self.parts.void), masks)
            for embed, masks in layer_outputs(self.parts.network, images)
        ]
        return set_losses(layers, targets)

    def scores(self, rgb: np.ndarray, text: torch.Tensor) -> torch.Tensor:
        """Class scores (K, H, W) of one uint8 frame: MaskFormer's semantic inference."""
        images, (height, width) = prepare_images(to_images(rgb[None], self.clip.device))
        out = self.parts.network(images)
        logits = class_logits(out.class_embeddings, text, self.parts.void)
        masks = F.interpolate(
            out.mask_logits, size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        return semantic_inference(logits, masks[..., :height, :width])[0]

    @torch.no_grad()
    def validate(self, progress: bool) -> dict[str, float]:
        self.parts.eval()
        text = self.texts(None)
        result = segmentation_miou(
            self.data,
            lambda rgb: self.scores(rgb, text),
            self.config.val_size,
            self.config.val_images,
            progress,
        )
        self.parts.train()
        return result

    def write_output(self, output: Path, step: int) -> Path:
        state = proposal_tensors(self.parts.network) | void_tensor(self.parts.void)
        return write_detectron2(output / OUTPUT_NAME, state, step)
