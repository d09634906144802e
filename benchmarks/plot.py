"""PNG plots drawn from the results CSVs (device, versions and commit in every title).

- ``statistics_kernel_<device>[_t<threads>]_G<g>_D<d>_<kernel>.png``: time and peak
  memory against N, one line per implementation, one row of panels per mode (newest row
  per configuration; OOM points marked).
- ``loss_overhead_<device>_b<batch>_<h>x<w>.png``: the newest overhead run of that size:
  step time and memory per configuration, ratios to (a) and (b), and the loss alone
  split into backbone passes, statistics and the rest.
- ``loss_<mode>_<device>_b<batch>_<h>x<w>.png`` (``compile``, ``autocast``): the newest
  run's step time per configuration and variant, with its paired ratio to the reference.

    python -m benchmarks.plot                       # benchmarks/results/ into itself
    python -m benchmarks.plot --results <folder> --out <folder>
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from benchmarks import results
from benchmarks.judge import STATS_KEY, groups, is_cpu, precision_of
from benchmarks.loss_cases import CONFIGS, SHORT
from benchmarks.results import as_float

STATS_IMPLEMENTATIONS = ("reference", "streaming", "triton", "baseline")
STATS_MODES = ("forward", "backward", "forward+backward")


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plots drawn (pip install matplotlib)")
        return None
    return plt


def plot_statistics(csv_path: Path, out_dir: Path) -> list[Path]:
    """One PNG per (device, CPU threads, G, D, kernel), float32 products only."""
    plt = pyplot()
    rows = [{**r, "matmul_precision": precision_of(r)} for r in results.read_rows(csv_path)]
    rows = [r for r in results.latest_rows(rows, STATS_KEY)
            if not r["implementation"].startswith("matmul_") and r["matmul_precision"] == "fp32"]
    written = []
    for (device, threads, g, d, kernel, include_self), group in sorted(
            groups(rows, "device", "threads", "G", "D", "kernel", "include_self").items()):
        if plt is None:
            break
        modes = [m for m in STATS_MODES if any(r["mode"] == m for r in group)]
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.4 * len(modes)), squeeze=False)
        for i, mode in enumerate(modes):
            for impl in STATS_IMPLEMENTATIONS:
                points = sorted((int(r["N"]), r) for r in group if r["mode"] == mode and r["implementation"] == impl)
                ok = [(n, r) for n, r in points if r["status"] == "ok"]
                for j, column in enumerate(("time_median_ms", "peak_mem_mb")):
                    ax, color = axes[i][j], None
                    if ok:
                        (line,) = ax.plot([n for n, _ in ok], [as_float(r[column]) for _, r in ok], marker="o", label=impl)
                        color = line.get_color()
                    for n, r in points:
                        if r["status"].startswith("OOM"):
                            ax.axvline(n, color=color or "gray", linestyle=":", alpha=0.7)
                            ax.annotate(f"{impl} OOM", (n, 0.95), xycoords=("data", "axes fraction"), rotation=90,
                                        fontsize=7, va="top")
            for j, label in enumerate(("time, median (ms)", "peak memory above inputs (MiB)")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set(xlabel="N (rows per group)", ylabel=label, title=mode)
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=8)
        self_txt = "" if include_self in ("True", "true", "1") else ", include_self=False"
        where = f"{device}, {threads} thread(s)" if is_cpu(device) else device
        versions = f"torch {group[0]['torch']} | commit {group[-1]['commit']}"
        fig.suptitle(f"similarity_kl, {kernel} kernel, G={g}, D={d}, float32{self_txt}\n{where} | {versions}", fontsize=10)
        fig.tight_layout()
        suffix = f"_t{threads}" if is_cpu(device) and threads else ""
        path = Path(out_dir) / f"statistics_kernel_{results.slug(device)}{suffix}_G{g}_D{d}_{kernel}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _loss_split(ax, group: list[dict[str, str]]) -> None:
    """Stacked bars: backbone passes, statistics and the rest of each loss's time."""
    parts = {(r["config"], r["part"]): r for r in group if r["status"] == "ok" and r["part"] != "step"}
    configs = [c for c in CONFIGS if (c, "loss") in parts or (c, "statistics") in parts]
    for i, config in enumerate(configs):
        def median(part: str, default: float) -> float:
            row = parts.get((config, part))
            return as_float(row["time_median_ms"]) if row else default

        total, backbone, stats = median("loss", math.nan), median("backbone", 0.0), median("statistics", 0.0)
        rest = max(0.0, total - backbone - stats) if math.isfinite(total) else 0.0
        ax.bar(i, backbone, color="C0", label="backbone passes" if i == 0 else None)
        ax.bar(i, stats, bottom=backbone, color="C3", label="statistics" if i == 0 else None)
        ax.bar(i, rest, bottom=backbone + stats, color="C7", label="rest of the loss" if i == 0 else None)
        share = f"{100 * stats / total:.1f}%" if math.isfinite(total) and total > 0 else f"{stats:.1f} ms"
        ax.annotate(f"stats\n{share}", (i, backbone + stats + rest), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"({SHORT[c]}) {c}" for c in configs], fontsize=7, rotation=25, ha="right")
    ax.margins(y=0.18)
    ax.set(ylabel="time, median (ms)", title="the loss alone (forward + backward): backbone vs statistics")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def plot_loss_overhead(csv_path: Path, out_dir: Path) -> list[Path]:
    """One PNG per (device, batch, image size, network), from its newest overhead run."""
    plt = pyplot()
    rows = [r for r in results.read_rows(csv_path) if r.get("mode", "") in ("", "overhead")]
    written = []
    for (device, batch, height, width, net), group in sorted(
            groups(rows, "device", "batch", "height", "width", "net").items()):
        group = results.newest_run(group)
        step = [r for r in group if r["part"] == "step" and r["status"] == "ok"]
        if plt is None or not step:
            continue
        fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
        xs = list(range(len(step)))
        med = [as_float(r["time_median_ms"]) for r in step]
        spread = [[m - as_float(r["time_min_ms"]) for m, r in zip(med, step)],
                  [as_float(r["time_max_ms"]) - m for m, r in zip(med, step)]]
        colors = [f"C{i}" for i in xs]
        axes[0][0].bar(xs, med, yerr=spread, capsize=4, color=colors)
        axes[0][0].set(ylabel="step time, median (ms); bars: min..max", title="training step (forward, backward, Adam)")
        axes[0][1].bar(xs, [as_float(r["peak_mem_mb"]) for r in step], color=colors)
        axes[0][1].set(ylabel="peak memory of the step (MiB)", title=f"memory ({step[0]['mem_method']})")
        series = [("ratio_time_vs_a", "time / (a)"), ("ratio_time_vs_b", "time / (b)"),
                  ("ratio_mem_vs_a", "memory / (a)"), ("ratio_mem_vs_b", "memory / (b)")]
        for k, (column, name) in enumerate(series):
            axes[1][0].bar([x + (k - 1.5) * 0.2 for x in xs], [as_float(r.get(column)) for r in step], 0.2, label=name)
        axes[1][0].axhline(1.0, color="black", linewidth=0.8)
        axes[1][0].axhline(1.1, color="gray", linestyle="--", linewidth=0.8, label="1.1 (target c/b)")
        axes[1][0].set(ylabel="ratio", title="ratios to (a) L1 and (b) perceptual")
        axes[1][0].legend(fontsize=7)
        for ax in (axes[0][0], axes[0][1], axes[1][0]):
            ax.set_xticks(xs)
            ax.set_xticklabels([r["label"].replace(" + ", "+\n", 1) for r in step], fontsize=7, rotation=25, ha="right")
            ax.grid(True, axis="y", alpha=0.3)
        _loss_split(axes[1][1], group)
        notes = sorted({f"({SHORT.get(r['config'], '?')}) {r['config']}: {r['note'] or r['status']}"
                        for r in group if r["part"] == "step" and r["status"] != "ok"})
        if notes:
            fig.text(0.01, 0.005, "not measured: " + "; ".join(notes), fontsize=7, color="dimgray")
        fig.suptitle(f"Loss overhead in a training step: {net}, batch {batch} at {height}x{width}, float32\n"
                     f"{device} | torch {group[0]['torch']} | commit {group[0]['commit']} | {group[0]['date']}",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        path = Path(out_dir) / f"loss_overhead_{results.slug(device)}_b{batch}_{height}x{width}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def plot_variants(csv_path: Path, out_dir: Path) -> list[Path]:
    """One PNG per (device, mode, batch, image size, network) of the compile / autocast runs."""
    plt = pyplot()
    rows = [r for r in results.read_rows(csv_path) if r.get("mode") in ("compile", "autocast")]
    written = []
    for (device, mode, batch, height, width, net), group in sorted(
            groups(rows, "device", "mode", "batch", "height", "width", "net").items()):
        ok = [r for r in results.newest_run(group) if r["status"] == "ok"]
        if plt is None or not ok:
            continue
        fig, ax = plt.subplots(figsize=(2 + 1.3 * len(ok), 4.5))
        ax.bar(range(len(ok)), [as_float(r["time_median_ms"]) for r in ok],
               yerr=[as_float(r["time_iqr_ms"]) / 2 for r in ok], capsize=4,
               color=[f"C{list(CONFIGS).index(r['config'])}" for r in ok])
        for i, r in enumerate(ok):
            ax.annotate(f"{as_float(r['paired_ratio_vs_ref']):.2f}x", (i, 0.03 * as_float(r["time_median_ms"])),
                        ha="center", va="bottom", fontsize=9, color="white", weight="bold")
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels([f"({SHORT[r['config']]}) {r['variant']}" for r in ok], fontsize=7, rotation=25, ha="right")
        ax.set(ylabel="step time, median (ms); bars: IQR", title=f"{mode}: median of per-round ratios to {ok[0]['ratio_vs']} in each bar")
        ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"{net}, batch {batch} at {height}x{width}, D2SM backbone {ok[0]['backbone']}\n{device}, "
                     f"{ok[0]['threads']} thread(s) | torch {ok[0]['torch']} | commit {ok[0]['commit']}", fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"loss_{mode}_{results.slug(device)}_b{batch}_{height}x{width}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redraw the benchmarks' PNG plots from their CSVs.")
    parser.add_argument("--results", type=Path, default=results.DEFAULT_RESULTS, help="folder holding the CSVs")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: --results)")
    args = parser.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    for path in plot_statistics(args.results / "statistics_kernel.csv", out) + \
            plot_loss_overhead(args.results / "loss_overhead.csv", out) + \
            plot_variants(args.results / "loss_overhead.csv", out):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
