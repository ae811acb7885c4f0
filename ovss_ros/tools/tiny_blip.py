"""Tiny random BLIP image-text-matching checkpoints (tests, trying PnP-OVSS without weights):
real transformers classes.

``save_blip(directory)`` writes what ``BlipForImageTextRetrieval.save_pretrained`` and
``BlipProcessor.save_pretrained`` write for a published checkpoint (config, safetensors weights,
tokenizer, image-processor config), so tests load it through the same code path as
``Salesforce/blip-itm-large-flickr``. The tokenizer is a ``BertTokenizer`` read from a small
WordPiece vocabulary file written here; like BLIP's it knows ``[DEC]`` and ``[ENC]``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
# Words of the prompt, VOC-style class names, and word pieces: "aeroplane" -> aero ##plane,
# "motorbike" -> motor ##bike, "pottedplant" -> pot ##ted ##plant (WordPiece, longest match).
WORDS = [
    "a", "picture", "of", "person", "dog", "cat", "tv", "chair", "table", "sofa", "bird",
    "bottle", "horse", "train", "aero", "##plane", "motor", "##bike", "pot", "##ted", "##plant",
    "plant", "door", "floor", "wall", "sky",
]  # fmt: skip

PATCH = 8
IMAGE_SIZE = 32  # native size: a 4x4 patch grid
TEXT_LAYERS = 3
TEXT_HEADS = 4


def write_vocabulary(folder: Path) -> Path:
    """The WordPiece vocabulary file (one token a line, id = line number)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(SPECIAL + WORDS) + "\n")
    return path


def tiny_tokenizer(folder: Path) -> BertTokenizer:
    """A ``BertTokenizer`` of ``WORDS`` (its vocabulary file written to ``folder``)."""
    write_vocabulary(folder)
    return BertTokenizer.from_pretrained(str(folder))


def tiny_config(vocab_size: int, max_positions: int = 64) -> BlipConfig:
    """Small vision and text towers; the text encoder cross-attends in every layer."""
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
    }
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "encoder_hidden_size": 32,
        "max_position_embeddings": max_positions,
        "pad_token_id": 0,
        "bos_token_id": 5,
        "sep_token_id": 3,
    }
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def tiny_blip(
    folder: Path, seed: int = 0, max_positions: int = 64
) -> tuple[BlipForImageTextRetrieval, BertTokenizer]:
    """A random tiny BLIP ITM model (eval mode) and its tokenizer."""
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(tiny_config(len(tokenizer), max_positions)).eval()
    return model, tokenizer


def save_blip(directory: Path, seed: int = 0, max_positions: int = 64) -> Path:
    """Write a loadable checkpoint directory (model + processor, what ``pnp.vlm_pretrained``
    takes) at ``directory`` and return it. The vocabulary is written to a temporary folder first
    (``BertTokenizer`` reads a file); OSError when ``directory`` cannot be written."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as build:
        model, tokenizer = tiny_blip(Path(build), seed, max_positions)
        model.save_pretrained(directory)
        processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)
        processor.save_pretrained(directory)
    return directory


def save_tiny_blip(folder: Path, seed: int = 0, max_positions: int = 64) -> Path:
    """``save_blip`` into ``folder/tiny-blip-itm`` (the tests' layout); returns that folder."""
    return save_blip(Path(folder) / "tiny-blip-itm", seed, max_positions)
