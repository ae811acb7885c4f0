"""Training beside the core (not in the inference path): DeOP's modules with CLIP frozen."""
