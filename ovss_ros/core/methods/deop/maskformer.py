"""DeOP's proposal network: a MaskFormer whose classifier is CLIP's text space.

Published DeOP (Han et al., ICCV 2023; CongHan0808/DeOP) runs a frozen ``ZeroShotMaskFormer``
(``mask_former/zero_shot_mask_former_model.py``) trained on COCO-Stuff's 156 seen classes. Its
100 queries give 100 soft masks at 1/4 of the image that drive DeOP's severed last CLIP block
and its decoder. This module is that network, built from library parts:

- backbone: timm's ResNet (``timm.models.resnet``). R101c (``configs/.../zero_shot_maskformer_
  R101c_bs32_60k.yaml``) is detectron2's DeepLab ResNet-101: a deep stem of three 3x3 convs
  (64, 64, 128 channels; timm's ``stem_type="deep", stem_width=64``), the stride in the 3x3
  conv (``STRIDE_IN_1X1: False``, as timm), and res5 blocks dilated 1, 2, 4 with res5's stride
  kept (``RES5_MULTI_GRID``). R50 is the basic 7x7 stem. Frozen BN = BatchNorm in eval mode.
- pixel decoder: transformers' MaskFormer FPN (``MaskFormerPixelDecoder`` = detectron2
  MaskFormer's ``BasePixelDecoder``: GroupNorm(32), nearest upsampling, no transformer encoder).
- transformer predictor: transformers' ``MaskFormerTransformerModule`` (sine positions with 128
  features per axis, normalised; 100 learned query positions on zero content; 6 post-norm DETR
  decoder layers on the 1x1-projected res5; the shared final LayerNorm).
- heads: ``mask_embed`` MLP 256-256-256 (3 layers) dotted with the per-pixel embeddings gives the
  mask logits; ``class_embed`` MLP 256-1024-512 (2 layers) gives each query an embedding
  classified by ``100 * cos`` against CLIP text embeddings plus a learned "no object" row
  (``zero_shot_transformer_predictor.py``, ``adapter.py`` ``get_sim_logits``).

Input: ImageNet mean/std on 0-255 RGB, padded with 0 (after normalisation) to a multiple of 32
(``MaskFormer.forward``, ``MASK_FORMER.SIZE_DIVISIBILITY``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck, ResNet
from torch import nn
from transformers import MaskFormerConfig, MaskFormerDetrConfig
from transformers.models.maskformer.modeling_maskformer import (
    MaskformerMLPPredictionHead,
    MaskFormerPixelDecoder,
    MaskFormerTransformerModule,
)

# detectron2 PIXEL_MEAN / PIXEL_STD of the configs (Base-COCOStuff164K-171.yaml), RGB, 0-255.
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)
SIZE_DIVISIBILITY = 32  # MASK_FORMER.SIZE_DIVISIBILITY
MASK_STRIDE = 4  # masks at 1/4 of the (padded) input
CLASS_LOGIT_SCALE = 100.0  # fixed temperature of ZeroShotMaskFormer's cosine logits
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STEMS = ("deeplab", "basic")
MAX_WIDTH = 1 << 14


@dataclass(frozen=True)
class MaskFormerArchitecture:
    """The sizes of a proposal network; the defaults are DeOP's R101c (the released one).

    Raises ValueError (``check``) for a size no network can have.
    """

    depth: int = 101  # RESNETS.DEPTH: 50 or 101
    stem: str = "deeplab"  # RESNETS.STEM_TYPE: deeplab (R101c) or basic (R50)
    res5_multi_grid: tuple[int, ...] = (1, 2, 4)  # RESNETS.RES5_MULTI_GRID (deeplab only)
    conv_dim: int = 256  # SEM_SEG_HEAD.CONVS_DIM
    mask_dim: int = 256  # SEM_SEG_HEAD.MASK_DIM
    hidden_dim: int = 256  # MASK_FORMER.HIDDEN_DIM
    queries: int = 100  # MASK_FORMER.NUM_OBJECT_QUERIES
    heads: int = 8  # MASK_FORMER.NHEADS
    feedforward: int = 2048  # MASK_FORMER.DIM_FEEDFORWARD
    decoder_layers: int = 6  # MASK_FORMER.DEC_LAYERS
    embedding_dim: int = 512  # SEM_SEG_HEAD.EMBEDDING_DIM (the CLIP text width)
    embed_hidden_dim: int = 1024  # SEM_SEG_HEAD.EMBED_HIDDEN_DIM
    embed_layers: int = 2  # SEM_SEG_HEAD.EMBED_LAYERS

    def check(self) -> MaskFormerArchitecture:
        """Return self, or raise ValueError naming the first impossible field."""
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(STAGE_BLOCKS)}, got {self.depth!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        grid = self.res5_multi_grid
        if len(grid) != STAGE_BLOCKS[self.depth][3] or not all(1 <= g <= 16 for g in grid):
            raise ValueError(
                f"res5_multi_grid must give {STAGE_BLOCKS[self.depth][3]} dilations in 1..16, "
                f"got {grid!r}"
            )
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and not 1 <= value <= MAX_WIDTH:
                raise ValueError(f"{field.name} must be in 1..{MAX_WIDTH}, got {value}")
        if self.conv_dim % 32 or self.hidden_dim % self.heads or self.hidden_dim % 2:
            raise ValueError(
                "conv_dim must divide by 32 (GroupNorm) and hidden_dim by heads and 2, got "
                f"conv_dim {self.conv_dim}, hidden_dim {self.hidden_dim}, heads {self.heads}"
            )
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "res5_multi_grid": list(self.res5_multi_grid)}

    @classmethod
    def from_dict(cls, values: dict) -> MaskFormerArchitecture:
        """From ``to_dict``'s form; raises ValueError for an unknown key or a wrong type."""
        known = {field.name: field for field in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown architecture field {unknown[0]!r}")
        checked = dict(values)
        for name, value in values.items():
            if name == "res5_multi_grid":
                if not isinstance(value, list | tuple) or not all(_is_int(v) for v in value):
                    raise ValueError(f"res5_multi_grid must be a list of integers, got {value!r}")
                checked[name] = tuple(value)
            elif name == "stem":
                if not isinstance(value, str):
                    raise ValueError(f"stem must be a string, got {value!r}")
            elif not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        return cls(**checked).check()


R101C = MaskFormerArchitecture()
R50 = MaskFormerArchitecture(depth=50, stem="basic", res5_multi_grid=(1, 1, 1))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resnet_backbone(arch: MaskFormerArchitecture) -> ResNet:
    """timm's ResNet in detectron2's layout for ``arch`` (module names are timm's)."""
    deep = arch.stem == "deeplab"
    net = ResNet(
        Bottleneck,
        list(STAGE_BLOCKS[arch.depth]),
        num_classes=0,
        global_pool="",
        stem_type="deep" if deep else "",
        stem_width=64,
    )
    if deep:  # DeepLab multi-grid: res5's 3x3 convs dilated per block, its stride kept
        for block, dilation in zip(net.layer4, arch.res5_multi_grid, strict=True):
            block.conv2.dilation = (dilation, dilation)
            block.conv2.padding = (dilation, dilation)
    return net


@dataclass
class ProposalOutput:
    """``mask_logits`` (N, Q, H/4, W/4) before the sigmoid, on the padded input's grid;
    ``class_embeddings`` (N, Q, E) unnormalised, in CLIP's text space."""

    mask_logits: torch.Tensor
    class_embeddings: torch.Tensor


class ProposalNetwork(nn.Module):
    """MaskFormer with a CLIP-text classifier (see the module docstring).

    ``forward(images)``: normalised, padded images (N, 3, H, W) with H and W multiples of 32
    (:func:`prepare_images`) -> :class:`ProposalOutput`. Raises ValueError for other sizes.
    """

    def __init__(self, arch: MaskFormerArchitecture = R101C) -> None:
        super().__init__()
        self.arch = arch.check()
        self.backbone = resnet_backbone(arch)
        channels = [256, 512, 1024, 2048]
        self.pixel_decoder = MaskFormerPixelDecoder(
            in_features=channels[-1],
            lateral_widths=channels[:-1],
            feature_size=arch.conv_dim,
            mask_feature_size=arch.mask_dim,
        )
        decoder = MaskFormerDetrConfig(
            d_model=arch.hidden_dim,
            decoder_layers=arch.decoder_layers,
            decoder_attention_heads=arch.heads,
            decoder_ffn_dim=arch.feedforward,
            num_queries=arch.queries,
            dropout=0.1,  # MASK_FORMER.DROPOUT (training only)
            auxiliary_loss=False,
        )
        self.predictor = MaskFormerTransformerModule(
            channels[-1], MaskFormerConfig(decoder_config=decoder, backbone_config=None)
        )
        self.mask_embed = MaskformerMLPPredictionHead(
            arch.hidden_dim, arch.hidden_dim, arch.mask_dim, num_layers=3
        )
        self.class_embed = MaskformerMLPPredictionHead(
            arch.hidden_dim, arch.embed_hidden_dim, arch.embedding_dim, arch.embed_layers
        )

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """res2..res5 (strides 4, 8, 16, 32; 256..2048 channels) of the backbone."""
        net = self.backbone
        x = net.maxpool(net.act1(net.bn1(net.conv1(images))))
        outputs = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward(self, images: torch.Tensor) -> ProposalOutput:
        height, width = images.shape[-2:]
        if images.ndim != 4 or height % SIZE_DIVISIBILITY or width % SIZE_DIVISIBILITY:
            raise ValueError(
                f"images must be (N, 3, H, W) with H and W multiples of {SIZE_DIVISIBILITY}, "
                f"got {tuple(images.shape)}: use prepare_images"
            )
        features = self.features(images)
        pixel_embeddings = self.pixel_decoder(features).last_hidden_state  # (N, C, H/4, W/4)
        queries = self.predictor(features[-1]).last_hidden_state  # (N, Q, hidden)
        mask_logits = torch.einsum("nqc,nchw->nqhw", self.mask_embed(queries), pixel_embeddings)
        return ProposalOutput(mask_logits, self.class_embed(queries))


def prepare_images(rgb: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """0-255 RGB (N, 3, H, W) -> ImageNet-normalised images padded with 0 at the bottom and
    right to multiples of 32, and the unpadded (H, W) (detectron2 ``ImageList.from_tensors``)."""
    mean = rgb.new_tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = rgb.new_tensor(PIXEL_STD).view(1, 3, 1, 1)
    images = (rgb - mean) / std
    height, width = rgb.shape[-2:]
    pad_h = -height % SIZE_DIVISIBILITY
    pad_w = -width % SIZE_DIVISIBILITY
    return F.pad(images, (0, pad_w, 0, pad_h), value=0.0), (height, width)


def class_logits(
    class_embeddings: torch.Tensor, text: torch.Tensor, void: torch.Tensor
) -> torch.Tensor:
    """``100 * cos`` of query embeddings (N, Q, E) with the class texts (K, E) and the learned
    "no object" embedding (E,) as the last row: logits (N, Q, K + 1).

    Source: ``MaskFormerClipAdapter.get_text_features`` / ``get_sim_logits`` (adapter.py).
    """
    rows = torch.cat([F.normalize(text, dim=-1), F.normalize(void.reshape(1, -1), dim=-1)])
    return CLASS_LOGIT_SCALE * F.normalize(class_embeddings, dim=-1) @ rows.T


def semantic_inference(logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-class scores (N, K, h, w) from class logits (N, Q, K + 1) and mask logits
    (N, Q, h, w): ``einsum("qc,qhw->chw", softmax(logits)[..., :-1], sigmoid(masks))``.

    Source: ``ZeroShotMaskFormer.semantic_inference`` (the "no object" column dropped after
    the softmax).
    """
    scores = logits.softmax(dim=-1)[..., :-1]
    return torch.einsum("nqc,nqhw->nchw", scores, mask_logits.sigmoid())


CLIP_ENSEMBLE_WEIGHT = 0.8  # CLIP_ADAPTER.CLIP_ENSEMBLE_WEIGHT of the proposal model's configs


def clip_ensemble(
    mask_cls: torch.Tensor,
    clip_logits: torch.Tensor,
    valid: torch.Tensor,
    seen: torch.Tensor | None = None,
    weight: float = CLIP_ENSEMBLE_WEIGHT,
) -> torch.Tensor:
    """The two-stream baseline's class probabilities (Q, K): the proposal network's and CLIP's
    crop classification combined geometrically, per class by whether it was seen in training.

    ``mask_cls`` (Q, K): ``softmax(logits)[..., :-1]`` of :func:`class_logits`; ``clip_logits``
    (V, K + 1): CLIP's logits of the V valid proposals' crops (the "no object" column last);
    ``valid`` (Q,) bool; ``seen`` (K,) bool or None (no class seen: the release's rule for a
    data set without ``trainable_flag``, which is every vocabulary a robot is given).
    With ``p`` = CLIP's softmax over the K classes (1 for proposals without a crop):
    seen classes ``mask_cls**w * p**(1-w)``, unseen ``mask_cls**(1-w) * p**w``.
    Source: ``ZeroShotMaskFormer.semantic_inference`` (``zero_shot_mask_former_model.py``).
    Raises ValueError for ``weight`` outside (0, 1].
    """
    if not 0.0 < weight <= 1.0:
        raise ValueError(f"ensemble weight must be in (0, 1], got {weight}")
    clip_cls = mask_cls.new_ones(mask_cls.shape)
    clip_cls[valid] = clip_logits[:, :-1].softmax(dim=-1).to(mask_cls.dtype)
    trained = (
        mask_cls.new_zeros((1, mask_cls.shape[-1]))
        if seen is None
        else seen.to(mask_cls.dtype)[None]
    )
    return trained * mask_cls.pow(weight) * clip_cls.pow(1 - weight) + (
        1 - trained
    ) * mask_cls.pow(1 - weight) * clip_cls.pow(weight)
