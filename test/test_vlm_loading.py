"""Loading BLIP ITM through the real transformers path, and one clear error per failure."""

import time

import pytest
import torch
from tiny_blip import save_tiny_blip, tiny_config, tiny_tokenizer
from transformers import BertTokenizer, BlipForConditionalGeneration, BlipForImageTextRetrieval

from ovss_ros.core.clip.model_loading import ModelLoadError
from ovss_ros.core.methods.pnp_ovss.vlm_loading import BLIP_ENC_ID, enc_token_id, load_vlm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"), seed=11)


def test_saved_directory_loads_through_from_pretrained(checkpoint):
    torch.manual_seed(99)  # a different init: equality proves the weights came from the files
    loaded = load_vlm("blip_itm", str(checkpoint), "cpu")
    torch.manual_seed(11)
    reference = BlipForImageTextRetrieval.from_pretrained(checkpoint, local_files_only=True)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert isinstance(loaded.model, BlipForImageTextRetrieval)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.device == torch.device("cpu") and loaded.autocast is None
    assert (loaded.patch_size, loaded.num_layers, loaded.num_heads) == (8, 3, 4)
    assert loaded.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.tokenizer("aeroplane")["input_ids"]) == [
        "[CLS]",
        "aero",
        "##plane",
        "[SEP]",
    ]
    assert loaded.enc_token_id == 6  # [ENC] in the test vocabulary


def test_enc_token_of_blips_layout_without_enc_in_the_tokenizer(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tiny")  # knows [ENC] at 6
    assert enc_token_id(tokenizer, len(tokenizer)) == 6
    assert enc_token_id(tokenizer, 6) is None  # the model has no row for it
    # The published BLIP tokenizers: bert-base-uncased's 30522 tokens + [DEC], no [ENC], while
    # the text embedding has 30524 rows (the last one is [ENC]).
    hub_like = tmp_path / "hub"
    hub_like.mkdir()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"[unused{i}]" for i in range(30522 - len(special))]
    (hub_like / "vocab.txt").write_text("\n".join(special + words + ["[DEC]"]) + "\n")
    hub_tokenizer = BertTokenizer.from_pretrained(str(hub_like))
    assert len(hub_tokenizer) == BLIP_ENC_ID and "[ENC]" not in hub_tokenizer.get_vocab()
    assert enc_token_id(hub_tokenizer, BLIP_ENC_ID + 1) == BLIP_ENC_ID
    assert enc_token_id(hub_tokenizer, BLIP_ENC_ID) is None


def test_a_blip_without_itm_head_is_refused(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    captioner = BlipForConditionalGeneration(tiny_config(len(tokenizer)))
    captioner.save_pretrained(tmp_path / "captioner")
    tokenizer.save_pretrained(tmp_path / "captioner")
    with pytest.raises(ModelLoadError, match="not a BLIP image-text matching model"):
        load_vlm("blip_itm", str(tmp_path / "captioner"), "cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "llava"}, "unknown pnp.vlm_model 'llava': set pnp.vlm_model to one of"),
        ({"precision": "fp16"}, "precision fp16 needs a GPU: set precision to fp32"),
        ({"precision": "int4"}, "unknown precision 'int4'"),
        ({"device": "tpu:3"}, "unknown device 'tpu:3'"),
        ({"pretrained": "  "}, "pnp.vlm_pretrained is empty: set it to a hub id"),
        ({"pretrained": "/nonexistent/blip"}, "pnp.vlm_pretrained directory .* not found"),
        ({"pretrained": "./models/no/blip"}, "pnp.vlm_pretrained directory .* not found"),
    ],
)
def test_load_errors_say_what_to_set(checkpoint, kwargs, message):
    arguments = {"model": "blip_itm", "pretrained": str(checkpoint), "device": "cpu", **kwargs}
    with pytest.raises(ModelLoadError, match=message):
        load_vlm(**arguments)


def test_a_directory_without_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load BLIP ITM .* holds a BLIP ITM model"):
        load_vlm("blip_itm", str(tmp_path / "empty"), "cpu")


def test_offline_hub_id_not_in_cache_fails_at_once_saying_what_to_set():
    """HF_HUB_OFFLINE=1 (conftest): no download is tried, no retry runs, the error is quick."""
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        load_vlm("blip_itm", "ovss-tests/no-such-blip-itm", "cpu")
    assert time.monotonic() - start < 15.0
    message = str(error.value)
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in message
    assert "set pnp.vlm_pretrained to a local directory saved with save_pretrained" in message
