"""PnP-OVSS (Luo et al., CVPR 2024): the BLIP cross-attention method, its VLM loading, the
dense CRF in its own process, and the tuning of its settings."""
