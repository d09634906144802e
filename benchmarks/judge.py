"""PASS/FAIL lines for the benchmarks' targets, read from the results CSVs.

Statistics (``statistics_kernel.csv``, newest row per configuration, per device, threads,
matmul precision and kernel; forward + backward, float32):

- GPU: Triton vs the plain reference at G = 8, N = 4096, D = 256: >= 4x faster and
  <= 1/20 of its peak memory; Triton at G = 8, N = 16384, D = 256 within 2 GB (2e9 bytes)
  above the inputs; Triton vs the dense baseline at G = 8, N = 4096, D = 256: >= 4x
  faster and >= 20x less memory.
- CPU: streaming vs reference at G = 1, N = 4096, D = 64: <= 1/10 of its peak memory at
  <= 1.5x its time.

and the largest N each implementation ran before running out of memory.

Training step (``loss_overhead.csv``, the newest overhead run per device, network and
image size; defined on the GPU, marked indicative on a CPU): the statistics take <= 5 %
of the loss's time at image granularity (``paper``); the ``paper`` step takes <= 1.05x the
perceptual step (b); at N = 4096 the Triton statistics are >= 4x faster and use >= 20x
less memory than the contextual loss's. Compile and autocast runs print their ratios
(no target).

    python -m benchmarks.judge                      # benchmarks/results/
    python -m benchmarks.judge --results <folder> --device H100
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Iterable

from benchmarks import results
from benchmarks.results import as_float

STATS_KEY = ("device", "threads", "implementation", "mode", "G", "N", "D", "kernel", "include_self", "dtype",
             "matmul_precision")
#: The memory bound at G = 8, N = 16384, read as 2 GB = 2e9 bytes.
TRITON_16K_MEMORY_BYTES = 2e9


def is_cpu(device: str) -> bool:
    return device.startswith("CPU")


def precision_of(row: dict[str, str]) -> str:
    """``matmul_precision``; rows written before that column say ``tf32`` first in their note."""
    return row.get("matmul_precision") or ("tf32" if row.get("note", "").startswith("tf32") else "fp32")


def groups(rows: Iterable[dict[str, str]], *columns: str) -> dict[tuple, list[dict[str, str]]]:
    out: dict[tuple, list[dict[str, str]]] = {}
    for row in rows:
        out.setdefault(tuple(row.get(c, "") for c in columns), []).append(row)
    return out


# --- statistics -----------------------------------------------------------------------


def statistics_targets(rows: list[dict[str, str]], on_cuda: bool, ceiling: float | None = None) -> list[str]:
    """Target lines for one device, precision and kernel (rows: newest per configuration;
    ``ceiling``: the matmul TFLOP/s measured in the same precision on that device)."""

    def find(impl: str, g: int, n: int, d: int) -> dict[str, str] | None:
        for row in rows:
            if (row["implementation"], row["mode"], int(row["G"]), int(row["N"]), int(row["D"])) == \
                    (impl, "forward+backward", g, n, d) and row["status"] == "ok":
                return row
        return None

    def missing(*points: tuple[str, int, int, int]) -> str:
        status = {(r["implementation"], int(r["G"]), int(r["N"]), int(r["D"])): r["status"] for r in rows
                  if r["mode"] == "forward+backward"}
        what = ", ".join(f"{i} G={g} N={n} D={d}: {status.get((i, g, n, d), 'not run')}" for i, g, n, d in points
                         if find(i, g, n, d) is None)
        return f"not measured ({what})"

    def time_of(row: dict[str, str]) -> float:
        return as_float(row["time_median_ms"])

    def memory(row: dict[str, str]) -> float:
        return as_float(row["peak_mem_mb"])

    lines = []
    if on_cuda:
        ref, tri, base = find("reference", 8, 4096, 256), find("triton", 8, 4096, 256), find("baseline", 8, 4096, 256)
        label = "GPU: triton vs reference, G=8 N=4096 D=256: >= 4x faster, <= 1/20 of its peak memory"
        if ref and tri:
            speed, mem = time_of(ref) / time_of(tri), memory(tri) / memory(ref)
            verdict = "PASS" if speed >= 4 and mem <= 1 / 20 else "FAIL"
            lines.append(f"{label}: {speed:.2f}x faster, memory {mem:.4f} of the reference's -> {verdict}")
        else:
            lines.append(f"{label}: {missing(('reference', 8, 4096, 256), ('triton', 8, 4096, 256))}")
        tri16 = find("triton", 8, 16384, 256)
        label = "GPU: triton G=8 N=16384 D=256: peak memory above the inputs <= 2 GB (2e9 bytes)"
        if tri16:
            peak = memory(tri16) * 2**20
            lines.append(f"{label}: {peak / 1e9:.3f} GB -> {'PASS' if peak <= TRITON_16K_MEMORY_BYTES else 'FAIL'}")
        else:
            lines.append(f"{label}: {missing(('triton', 8, 16384, 256))}")
        label = "GPU: triton vs dense baseline, G=8 N=4096 D=256: >= 4x faster, >= 20x less memory"
        if base and tri:
            speed, mem = time_of(base) / time_of(tri), memory(base) / memory(tri) if memory(tri) > 0 else math.inf
            verdict = "PASS" if speed >= 4 and mem >= 20 else "FAIL"
            lines.append(f"{label}: {speed:.2f}x faster, {mem:.1f}x less memory -> {verdict}")
        else:
            lines.append(f"{label}: {missing(('baseline', 8, 4096, 256), ('triton', 8, 4096, 256))}")
        for n in (4096, 16384):
            label = f"GPU: triton G=8 N={n} D=256: executed FLOP/s >= 40% of the measured matmul ceiling"
            row = find("triton", 8, n, 256)
            if row and ceiling and math.isfinite(as_float(row.get("tflops_executed"))):
                pct = 100.0 * as_float(row["tflops_executed"]) / ceiling
                lines.append(f"{label}: {as_float(row['tflops_executed']):.1f} of {ceiling:.1f} TFLOP/s, {pct:.0f}% -> "
                             f"{'PASS' if pct >= 40 else 'FAIL'}")
            else:
                lines.append(f"{label}: " + (missing(("triton", 8, n, 256)) if not row else
                                              "not measured (no matmul ceiling row for this precision)"))
    else:
        ref, stream = find("reference", 1, 4096, 64), find("streaming", 1, 4096, 64)
        label = "CPU: streaming vs reference, G=1 N=4096 D=64: memory <= 1/10, time <= 1.5x"
        if ref and stream:
            ratio, mem = time_of(stream) / time_of(ref), memory(stream) / memory(ref)
            verdict = "PASS" if ratio <= 1.5 and mem <= 1 / 10 else "FAIL"
            lines.append(f"{label}: time {ratio:.2f}x, memory {mem:.4f} of the reference's -> {verdict}")
        else:
            lines.append(f"{label}: {missing(('reference', 1, 4096, 64), ('streaming', 1, 4096, 64))}")
    return lines


def largest_n(rows: list[dict[str, str]]) -> list[str]:
    """Per implementation and mode, the largest N that ran at each G and D (``>=`` when
    nothing ran out of memory: then only the sweep's largest)."""
    lines = []
    for (impl, mode), by_mode in sorted(groups(rows, "implementation", "mode").items()):
        if impl.startswith("matmul_"):
            continue
        texts = []
        for (g, d), group in sorted(groups(by_mode, "G", "D").items(), key=lambda item: tuple(map(int, item[0]))):
            ok = [int(r["N"]) for r in group if r["status"] == "ok"]
            oom = [int(r["N"]) for r in group if r["status"].startswith("OOM")]
            errors = sorted(int(r["N"]) for r in group if r["status"] != "ok" and not r["status"].startswith("OOM"))
            text = f"N={max(ok) if ok else '-'} (OOM at N={min(oom)})" if oom else \
                f"N>={max(ok)} (no OOM in sweep)" if ok else "nothing ran"
            texts.append(f"G={g} D={d}: {text}" + (f", errors at N={','.join(map(str, errors))}" if errors else ""))
        lines.append(f"{impl} {mode}: " + "; ".join(texts))
    return lines


def judge_statistics(rows: list[dict[str, str]]) -> list[str]:
    lines = []
    latest = results.latest_rows(({**r, "matmul_precision": precision_of(r)} for r in rows), STATS_KEY)
    for (device, threads, precision, kernel), group in groups(latest, "device", "threads", "matmul_precision",
                                                               "kernel").items():
        if kernel == "matmul":
            continue
        where = f"{device}, {threads} thread(s)" if is_cpu(device) else device
        lines.append(f"similarity_kl on {where}, {precision} products, {kernel} kernel:")
        ceilings = [as_float(r["tflops_nominal"]) for r in latest if r["kernel"] == "matmul" and r["status"] == "ok"
                    and (r["device"], r["threads"], r["matmul_precision"]) == (device, threads, precision)]
        lines += ["  " + line for line in statistics_targets(group, on_cuda=not is_cpu(device),
                                                             ceiling=ceilings[-1] if ceilings else None)]
        lines.append("  largest N that ran:")
        lines += ["    " + line for line in largest_n(group)]
    return lines


# --- training step ----------------------------------------------------------------------


def loss_targets(rows: list[dict[str, str]], on_cuda: bool) -> list[str]:
    """Target lines for the overhead rows of one run, device, network and image size."""
    tag = "" if on_cuda else " [CPU: indicative only, the target is defined on the GPU]"
    ok = {(r["config"], r["part"]): r for r in rows if r["status"] == "ok"}
    status = {(r["config"], r["part"]): r["status"] for r in rows}
    lines = []
    stats, loss = ok.get(("paper", "statistics")), ok.get(("paper", "loss"))
    share = as_float(stats.get("share_pct")) if stats else math.nan
    if math.isfinite(share):
        lines.append(f"statistics <= 5% of the loss's time (image granularity): {share:.2f}% -> "
                     f"{'PASS' if share <= 5 else 'FAIL'}{tag}")
    else:
        why = f"statistics {status.get(('paper', 'statistics'), 'not run')}, loss " \
              f"{loss['status'] if loss else status.get(('paper', 'loss'), 'not run')}"
        lines.append(f"statistics <= 5% of the loss's time: not measured ({why})")
    paper, vgg = ok.get(("paper", "step")), ok.get(("vgg", "step"))
    if paper and vgg:
        ratio = as_float(paper["time_median_ms"]) / as_float(vgg["time_median_ms"])
        pair = as_float(paper.get("paired_ratio_vs_b"))
        pair_txt = f" (median of per-round ratios {pair:.3f}x)" if math.isfinite(pair) else ""
        lines.append(f"paper step <= 1.05x perceptual step (b): {ratio:.3f}x{pair_txt} -> "
                     f"{'PASS' if ratio <= 1.05 else 'FAIL'}{tag}")
    else:
        lines.append("paper step <= 1.05x perceptual step (b): not measured (needs configs paper and vgg)")
    tri = ok.get(("loc-triton", "statistics"))
    if tri and int(tri["N"]) == 4096:
        for peer_name in ("contextual", "dense-kl"):
            peer = ok.get((peer_name, "statistics"))
            if peer is None:
                continue
            speed = as_float(peer["time_median_ms"]) / as_float(tri["time_median_ms"])
            mem = as_float(peer["peak_mem_mb"]) / as_float(tri["peak_mem_mb"]) if as_float(tri["peak_mem_mb"]) > 0 \
                else math.inf
            primary = "" if peer_name == "contextual" else " (informative: same KL, dense)"
            lines.append(f"triton >= 4x faster, >= 20x less memory than {peer_name} at N=4096, G={tri['G']}, "
                         f"D={tri['D']}{primary}: {speed:.2f}x faster, {mem:.1f}x less memory -> "
                         f"{'PASS' if speed >= 4 and mem >= 20 else 'FAIL'}{tag}")
    else:
        why = "no N=4096 at the location layer (256x256 with features.17)" if tri else \
            f"loc-triton {status.get(('loc-triton', 'statistics'), 'not run')}"
        lines.append(f"triton vs contextual at N=4096: not measured ({why})")
        mine, peer = ok.get(("loc-streaming", "statistics")), ok.get(("contextual", "statistics"))
        if mine and peer and as_float(mine["peak_mem_mb"]) > 0:
            lines.append(f"  for information: at N={mine['N']}, G={mine['G']}, D={mine['D']} the contextual statistic "
                         f"takes {as_float(peer['time_median_ms']) / as_float(mine['time_median_ms']):.2f}x the time "
                         f"and {as_float(peer['peak_mem_mb']) / as_float(mine['peak_mem_mb']):.1f}x the memory of "
                         "the torch streaming one")
    return lines


def variant_lines(rows: list[dict[str, str]]) -> list[str]:
    """Compile / autocast runs: each variant's step time against the reference variant's."""
    lines = []
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['config']} {row['variant']}: {row['status']}")
            continue
        extra = f", first call {as_float(row['first_call_s']):.1f} s" if row.get("first_call_s") else ""
        if row.get("graphs"):
            extra += f", {row['graphs']} graphs ({row['recompiles'] or 0} compiled during timing), " \
                     f"{row['graph_breaks'] or 0} graph breaks"
        lines.append(f"{row['config']} {row['variant']}: {as_float(row['time_median_ms']):.1f} ms, "
                     f"{as_float(row['ratio_time_vs_ref']):.3f}x {row['ratio_vs']} "
                     f"(paired {as_float(row['paired_ratio_vs_ref']):.3f}x), memory "
                     f"{as_float(row['ratio_mem_vs_ref']):.2f}x{extra}")
    return lines


