"""The text side: templates, the cut forward, and the per-class cache."""

import threading

import open_clip
import pytest
import torch
from conftest import TINY_VIT

from ovss_ros.core import Stopped
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.clip.text_encoding import (
    JUNCTION_SLACK,
    PromptTooLong,
    TextEncoder,
    template_set,
)
from ovss_ros.core.segmenter import EngineConfig, Segmenter
from ovss_ros.core.vocabulary import VocabularyError, parse_classes


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(str(TINY_VIT), "none", "cpu")


def test_cut_prompts_equal_padded_encode_text(clip):
    encoder = TextEncoder(clip.model, clip.tokenizer, "single")
    prompts = ["a photo of a cat.", "a photo of a door handle with a very long description."]
    with torch.no_grad():
        padded = clip.model.encode_text(clip.tokenizer(prompts))
    cut = encoder.encode_prompts(prompts)
    assert cut.shape == padded.shape
    assert (cut - padded).abs().max().item() <= 1e-5


# A lone "!" is token id 0 in open_clip's tokenizer (open_clip #453): these prompts have a 0
# before their end token, which a cut at the count of non-zero ids loses.
EXCLAIMED = ['a photo of a sign reading "exit!".', 'a "wow!", said the cat', "no!;"]


def test_exclamation_zero_id_is_real():
    """Guards the test below: the tokenizer really puts a 0 before the end token."""
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    for prompt in EXCLAIMED:
        ids = tokenizer([prompt])[0]
        end = int(ids.argmax())
        assert ids[end] == tokenizer.eot_token_id and (ids[1:end] == 0).any(), prompt


@pytest.mark.parametrize("prompt", EXCLAIMED)
def test_cut_keeps_the_end_token_after_a_zero_id(clip, prompt):
    encoder = TextEncoder(clip.model, clip.tokenizer, "single")
    with torch.no_grad():
        want = clip.model.encode_text(clip.tokenizer([prompt]))
    got = encoder.encode_prompts([prompt])  # alone: its own length decides the cut
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    mixed = encoder.encode_prompts([prompt, "a cat.", "a photo of a dog with a hat."])
    torch.testing.assert_close(mixed[:1], want, rtol=0, atol=1e-5)


def test_class_name_with_exclamation_equals_encode_text(clip):
    """The name a user types, through the templates: the embedding is encode_text's."""
    encoder = TextEncoder(clip.model, clip.tokenizer, "a photo of a {}.|{}")
    name = 'sign reading "exit!"'
    with torch.no_grad():
        raw = clip.model.encode_text(clip.tokenizer([f"a photo of a {name}.", name]))
    raw = raw / raw.norm(dim=-1, keepdim=True)
    want = raw.mean(0) / raw.mean(0).norm()
    torch.testing.assert_close(encoder.embeddings([name])[0], want, rtol=0, atol=1e-5)


def test_embedding_is_normalised_template_mean(clip):
    encoder = TextEncoder(clip.model, clip.tokenizer, "a {}.|a photo of a {}.")
    with torch.no_grad():
        raw = clip.model.encode_text(clip.tokenizer(["a cup.", "a photo of a cup."]))
    raw = raw / raw.norm(dim=-1, keepdim=True)
    want = raw.mean(0) / raw.mean(0).norm()
    assert torch.allclose(encoder.embeddings(["cup"])[0], want, atol=1e-5)


def test_cache_encodes_only_new_texts(clip):
    encoder = TextEncoder(clip.model, clip.tokenizer, "imagenet")
    first = encoder.embeddings(["cup", "door handle"])
    assert encoder.prompts_encoded == 2 * 80
    again = encoder.embeddings(["door handle", "wet floor", "cup"])
    assert encoder.prompts_encoded == 3 * 80  # only "wet floor" was new
    assert torch.equal(again[0], first[1]) and torch.equal(again[2], first[0])
    encoder.set_templates("single")  # new templates: every text must be encoded again
    encoder.embeddings(["cup"])
    assert encoder.prompts_encoded == 3 * 80 + 1


def test_segmenter_vocabulary_change_encodes_one_class():
    segmenter = Segmenter(
        EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", templates="single")
    )
    segmenter.set_classes(["person", "tv; television; monitor", "dog"])
    assert segmenter.text.prompts_encoded == 5
    segmenter.set_classes(["person", "tv; television; monitor", "cat"])
    assert segmenter.text.prompts_encoded == 6


