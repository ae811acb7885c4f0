"""ovss-bench's figures: the summary of a row's samples and the printed table (``bench.py``
times the frames)."""

from __future__ import annotations

import numpy as np

STAGES = ("decode", "preprocess", "encoder", "head", "postprocess", "publish")


def summary(samples: list[float]) -> dict[str, float]:
    """Median, 95th percentile and spread (quartiles, minimum) in milliseconds."""
    ms = np.array(samples, dtype=np.float64) * 1000.0
    p25, median, p75, p95 = np.percentile(ms, [25, 50, 75, 95])
    return {
        "median_ms": float(median),
        "p95_ms": float(p95),
        "p25_ms": float(p25),
        "p75_ms": float(p75),
        "min_ms": float(ms.min()),
    }


def print_report(report: dict) -> None:
    """Print ``report`` (as ovss-bench's ``main`` builds it) as a table: per combo the median of
    each stage, the end-to-end median and p95 in ms, their ratios to the bare forward and to the
    first combo, and the spread."""
    bare = report["bare_forward"]["median_ms"]
    first = next(iter(report["combos"].values()))["end_to_end"]["median_ms"]
    print(
        f"{report['model']} on {report['device']} ({report['threads']} threads), "
        f"{report['input'][0]}x{report['input'][1]} input, short side {report['short_side']}, "
        f"crop {report['dense.crop'] or 'whole image'}; rows interleaved, medians in ms"
    )
    if report.get("release_rows"):
        print(
            f"{', '.join(report['release_rows'])}: on the DeOP release's file, at its own input "
            "size (short side 512, long side at most 2560), not the short side above"
        )
    spread = _spread(report["bare_forward"])
    print(
        f"bare open_clip forward: median {bare:.1f} ms, p95 "
        f"{report['bare_forward']['p95_ms']:.1f}, spread {spread}"
    )
    header = "combo".ljust(28) + "".join(s[:8].rjust(9) for s in STAGES)
    print(header + "   e2e med   e2e p95  /bare  /first  spread (IQR)")
    for combo, result in report["combos"].items():
        stages = "".join(f"{result['stages'][s]['median_ms']:9.1f}" for s in STAGES)
        e2e = result["end_to_end"]
        print(
            f"{combo[:28]:<28}{stages}{e2e['median_ms']:10.1f}{e2e['p95_ms']:10.1f}"
            f"{e2e['median_ms'] / bare:7.2f}{e2e['median_ms'] / first:8.2f}  {_spread(e2e)}"
        )
    print(
        "e2e = the sum of the stages in the same iteration (each stage ends with a device sync); "
        "spread = interquartile range: rows whose ratios differ by less are within noise"
    )


def _spread(figures: dict[str, float]) -> str:
    iqr = figures["p75_ms"] - figures["p25_ms"]
    return f"{iqr:.1f} ms ({100 * iqr / figures['median_ms']:.0f}%)"
