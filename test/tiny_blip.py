"""The tests' tiny random BLIP: the package's builders (``ovss_ros.tools.tiny_blip``, which
``scripts/make_tiny_models.py`` uses too), imported under the name the tests use."""

from ovss_ros.tools.tiny_blip import (  # noqa: F401 (re-exported)
    IMAGE_SIZE,
    PATCH,
    SPECIAL,
    TEXT_HEADS,
    TEXT_LAYERS,
    WORDS,
    save_blip,
    save_tiny_blip,
    tiny_blip,
    tiny_config,
    tiny_tokenizer,
    write_vocabulary,
)