@pytest.mark.parametrize(
    ("bad", "shown", "reason"),
    [
        ("", "''", "use imagenet, single"),
        ("   |  ", "'   |  '", "use imagenet, single"),
        ("no placeholder", "'no placeholder'", "no {} field"),
        ("a {}.|oops", "'oops'", "no {} field"),
        ("a photo of a {} in the {room}.", "'a photo of a {} in the {room}.'", "2 fields"),
        ("a photo of a {room}.", "'a photo of a {room}.'", "the field {room}"),
        ("a {} of {}", "'a {} of {}'", "2 fields"),
        ("{0}", "'{0}'", "the field {0}"),
        ("a {0} and {0}", "'a {0} and {0}'", "2 fields"),
        ("a {[0]}", "'a {[0]}'", "the field {[0]}"),
        ("a {.upper}", "'a {.upper}'", "the field {.upper}"),
        ("a {!r}", "'a {!r}'", "conversion or format spec"),
        ("a {!s}.", "'a {!s}.'", "conversion or format spec"),
        ("a {:>20}", "'a {:>20}'", "conversion or format spec"),
        ("a {:{}}", "'a {:{}}'", "conversion or format spec"),
        ("a {} {", "'a {} {'", "Single '{'"),
        ("a } {}", "'a } {}'", "Single '}'"),
        ("{{}}", "'{{}}'", "no {} field"),  # escaped braces: a literal {}, no field
        ("a {{}} photo", "'a {{}} photo'", "no {} field"),
        ("a {}\n", "'a {}\\n'", "U+000A"),
        ("a {}\n|the {}.", "'a {}\\n'", "U+000A"),
        ("a\x1b[2J {}", "'a\\x1b[2J {}'", "U+001B"),
        ("a {}\u202e.", "'a {}\\u202e.'", "U+202E"),
        ("a {}" + "x" * 200, "'a {}xxx", "too long"),
        ("|".join(["a {}."] * 81), "", "too many templates: 81 > 80"),
    ],
)
def test_bad_templates_rejected_with_the_template_named(bad, shown, reason):
    with pytest.raises(ValueError, match="templates") as raised:
        template_set(bad)
    message = str(raised.value)
    assert shown in message and reason in message, message
    assert message.isprintable()


@pytest.mark.parametrize(
    ("templates", "formatted"),
    [
        ("a {}.", ("a cup.",)),
        ("{}", ("cup",)),
        (" a {} |  the {}. ", ("a cup", "the cup.")),
        ("a {{literal}} {}", ("a {literal} cup",)),  # doubled braces are literal braces
        ("{{{}}}", ("{cup}",)),
        ("a photo of a {}, a type of 椅子.", ("a photo of a cup, a type of 椅子.",)),
        ("|".join(["a {}."] * 80), ("a cup.",) * 80),
    ],
)
def test_good_templates_fill_the_name_once(templates, formatted):
    assert tuple(t.format("cup") for t in template_set(templates)) == formatted


def test_imagenet_templates_are_the_80_openai_ones():
    templates = template_set("imagenet")
    assert len(templates) == 80 and all("{}" in t for t in templates)
    assert "a photo of a {}." in templates


def test_set_stop_event_stops_encoding_and_keeps_the_cache(clip):
    stop = threading.Event()
    encoder = TextEncoder(clip.model, clip.tokenizer, "single", stop)
    first = encoder.embeddings(["cup"])
    stop.set()
    with pytest.raises(Stopped):
        encoder.embeddings(["cup", "plate"])
    assert encoder.prompts_encoded == 1 and list(encoder.cache) == [(encoder.templates, "cup")]
    assert torch.equal(encoder.embeddings(["cup"])[0], first[0])  # cached texts need no tower


def test_other_templates_encode_without_switching(clip):
    encoder = TextEncoder(clip.model, clip.tokenizer, "single")
    other = template_set("a {}.|the {}.")
    encoded = encoder.embeddings(["cup"], other)
    assert encoder.templates == template_set("single")
    fresh = TextEncoder(clip.model, clip.tokenizer, "a {}.|the {}.")
    assert torch.equal(encoded, fresh.embeddings(["cup"]))
    encoder.set_templates(other)  # the embeddings made ahead are used, nothing is encoded again
    before = encoder.prompts_encoded
    assert torch.equal(encoder.embeddings(["cup"]), encoded) and encoder.prompts_encoded == before


def test_trim_bounds_the_cache(clip, monkeypatch):
    import ovss_ros.core.clip.text_encoding as text_encoding

    monkeypatch.setattr(text_encoding, "CACHE_LIMIT", 5)
    encoder = TextEncoder(clip.model, clip.tokenizer, "single")
    encoder.embeddings(["a", "b", "c"])
    encoder.sentence_embeddings(["a dog."])
    encoder.trim(["a"], [])  # 4 entries: within the limit, nothing is forgotten
    assert len(encoder.cache) == 4
    encoder.embeddings(["d", "e"])
    encoder.trim(["a", "e"], ["a dog."])
    assert sorted(text for _, text in encoder.cache) == ["a", "a dog.", "e"]


# ---- prompts longer than the text model's context (issue 18, item 9) ----
# "part 7777...": every digit is one BPE token, so the length in tokens is easy to set.
CUT = "part " + "7" * 70


