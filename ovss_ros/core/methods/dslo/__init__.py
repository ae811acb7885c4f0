"""DSLO (doubly-stochastic label optimisation after the dense forward) and its Stable
Diffusion 2 self-attention affinity."""
