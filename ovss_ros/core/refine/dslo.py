"""DSLO: segmentation from the discrepancy between class distributions and the uniform one.

arXiv 2604.07723 (CVPR 2026), methods.md section 1. Each class map is turned into a distribution
Q_c over patches; the unknown ground truth is replaced by the uniform S = 1/n, and a patch goes to
the class whose distribution departs most from S *at that patch*, measured along a patch-affinity
transition matrix T. Two measurements:

* ``"ot"``: entropic optimal transport from S to each Q_c (Sinkhorn). Every patch must ship its
  share 1/n into class c's mass, which sits where class c won; a patch that can ship it to
  patches it is similar to belongs to c. Mass balance is the point: noise wins a class a few
  patches inside another class's region, but those few cannot absorb the whole region's share.
* ``"velocity"``: the Markov chain f_l = f_{l-1} T started at Q_c converges to S (T is doubly
  stochastic, so S is its stationary distribution). Where class c really is, its mass is held
  by similar patches and drains slowly; a patch that noise gave to c loses it in a step or two.
  The slower a patch's class-c excess drains, the larger the discrepancy, the higher the score.

Choices the method description leaves open (decided here, tested in test/test_refine_dslo.py):

* Class distributions: ``softmax(logit_scale * logits)`` over classes (the standard protocol's
  probabilities, so confident patches carry more mass), kept only at each patch's argmax class,
  then normalised over patches. A class that wins no patch has no distribution and gets the
  score ``ABSENT_SCORE`` (-1) everywhere, below every real score, so it never wins.
* OT cost: ``C = 1 - sim`` with ``sim = nT / (1 + nT)``. T is doubly stochastic, so nT is the
  affinity in units of the uniform level 1/n: an average neighbour has sim 0.5, strong ones
  approach 1, weak ones 0. It is bounded (epsilon = 0.1 then means one tenth of the cost range),
  needs no per-image maximum (a single peaked row, e.g. the diagonal, would flatten every other
  cost), and unlike clipping at 1 keeps strong affinities ordered so scores rarely tie.
  ``-log T`` was rejected: with epsilon 0.1 the kernel becomes T^10, which is dominated by the
  noise of a few entries and underflows in float32.
* OT score: ``n * sum_j plan_ij * sim_ij``, the mean similarity between patch i and the class-c
  patches its share is transported to (1 - its mean transport cost), in [0, 1). The mass a patch
  *receives* is fixed by the marginals (Q_c) and so carries no information.
* Velocity: the paper's stop rule is the first step with |f_l - f_{l-1}| <= tau. Used as is it
  fires alike for mass flowing in and out, and at once for patches the mass has not reached, so
  on the planted problems of the tests it scores *below* the raw argmax (0.30 vs 0.51). Here the
  one-step change is replaced by the change still to come, f_l - S (= sum of all later one-step
  changes, since f converges to S), signed so that only an excess counts, with the tolerance in
  units of S: the stop time is the first l >= 1 with n f_l(i) <= 1 + tau, i.e. the patch's
  class-c density has fallen within tau of uniform (scale-free: independent of n and of how
  the class map was normalised). A patch that never gets there within ``max_steps`` stops at
  ``max_steps + 1``. The score is that stop time (1 / velocity) plus a tie-break in [0, 1):
  g / (1 + g) with g = n f_1(i), the one-step affinity-weighted vote, so patches where several
  classes stop at the same step go to the one with more mass around them.
"""

from __future__ import annotations

import torch

MODES = ("ot", "velocity")
ABSENT_SCORE = -1.0
TINY = 1e-30


def doubly_stochastic(affinity: torch.Tensor, rounds: int = 15) -> torch.Tensor:
    """Iterative proportional fitting: alternately normalise rows and columns (…, n, n).

    The result is (close to) doubly stochastic, so the uniform distribution is the stationary
    distribution of the chain it defines and no patch is a hub that attracts everyone's mass.
    Entries are floored at a tiny positive value so an all-zero row or column cannot divide 0
    by 0. Computed in float32.
    """
    transition = affinity.float().clamp_min(TINY)
    for _ in range(rounds):
        transition = transition / transition.sum(dim=-1, keepdim=True)
        transition = transition / transition.sum(dim=-2, keepdim=True)
    return transition