def test_two_names_that_differ_after_the_cut_are_refused_not_merged(clip):
    """Issue 18 item 9: CLIP's tokenizer cuts at 77 tokens, so these two names would get one
    embedding and the second could never win a pixel. Refused, naming the class and 77."""
    tokenizer = clip.tokenizer
    first, second = tokenizer([f"a photo of a {CUT}1.", f"a photo of a {CUT}2."])
    assert torch.equal(first, second)  # what the text tower would see: the same tokens
    segmenter = Segmenter(
        EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", templates="single")
    )
    segmenter.set_classes(["cat"])
    with pytest.raises(VocabularyError) as refused:
        segmenter.set_classes(["cat", f"{CUT}1", f"{CUT}2"])
    reason = str(refused.value)
    assert f"class '{CUT}1'" in reason and "more than the 77" in reason
    assert "has 79 tokens" in reason  # a photo of a | part | 71 digits | . | start, end
    assert [c.name for c in segmenter.classes] == ["cat"]  # the old vocabulary stays


def _digits_name(tokens: int) -> str:
    """A name of exactly ``tokens`` BPE tokens: 'part' and one token per digit."""
    return "part " + "7" * (tokens - 1)


@pytest.mark.parametrize("templates", ["single", "imagenet", "{}", "a {} in a room|{}"])
def test_the_longest_prompt_that_fits_is_accepted_one_more_token_is_refused(clip, templates):
    encoder = TextEncoder(clip.model, clip.tokenizer, templates)
    overhead = max(len(clip.tokenizer.encode(t.format(""))) for t in encoder.templates) + 2
    fits = _digits_name(77 - overhead)
    longest = max(len(clip.tokenizer.encode(t.format(fits))) + 2 for t in encoder.templates)
    assert longest == 77  # guards the arithmetic: the name's longest prompt is exactly 77
    encoder.check_lengths([fits])
    encoder.embeddings([fits])  # encoded, not refused
    with pytest.raises(PromptTooLong, match="has 78 tokens, more than the 77"):
        encoder.check_lengths([_digits_name(78 - overhead)])
    with pytest.raises(PromptTooLong):  # embeddings checks before any text-tower work
        encoder.embeddings([_digits_name(78 - overhead)])
    assert encoder.prompts_encoded == len(encoder.templates)


def test_junction_slack_covers_the_template_name_junctions():
    """check_lengths tokenizes a prompt whole only when its parts come within JUNCTION_SLACK of
    the limit; measured here: a junction moves the count by at most the slack."""
    import random
    import string

    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    templates = template_set("imagenet") + ("{}s", "a{}b", "{}'s photo", "({})")
    rng = random.Random(0)
    words = ["cat", "dog", "tv", "椅子", "кошка", "café", "a-b", "x!", "!", "3d", "plant's"]
    worst = 0
    for _ in range(150):
        name = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        if rng.random() < 0.4:
            name = "".join(rng.choice(string.printable[:94]) for _ in range(rng.randint(1, 20)))
        name = name.strip() or "x"
        count = len(tokenizer.encode(name))
        for template in templates:
            prefix, suffix = template.split("{}")
            parts = len(tokenizer.encode(prefix)) + count + len(tokenizer.encode(suffix))
            whole = len(tokenizer.encode(template.format(name)))
            worst = max(worst, whole - parts)
    assert worst < JUNCTION_SLACK


def test_descriptions_and_background_words_are_checked_too(clip):
    segmenter = Segmenter(
        EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", templates="single")
    )
    with pytest.raises(VocabularyError, match=r"class 'tv': description .* 77"):
        segmenter.set_classes(["tv | " + " ".join(["screen"] * 80)])
    with pytest.raises(VocabularyError, match=r"background word .* 77"):
        segmenter.reconfigure(background_words=[CUT])
    assert segmenter.config.background_words == ()
    config = EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", templates="single")
    classes = parse_classes(["cat", f"kitty; {CUT}"])
    with pytest.raises(VocabularyError, match=r"class 'kitty': synonym .* 77"):
        segmenter.check_config(config, classes)  # the node validates ahead with this
    segmenter.check_config(config, parse_classes(["cat", "kitty"]))

    with pytest.raises(VocabularyError, match="background word"):
        segmenter.check_config(config.replace({"background_words": (CUT,)}))


def test_a_template_that_pushes_a_name_over_is_refused_with_the_template(clip):
    segmenter = Segmenter(
        EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", templates="single")
    )
    name = _digits_name(66)  # fits 'a photo of a {}.' (73 tokens), not a longer template
    segmenter.set_classes([name])
    long_template = "a very blurry and badly cropped old photo of the {} on a table."
    with pytest.raises(VocabularyError, match="or the template"):
        segmenter.reconfigure(templates=long_template)
    assert segmenter.config.templates == "single"
