"""Trying ovss_ros without weights: tiny random models built with the real model classes
(transformers' BLIP, a diffusers Stable Diffusion pipeline, an open_clip ViT), saved in the
layouts the node's loaders read, and a small labelled data set for DeOP training. Their outputs
are meaningless (random weights): they exercise the plumbing and show the cost's shape on a CPU.
``scripts/make_tiny_models.py`` writes them; the tests use the same builders."""