def class_distributions(
    logits: torch.Tensor, logit_scale: float = 40.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: Q (N, K, n), each present class's suppressed map normalised over patches.

    Returns Q and the (N, K) mask of classes that win at least one patch. Absent classes get a
    uniform placeholder so the later steps stay finite; their scores are overwritten.
    """
    probs = torch.softmax(logit_scale * logits.float().flatten(2), dim=1)  # (N, K, n)
    winner = probs.argmax(dim=1, keepdim=True)
    kept = torch.zeros_like(probs).scatter_(1, winner, probs.gather(1, winner))
    mass = kept.sum(dim=-1, keepdim=True)
    present = mass[..., 0] > 0
    uniform = torch.full_like(kept, 1.0 / kept.shape[-1])
    return torch.where(mass > 0, kept / mass.clamp_min(TINY), uniform), present


def _ot_scores(
    q: torch.Tensor, transition: torch.Tensor, iterations: int, epsilon: float
) -> torch.Tensor:
    """Mean similarity of each patch to where Sinkhorn transports its share, (N, K, n)."""
    n = q.shape[-1]
    density = n * transition
    sim = density / (1 + density)
    kernel = torch.exp((sim - 1) / epsilon)  # (N, n, n), shared by all classes
    source = 1.0 / n
    v = torch.ones_like(q)
    for _ in range(iterations):  # plan = diag(u) kernel diag(v), batched over N and K
        u = source / (v @ kernel.transpose(-2, -1)).clamp_min(TINY)
        v = q / (u @ kernel).clamp_min(TINY)
    return n * u * (v @ (kernel * sim).transpose(-2, -1))


def _velocity_scores(
    q: torch.Tensor, transition: torch.Tensor, tau: float, max_steps: int
) -> torch.Tensor:
    """Stop time of each patch's class density (plus the step-1 tie-break), (N, K, n)."""
    density = q * q.shape[-1]  # n f_l: 1 is the uniform level
    stop = torch.full_like(density, float(max_steps + 1))
    running = torch.ones_like(density, dtype=torch.bool)
    for step in range(1, max_steps + 1):
        density = density @ transition
        if step == 1:
            vote = density  # one affinity-weighted step: the tie-break
        drained = running & (density <= 1 + tau)
        stop.masked_fill_(drained, float(step))
        running &= ~drained
        if not running.any():
            break
    return stop + vote / (1 + vote)


def dslo_scores(
    logits: torch.Tensor,
    affinity: torch.Tensor,
    mode: str = "ot",
    sinkhorn_iters: int = 50,
    epsilon: float = 0.1,
    ipf_rounds: int = 15,
    tau: float = 0.3,
    max_steps: int = 50,
    logit_scale: float = 40.0,
) -> torch.Tensor:
    """DSLO class scores (N, K, h, w): the argmax over K is the label.

    ``logits`` (N, K, h, w) are patch-text logits (cosines); ``affinity`` (N, h*w, h*w) is any
    nonnegative patch affinity in row-major patch order (e.g. ``DenseOutput.affinity``), rows
    as "from", columns as "to". Batched over images and classes; the only loops are over
    iterations. Scores are comparable across classes at one patch, not across modes: "ot"
    gives a similarity in [0, 1), "velocity" a stop time in [1, max_steps + 2). Classes that win
    no patch score -1. Smooth enough to be upsampled (JBU) before the argmax. Computed in
    float32, returned in ``logits.dtype``. See the module docstring for the choices made.
    """
    if mode not in MODES:
        raise ValueError(f"unknown DSLO mode {mode!r}: use one of {list(MODES)}")
    if min(sinkhorn_iters, max_steps) < 1 or epsilon <= 0:
        raise ValueError("sinkhorn_iters and max_steps must be >= 1 and epsilon > 0")
    batch, classes, height, width = logits.shape
    n = height * width
    if affinity.shape != (batch, n, n):
        raise ValueError(f"affinity {tuple(affinity.shape)} must be ({batch}, {n}, {n})")
    q, present = class_distributions(logits, logit_scale)
    transition = doubly_stochastic(affinity, ipf_rounds)
    if mode == "ot":
        scores = _ot_scores(q, transition, sinkhorn_iters, epsilon)
    else:
        scores = _velocity_scores(q, transition, tau, max_steps)
    scores = scores.masked_fill(~present[..., None], ABSENT_SCORE)
    return scores.view(batch, classes, height, width).to(logits.dtype)
