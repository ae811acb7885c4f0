"""DSLO's open choices against the alternatives a reader of the paper might expect.

    .venv/bin/python benchmarks/dslo_alternatives.py

Prints patch accuracy (fraction of patches whose argmax is the planted label) on the planted
problems of the tests (test/planted_dslo.py): five with a synthetic affinity (the four layouts
of the tests and the small object) and six with CLIP-style attention affinities (the
``naclip``, ``keykey`` and ``mean`` sources on planted tokens, thirds and object layouts).

1. OT mode: cost transforms x per-patch scores, every combination through one log-domain
   Sinkhorn (so that none fails by underflow; ``-log T`` does underflow in the plain kernel
   the engine uses), 50 iterations, epsilon 0.1, IPF 15 rounds, as ``dslo_scores``. Scores:
   minus the mean transport cost of the patch's share (= mean similarity when the cost is
   1 - similarity) or minus its source potential f_i (the OT distance's per-patch part,
   centred per class). The row "shipped (dslo_scores)" runs the engine's code (float32, plain
   kernel) and should match "1-nT/(1+nT) / -potential f_i (centred)" (float64, log domain).
2. Velocity mode: readings of the published stop rule ``|f_l - f_(l-1)| <= tau`` (tau 0.3),
   each scored "slower wins" (the paper) and "faster wins", ties broken by the raw
   probability (a generous reading: without it every reading that fires at step 1 everywhere
   is a constant), M2N2's arrival time, and the shipped rule (density within tau of uniform).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
from planted_dslo import (  # noqa: E402  (the tests' planted problems)
    accuracy,
    attention_affinity,
    planted_logits,
    planted_problem,
    planted_truth,
)

from ovss_ros.core.methods.dslo.dslo import (  # noqa: E402
    class_distributions,
    doubly_stochastic,
    dslo_scores,
)

EPSILON, ITERATIONS, ROUNDS, TAU, MAX_STEPS = 0.1, 50, 15, 0.3, 50


def problems() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """name -> (logits, affinity, truth)."""
    found = {}
    for layout in ("thirds", "object"):
        for local in (False, True):
            name = f"{layout}-{'local' if local else 'global'}"
            found[name] = planted_problem(layout, local=local)
    found["small-object"] = planted_problem("object", noise=0.03, affinity_noise=0.3)
    for source, strength in (("naclip", 0.3), ("keykey", 0.3), ("mean", 0.1)):
        for layout in ("thirds", "object"):
            truth = planted_truth(layout).expand(2, -1, -1)
            logits = planted_logits(truth, 3, 0.05, torch.Generator().manual_seed(0))
            found[f"{source}-{layout}"] = (
                logits,
                attention_affinity(source, truth, strength=strength),
                truth,
            )
    return found


# ---------------------------------------------------------------------------- OT mode


def costs(transition: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cost matrices (N, n, n) from the doubly stochastic T."""
    n = transition.shape[-1]
    density = n * transition
    return {
        "1-nT/(1+nT)": 1 - density / (1 + density),
        "1-min(nT,1)": 1 - density.clamp(max=1),
        "1-T/rowmax": 1 - transition / transition.amax(-1, keepdim=True),
        "1-T/max": 1 - transition / transition.amax((-2, -1), keepdim=True),
        "-log T": -transition.clamp_min(1e-30).log(),
    }


