"""DeOP (Han et al., ICCV 2023) and the two-stream baseline: mask proposals, the severed last
block and its heads, checkpoints, prompt context."""