def judge_loss(rows: list[dict[str, str]]) -> list[str]:
    lines = []
    columns = ("device", "threads", "net", "backbone", "batch", "height", "width", "mode")
    for key, group in groups(rows, *columns).items():
        run = results.newest_run(group)
        device, threads, net, backbone, batch, height, width, mode = key
        where = f"{device}, {threads} thread(s)" if is_cpu(device) else device
        lines.append(f"training step, {mode or 'overhead'}: {net}, D2SM backbone {backbone or 'vgg19'}, batch {batch} "
                     f"at {height}x{width}, {where}, commit {run[0]['commit']}:")
        body = variant_lines(run) if mode in ("compile", "autocast") else loss_targets(run, on_cuda=not is_cpu(device))
        lines += ["  " + line for line in body]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PASS/FAIL lines for the benchmarks' targets, from the CSVs.")
    parser.add_argument("--results", type=Path, default=results.DEFAULT_RESULTS, help="folder holding the CSVs")
    parser.add_argument("--device", default="", help="only rows whose device contains this text")
    args = parser.parse_args(argv)

    print("\n".join(judge_lines(args.results, args.device)))
    return 0


def judge_lines(folder: Path, device: str = "") -> list[str]:
    """Every judged line for the CSVs in ``folder`` (rows whose device contains ``device``)."""

    def load(name: str) -> list[dict[str, str]]:
        return [r for r in results.read_rows(folder / name) if device.lower() in r["device"].lower()]

    lines = judge_statistics(load("statistics_kernel.csv")) + judge_loss(load("loss_overhead.csv"))
    return lines or [f"no rows in {folder}"]


if __name__ == "__main__":
    sys.exit(main())
