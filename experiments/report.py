"""What an example writes: ``results.json``, ``curves.png``, one ``grid_<image>.png`` per test
image, and a table on the terminal."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from experiments.data import Sample, center_crop, to_numpy
from experiments.evaluation import EVALUATOR
from experiments.provenance import collect_environment

RANDOM_STAMP = "RANDOM BACKBONE - smoke test only, figures are meaningless"


def stamp(random_backbone: bool) -> str:
    return f"  [{RANDOM_STAMP}]" if random_backbone else ""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(path: Path, title: str, panels: Sequence[tuple[str, Tensor]], max_side: int = 256) -> None:
    """One row of captioned panels (center-cropped to ``max_side`` pixels, not resampled)."""
    plt = _pyplot()
    crops = [center_crop(Sample("", image), max_side).clean for _, image in panels]
    h, w = crops[0].shape[-2:]
    scale = max(1.0, 180 / w)  # panels of at least 180 pixels, so that the captions fit
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * w * scale / 100, h * scale / 100 + 0.8), dpi=100)
    for ax, (caption, _), image in zip(axes, panels, crops):
        ax.imshow(to_numpy(image), interpolation="nearest")
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=8, color="red" if RANDOM_STAMP in title else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_curves(path: Path, title: str, runs: Mapping[str, dict]) -> None:
    """The L1 loss and the D2SM term of each run along training (moving averages)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for name, stats in runs.items():
        h = stats["history"]
        l1 = np.asarray(h["l1"])
        k = max(1, len(l1) // 50)
        ax1.plot(h["step"][k - 1 :], np.convolve(l1, np.ones(k) / k, mode="valid"), label=name)
        d2sm = np.asarray(h["d2sm"])
        kd = max(1, len(d2sm) // 50)  # the same smoothing where D2SM was measured at every step
        ax2.plot(h["d2sm_step"][kd - 1 :], np.convolve(d2sm, np.ones(kd) / kd, mode="valid"), label=name)
    ax1.set(title=f"L1 (moving average of {k})", xlabel="step", yscale="log")
    ax2.set(title="D2SM term (measured in both runs)", xlabel="step", yscale="log")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9, color="red" if RANDOM_STAMP in title else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(summary: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> str:
    """Metrics (rows) per run (columns), and the last column minus the one before."""
    lines = [f"{'':12s}" + "".join(f"{n:>12s}" for n in names) + f"{'diff':>12s}"]
    for key, fmt in (("psnr", "{:.3f}"), ("ssim", "{:.4f}"), ("top1_agreement", "{:.3f}"), ("kl", "{:.4f}")):
        values = [summary[n][key] for n in names]
        diff = summary[names[-1]][key] - summary[names[-2]][key]
        lines.append(f"{key:12s}" + "".join(f"{fmt.format(v):>12s}" for v in values) + f"{diff:>+12.4f}")
    return "\n".join(lines)


def write_report(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    *,
    example: str,
    description: dict,
    degraded_label: str,
    train_set: Sequence[Sample],
    prepared: Sequence[tuple[Sample, Tensor]],
    backbone_source: str,
    evaluator_source: str,
    runs: Mapping[str, dict],
    evaluation: dict,
    images: Mapping[str, Mapping[str, Tensor]],
    started: float,
) -> dict:
    """Write ``results.json``, ``curves.png`` and the grids under ``args.out``, print the table,
    and return the results. ``runs``/``evaluation`` hold an ``"l1"`` and an ``"l1+d2sm"`` run."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = evaluation["summary"]
    marker = stamp(args.random_backbone)
    title = f"{example}: L1 vs L1+{args.loss_weight:g}*D2SM ({args.backbone}), {args.steps} steps{marker}"
    clean = {sample.name: sample.clean for sample, _ in prepared}
    for row in evaluation["per_image"]:
        outputs = images[row["name"]]
        caption = f"{degraded_label}\n{row['degraded']['psnr']:.2f} dB / {row['degraded']['ssim']:.3f}"
        panels = [(caption, outputs["degraded"])]
        for name in runs:
            panels.append((f"{name}\n{row[name]['psnr']:.2f} dB / {row[name]['ssim']:.3f}, {row[name]['top1'][:18]}",
                           outputs[name]))
        panels.append((f"clean\n{row['clean_top1'][:24]}", clean[row["name"]]))
        save_grid(out / f"grid_{row['name']}.png", f"{row['name']} - {title}", panels)
    save_curves(out / "curves.png", title, runs)

    results = {
        "example": example,
        "random_backbone": bool(args.random_backbone),
        "warning": RANDOM_STAMP if args.random_backbone else None,
        "config": dict(vars(args)),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "task": description,
        "data": {
            "train": [s.name for s in train_set],
            "test": [s.name for s, _ in prepared],
            "test_sizes": [list(s.clean.shape[-2:]) for s, _ in prepared],
            "source": args.data or "built-in (scikit-image, scikit-learn, matplotlib)",
            "paired": bool(args.degraded),
        },
        "backbone": {"name": args.backbone, "weights": backbone_source},
        "evaluator": {"name": EVALUATOR, "weights": evaluator_source},
        "summary": s,
        "difference_l1+d2sm_minus_l1": {k: s["l1+d2sm"][k] - s["l1"][k] for k in s["l1"]},
        "runs": runs,
        "per_image": evaluation["per_image"],
        "total_seconds": time.perf_counter() - started,
        "environment": collect_environment(args.device),
    }
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=str)

    print(f"\n{example}{marker}: {len(prepared)} test images, {args.steps} steps x {args.batch_size} x {args.crop}px")
    print(table(s, ["degraded", "l1", "l1+d2sm"]))
    print(f"train time: l1 {runs['l1']['train_seconds']:.0f}s, l1+d2sm {runs['l1+d2sm']['train_seconds']:.0f}s; "
          f"total {results['total_seconds']:.0f}s; report in {out}/")
    return results
