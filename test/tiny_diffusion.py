"""The tests' tiny random Stable Diffusion pipeline: the package's builders
(``ovss_ros.tools.tiny_diffusion``, which ``scripts/make_tiny_models.py`` uses too), imported
under the name the tests use."""

from ovss_ros.tools.tiny_diffusion import (  # noqa: F401 (re-exported)
    TEXT_TOKENS,
    save_tiny_pipeline,
    tiny_scheduler,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)
