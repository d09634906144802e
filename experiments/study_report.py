"""Paired differences with confidence intervals from a study CSV (see ``study.py``): a
Markdown table and a plot.

For a configuration C, a metric m and a seed s, the paired difference is
``d_s = m(C, s) - m(L1, s)``: both runs share the seed's initialisation, batches and test
crops, so seed-to-seed variation common to both cancels. Over n seeds the table gives the mean
of d and its 95 % t-interval ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (sd with n - 1 in the
denominator). An interval that excludes 0 is an effect this study can tell from seed noise.

    python -m experiments.study_report                                   # the CPU study
    python -m experiments.study_report experiments/results/study_denoising_gpu.csv
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = (("psnr", "PSNR (dB)", "{:+.3f}"), ("ssim", "SSIM", "{:+.4f}"),
           ("kl", "KL(clean||restored)", "{:+.4f}"), ("top1_agreement", "top-1 agreement", "{:+.3f}"))

# Two-sided 95 % quantiles t_{0.975, dof} of Student's t distribution for dof = 1 .. 30, the
# standard table values (3 decimals). Beyond 30 the Cornish-Fisher expansion below is used.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(dof: int) -> float:
    """t_{0.975, dof}: the table for dof <= 30, else the Cornish-Fisher expansion around the
    normal quantile z (error below 1e-4 for dof > 30)."""
    if not isinstance(dof, int) or dof < 1:
        raise ValueError(f"dof must be a positive int, got {dof!r}")
    if dof <= len(T_975):
        return T_975[dof - 1]
    z = NormalDist().inv_cdf(0.975)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval ``(mean, low, high)``; the interval is NaN for fewer than 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci: no values")
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def values_by_seed(rows: Iterable[Mapping], config: str, metric: str) -> dict[str, float]:
    return {r["seed"]: float(r["value"]) for r in rows if r["config"] == config and r["metric"] == metric}


def paired_differences(rows: Sequence[Mapping], config: str, metric: str, baseline: str = "l1") -> dict[str, float]:
    """``{seed: value(config, seed) - value(baseline, seed)}`` over the seeds both have."""
    ours, base = values_by_seed(rows, config, metric), values_by_seed(rows, baseline, metric)
    return {seed: ours[seed] - base[seed] for seed in sorted(ours.keys() & base.keys(), key=int)}


def configs(rows: Sequence[Mapping]) -> list[dict]:
    """The D2SM configurations in the CSV's order, with their weight and mean ratio at init."""
    found: dict[str, dict] = {}
    for r in rows:
        if r["loss"] == "l1+d2sm" and r["config"] not in found:
            found[r["config"]] = {key: r[key] for key in
                                  ("config", "depth", "layer", "granularity", "target_ratio", "weight")}
    for c in found.values():
        ratios = values_by_seed(rows, c["config"], "grad_ratio_init")
        c["ratio"] = sum(ratios.values()) / len(ratios) if ratios else math.nan
        c["target_ratio"] = f"{float(c['target_ratio']):g}"
    depth_order = {"middle": 0, "deepest": 1}  # the grid's order, whichever run finished first
    return sorted(found.values(), key=lambda c: (depth_order.get(c["depth"], 2), c["depth"], c["granularity"],
                                                 float(c["target_ratio"])))


def interval(values: Sequence[float], fmt: str) -> str:
    mean, low, high = mean_ci(values)
    marker = "**" if low > 0 or high < 0 else ""  # the interval excludes 0
    return f"{marker}{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]{marker}"


def table(rows: Sequence[Mapping]) -> str:
    """Markdown: one line per D2SM configuration, the mean paired difference [95 % CI] per metric."""
    head = ("| configuration | layer | weight | ratio at init | n | "
            + " | ".join(f"Δ {label}" for _, label, _ in METRICS) + " |")
    lines = [head, "|" + "---|" * (5 + len(METRICS))]
    for c in configs(rows):
        diffs = {m: paired_differences(rows, c["config"], m) for m, _, _ in METRICS}
        n = min(len(d) for d in diffs.values())
        cells = [interval(list(diffs[m].values()), fmt) for m, _, fmt in METRICS]
        name = f"{c['depth']} / {c['granularity']} / r {c['target_ratio']}"
        lines.append(f"| {name} | {c['layer']} | {float(c['weight']):.3g} | {c['ratio']:.3g} | {n} | "
                     + " | ".join(cells) + " |")
    base = []
    for m, label, _ in METRICS:
        mean, low, high = mean_ci(list(values_by_seed(rows, "l1", m).values()))
        noisy = values_by_seed(rows, "noisy_input", m)
        base.append(f"{label}: L1 {mean:.4g} [{low:.4g}, {high:.4g}]"
                    + (f", noisy input {next(iter(noisy.values())):.4g}" if noisy else ""))
    return "\n".join(lines) + "\n\nBaselines (mean over seeds [95 % CI]): " + "; ".join(base) + "\n"


def plot(rows: Sequence[Mapping], path: Path, title: str) -> None:
    """One panel per metric: each configuration's paired differences (dots, one per seed) and
    their mean with the 95 % interval (bar); the dashed line is no difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = configs(rows)
    labels = [f"{c['depth']}/{c['granularity']}/r{c['target_ratio']}" for c in found]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 0.35 * len(found) + 1.6), sharey=True)
    for ax, (metric, label, _) in zip(axes, METRICS):
        for y, c in enumerate(found):
            diffs = list(paired_differences(rows, c["config"], metric).values())
            mean, low, high = mean_ci(diffs)
            color = "C0" if c["granularity"] == "image" else "C1"
            ax.plot(diffs, [y] * len(diffs), ".", color="0.6", ms=4)
            if not math.isnan(low):
                ax.plot([low, high], [y, y], "-", color=color, lw=2)
            ax.plot([mean], [y], "o", color=color, ms=5)
        ax.axvline(0, color="k", ls="--", lw=0.8)
        ax.set_title(f"Δ {label} (D2SM - L1)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(found)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=9, color="red" if "RANDOM" in title else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="?", type=Path, default=RESULTS / "study_denoising.csv")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: the CSV's name with .png)")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    first = next(r for r in rows if r["loss"] == "l1")
    title = (f"denoising study: {first['model']}, {first['steps']} steps x {first['batch_size']} x {first['crop']}px, "
             f"{first['test_crops']} test crops; {first['device']}, "
             f"commit {', '.join(sorted({r['commit'] for r in rows}))}")
    if first["backbone_weights"].startswith("RANDOM"):
        title += "  [RANDOM BACKBONE - smoke test only]"
    text = f"{title}\n\n{table(rows)}"
    plot(rows, args.plot or args.csv.with_suffix(".png"), title)
    print(text)
    return text


if __name__ == "__main__":
    main()