def sinkhorn_log(q: torch.Tensor, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT from uniform to each Q_c (N, K, n), log domain: (log plan, source potential).

    The potentials are defined up to a constant per class (f + c, g - c is as good a
    solution), so the score centres f over the patches before classes are compared.
    """
    n = q.shape[-1]
    kernel = (-cost / EPSILON)[:, None]  # (N, 1, n, n)
    log_a = torch.full_like(q, -torch.log(torch.tensor(float(n))).item())
    log_b = q.clamp_min(0).log()  # -inf where the class has no mass
    f = torch.zeros_like(q)
    g = torch.zeros_like(q)
    for _ in range(ITERATIONS):
        f = EPSILON * (log_a - torch.logsumexp(kernel + g[..., None, :] / EPSILON, dim=-1))
        g = EPSILON * (log_b - torch.logsumexp(kernel + f[..., :, None] / EPSILON, dim=-2))
    log_plan = kernel + f[..., :, None] / EPSILON + g[..., None, :] / EPSILON
    return log_plan, f


def ot_scores(logits: torch.Tensor, affinity: torch.Tensor) -> dict[str, torch.Tensor]:
    q, present = class_distributions(logits)
    transition = doubly_stochastic(affinity, ROUNDS)
    n = q.shape[-1]
    found = {}
    for cost_name, cost in costs(transition).items():
        log_plan, potential = sinkhorn_log(q.double(), cost.double())
        plan = log_plan.exp()
        per_patch = {
            "mean cost": -n * (plan * cost.double()[:, None]).sum(-1),
            "-potential f_i (centred)": -(potential - potential.mean(-1, keepdim=True)),
        }
        for score_name, score in per_patch.items():
            score = score.float().masked_fill(~present[..., None], -1e9)
            found[f"{cost_name} / {score_name}"] = score.view(logits.shape)
    found["shipped (dslo_scores)"] = dslo_scores(logits, affinity, "ot")
    return found


# ---------------------------------------------------------------------- velocity mode


def stop_times(
    q: torch.Tensor, transition: torch.Tensor, fired: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """First l >= 1 where ``fired(f_l, f_(l-1))``, else MAX_STEPS + 1, (N, K, n)."""
    f = q
    stop = torch.full_like(q, float(MAX_STEPS + 1))
    running = torch.ones_like(q, dtype=torch.bool)
    for step in range(1, MAX_STEPS + 1):
        previous, f = f, f @ transition
        now = running & fired(f, previous)
        stop.masked_fill_(now, float(step))
        running &= ~now
    return stop


def arrival_times(q: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
    """M2N2's Markov-map: first l >= 0 where f_l / max f_l > tau (earlier = closer)."""
    f = q
    time = torch.full_like(q, float(MAX_STEPS + 1))
    waiting = torch.ones_like(q, dtype=torch.bool)
    for step in range(MAX_STEPS + 1):
        if step:
            f = f @ transition
        now = waiting & (f / f.amax(-1, keepdim=True).clamp_min(1e-30) > TAU)
        time.masked_fill_(now, float(step))
        waiting &= ~now
    return time


def velocity_scores(logits: torch.Tensor, affinity: torch.Tensor) -> dict[str, torch.Tensor]:
    q, present = class_distributions(logits)
    transition = doubly_stochastic(affinity, ROUNDS)
    n = q.shape[-1]
    probs = torch.softmax(40 * logits.float().flatten(2), dim=1)  # the tie-break, in [0, 1)
    rules = {
        "|f_l-f_l-1|<=tau (f sums to 1)": lambda f, p: (f - p).abs() <= TAU,
        "n|f_l-f_l-1|<=tau (density)": lambda f, p: n * (f - p).abs() <= TAU,
        "|f_l-f_l-1|<=tau max f (M2N2 scale)": lambda f, p: (
            (f / f.amax(-1, keepdim=True) - p / p.amax(-1, keepdim=True)).abs() <= TAU
        ),
        "|f_l-f_l-1|<=tau f_l-1 (relative)": lambda f, p: (f - p).abs() <= TAU * p,
    }
    found = {}
    for name, rule in rules.items():
        stop = stop_times(q, transition, rule)
        for sign, label in ((1, "slower wins"), (-1, "faster wins")):
            score = (sign * stop + 0.5 * probs).masked_fill(~present[..., None], -1e9)
            found[f"{name}, {label}"] = score.view(logits.shape)
    arrival = -arrival_times(q, transition) + 0.5 * probs
    found["M2N2 arrival time f/max f > tau"] = arrival.masked_fill(~present[..., None], -1e9).view(
        logits.shape
    )
    found["shipped (dslo_scores)"] = dslo_scores(logits, affinity, "velocity")
    return found


def table(title: str, scorer, cases) -> None:
    rows: dict[str, list[float]] = {}
    for logits, affinity, truth in cases.values():
        rows.setdefault("raw argmax", []).append(accuracy(logits, truth))
        for name, scores in scorer(logits, affinity).items():
            rows.setdefault(name, []).append(accuracy(scores, truth))
    short = [name.split("-")[0][:2] + name.split("-")[-1][:2] for name in cases]
    width = max(len(name) for name in rows) + 2
    print(f"\n{title}")
    print(" " * width + " ".join(f"{s:>5}" for s in short) + "   mean  synth  attn")
    for name, values in rows.items():
        synthetic, attention = statistics.mean(values[:5]), statistics.mean(values[5:])
        cells = " ".join(f"{v:5.2f}" for v in values)
        print(
            f"{name:<{width}}{cells}  {statistics.mean(values):5.2f}  {synthetic:5.2f}"
            f"  {attention:5.2f}"
        )


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    torch.manual_seed(0)
    cases = problems()
    print("problems:", ", ".join(cases))
    table("OT mode: cost / per-patch score", ot_scores, cases)
    table("velocity mode: stop rule", velocity_scores, cases)


if __name__ == "__main__":
    main()
