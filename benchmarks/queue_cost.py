"""What the memory queue costs: a training step and its statistic as the queue grows, and
a compiled training step with a queue.

Modes (column ``mode``):

- ``sizes`` (default): ``SemanticStatisticsLoss.paper()`` (VGG19 conv5_4, image
  granularity, random weights) with ``queue_size`` in ``--queue-sizes`` (224, 1024, 4096),
  each queue kept full with random rows (the steady state), added to L1 in the examples'
  DnCNN step as in ``loss_overhead.py``'s (c). Per size: the training step (``part=step``)
  and the statistic on random rows of the same shapes with the queue's push, forward +
  backward (``part=statistics``, ``variant=incremental``); for sizes up to ``--full-max``
  also the full computation it replaces (``variant=full``: ``similarity_kl`` with the
  streaming path over the batch and the queue's rows, O((B + K)^2 D)). All cases of one
  image size are measured side by side in interleaved rounds; ``paired_ratio_vs_ref`` is
  the median per-round ratio to the smallest queue's step (or statistic). Memory: the
  queue's rows (``queue_rows_mb``, ``2 K D`` floats) and its cache (``cache_mb``,
  ``2 K^2 + 5 K`` floats), read from the buffers.
- ``compile``: the same step with ``check_inputs=False`` and a queue of 224 compiled
  (``torch.compile(step)``, inductor) from an empty queue for ``--steps`` steps: graphs
  compiled (``graphs``, target 1) and the first call's time; then the compiled and the
  eager step side by side (``paired_ratio_vs_ref``: compiled / eager).

Rows go to ``<out>/queue_cost.csv``::

    OMP_NUM_THREADS=1 taskset -c 0 python -m benchmarks.queue_cost                 # CPU: 4x96
    OMP_NUM_THREADS=1 taskset -c 0 python -m benchmarks.queue_cost --mode compile --sizes 4x64
    python -m benchmarks.queue_cost --quick                                        # smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from typing import Any

import torch

from benchmarks import loss_cases as lc
from benchmarks import measure, results
from benchmarks.loss_overhead import parse_size
from d2sm_loss import SemanticStatisticsLoss, similarity_kl
from experiments.models import DnCNN

CSV_NAME = "queue_cost.csv"
FIELDS = results.META_FIELDS + [
    "mode", "part", "variant", "queue_size", "batch", "height", "width", "N", "D", "net", "repeats", "warmup",
    "status", "time_median_ms", "time_iqr_ms", "time_min_ms", "time_max_ms", "peak_mem_mb", "mem_method",
    "ratio_time_vs_ref", "paired_ratio_vs_ref", "ratio_vs", "queue_rows_mb", "cache_mb", "steps", "graphs",
    "first_call_s", "implementation", "note",
]
KEY = ("device", "threads", "net", "batch", "height", "width", "mode", "part", "variant", "queue_size")


def paper_loss(queue_size: int, device: torch.device, check_inputs: bool = True) -> SemanticStatisticsLoss:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return SemanticStatisticsLoss.paper(pretrained=False, queue_size=queue_size, check_inputs=check_inputs).to(device)


def memory_info(loss: SemanticStatisticsLoss) -> dict[str, float]:
    queue = loss.queues[0]
    rows = queue.restored.numel() + queue.clean.numel()
    cache = sum(b.numel() for n, b in queue._buffers.items() if n not in ("restored", "clean", "filled", "position", "refused"))
    return {"queue_rows_mb": rows * queue.restored.element_size() / 2**20, "cache_mb": cache * queue.log_x.element_size() / 2**20}


def full_statistic_case(loss: SemanticStatisticsLoss, size: tuple[int, int, int], device: torch.device) -> measure.Case:
    """``similarity_kl`` (streaming) over the batch rows and the queue's rows: the full
    computation, forward + backward."""
    (probe,) = lc.probe_rows(loss, *size, device)
    past_x, past_y = probe.queue.rows()

    def prepare() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(probe.restored.shape, device=device, requires_grad=True), torch.randn(probe.clean.shape, device=device)

    def run(state: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = state
        similarity_kl(torch.cat([x, past_x]), torch.cat([y, past_y]), implementation="streaming").backward()

    return measure.Case(f"full statistic {probe.queue.size}", prepare, run)


def write(cases: list[measure.Case], refs: dict[str, measure.Case], base: dict[str, Any], csv: results.ResultsCSV) -> None:
    for case in cases:
        row = {**base, **case.info, "status": case.status}
        row["note"] = " ".join(filter(None, [base.get("note", ""), case.info.get("note", "")]))
        if case.ok and case.times:
            row.update(measure.summarize(case.times), peak_mem_mb=case.peak_bytes / 2**20, mem_method=case.mem_method,
                       first_call_s=case.first_call_s if "first_call_s" not in case.info else case.info["first_call_s"])
            ref = refs.get(case.info["part"])
            if ref is not None and ref.ok and ref.times:
                row.update(ratio_vs=ref.name, ratio_time_vs_ref=statistics.median(case.times) / statistics.median(ref.times),
                           paired_ratio_vs_ref=measure.paired_ratio(case, ref))
        csv.write(row)
        ratio = row.get("paired_ratio_vs_ref")
        print(f"{row['part']:<10} {row['variant']:<12} queue {row['queue_size']:>5}  "
              + (f"{row['time_median_ms']:>9.2f} ms (IQR {row['time_iqr_ms']:.2f})" if "time_median_ms" in row else row["status"])
              + (f"  paired ratio {ratio:.3f}" if isinstance(ratio, float) else "")
              + (f"  rows {row['queue_rows_mb']:.1f} MiB, cache {row['cache_mb']:.2f} MiB" if "cache_mb" in row else ""))


def sizes_mode(args: argparse.Namespace, size: tuple[int, int, int], device: torch.device, base: dict[str, Any],
               csv: results.ResultsCSV) -> None:
    torch.manual_seed(0)
    template = DnCNN(args.depth, args.width).to(device)
    cases: list[measure.Case] = []
    refs: dict[str, measure.Case] = {}
    for queue_size in args.queue_sizes:
        loss = paper_loss(queue_size, device)
        started = time.perf_counter()
        lc.fill_queue(loss, *size, device)
        shape = lc.row_shape(lc.probe_rows(loss, *size, device))
        print(f"queue {queue_size}: filled (cache rebuilt) in {time.perf_counter() - started:.1f} s, N={shape['N']}, D={shape['D']}")
        info = {"queue_size": queue_size, **shape, **memory_info(loss)}
        step = lc.step_case("paper", loss, copy.deepcopy(template), *size, device)
        step.info.update(info, part="step", variant="eager")
        stat = lc.statistic_case("paper", loss, *size, device)
        stat.info.update(info, part="statistics", variant="incremental")
        cases += [step, stat]
        refs.setdefault("step", step)
        refs.setdefault("statistics", stat)
        if queue_size <= args.full_max:
            full = full_statistic_case(loss, size, device)
            full.info.update(info, part="statistics", variant="full", implementation="streaming")
            cases.append(full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure.measure(cases, args.repeats, args.warmup, device)
    write(cases, refs, base, csv)


def compiled_step_case(name: str, loss: SemanticStatisticsLoss, net: torch.nn.Module, size: tuple[int, int, int],
                       device: torch.device, compiled: bool) -> measure.Case:
    """The DnCNN step of ``loss_cases.step_case`` with its forward (network, L1 and the loss)
    ``torch.compile(fullgraph=True)``-d when ``compiled``; backward and Adam run eagerly (a
    compiled optimizer would add a graph of its own once it has state)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def forward(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        restored = net(noisy)
        return torch.nn.functional.l1_loss(restored, clean) + lc.AUX_WEIGHT * loss(restored, clean)

    fn = torch.compile(forward, fullgraph=True) if compiled else forward

    def prepare() -> tuple[torch.Tensor, torch.Tensor]:
        clean = torch.rand(size[0], 3, size[1], size[2], device=device)
        return clean + 0.1 * torch.randn_like(clean), clean

    def run(state: tuple[torch.Tensor, torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        fn(*state).backward()
        optimizer.step()

    return measure.Case(name, prepare, run)


def compile_mode(args: argparse.Namespace, size: tuple[int, int, int], device: torch.device, base: dict[str, Any],
                 csv: results.ResultsCSV) -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    template = DnCNN(args.depth, args.width).to(device)
    loss = paper_loss(224, device, check_inputs=False)
    eager_loss = copy.deepcopy(loss)
    compiled = compiled_step_case("compiled step", loss, copy.deepcopy(template), size, device, compiled=True)
    counters.clear()
    started = time.perf_counter()
    first_call_s = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(args.steps):  # from the empty queue through filling and wrap-around
            compiled.run(compiled.prepare())
            if step == 0:
                first_call_s = time.perf_counter() - started
    graphs = counters["stats"]["unique_graphs"]
    print(f"compiled step: {graphs} graph(s) over {args.steps} steps (queue {loss.queues[0].count}/224), "
          f"first call {first_call_s:.1f} s, all {time.perf_counter() - started:.0f} s")
    compiled.info.update(part="step", variant="compiled", queue_size=224, steps=args.steps, graphs=graphs,
                         first_call_s=first_call_s)
    eager = compiled_step_case("eager step", eager_loss, copy.deepcopy(template), size, device, compiled=False)
    lc.fill_queue(eager_loss, *size, device)
    eager.info.update(part="step", variant="eager", queue_size=224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure.measure([eager, compiled], args.repeats, args.warmup, device)
    after = counters["stats"]["unique_graphs"]
    compiled.info["note"] = f"{after - graphs} graph(s) compiled during the timed calls"
    write([eager, compiled], {"step": eager}, base, csv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2 at 32x32, queues 8 and 32, DnCNN 3x8")
    parser.add_argument("--mode", choices=("sizes", "compile"), default="sizes")
    parser.add_argument("--sizes", type=parse_size, nargs="+", help="BxS or BxHxW (default 4x96)")
    parser.add_argument("--queue-sizes", type=int, nargs="+", default=None, help="default 224 1024 4096")
    parser.add_argument("--full-max", type=int, default=224, help="largest queue also timed with the full computation")
    parser.add_argument("--steps", type=int, default=100, help="compiled steps counted in --mode compile")
    parser.add_argument("--depth", type=int, default=None, help="DnCNN layers (default 17)")
    parser.add_argument("--width", type=int, default=None, help="DnCNN channels (default 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 2, quick 1)")
    results.add_run_arguments(parser, CSV_NAME)
    args = parser.parse_args(argv)
    device, meta = results.start_run(args, parser)
    sizes = args.sizes or ([(2, 32, 32)] if args.quick else [(4, 96, 96)])
    args.queue_sizes = args.queue_sizes or ([8, 32] if args.quick else [224, 1024, 4096])
    args.full_max = 32 if args.quick else args.full_max
    args.steps = 6 if args.quick else args.steps
    args.depth = args.depth or (3 if args.quick else 17)
    args.width = args.width or (8 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    net = f"DnCNN {args.depth}x{args.width} + Adam"
    print(f"device: {meta['device']} | torch {meta['torch']} | commit {meta['commit']} | threads {meta['threads']} | "
          f"{net} | mode {args.mode} | repeats {args.repeats}, warm-up {args.warmup}")
    csv = results.ResultsCSV(args.out / CSV_NAME, FIELDS, KEY)
    started = time.perf_counter()
    for size in sizes:
        print(f"\n== batch {size[0]} at {size[1]}x{size[2]} ==")
        base = {**meta, "net": net, "mode": args.mode, "repeats": args.repeats, "warmup": args.warmup,
                "batch": size[0], "height": size[1], "width": size[2], "note": args.note}
        (sizes_mode if args.mode == "sizes" else compile_mode)(args, size, device, base, csv)
    print(f"\nappended {len(csv.written)} rows to {csv.path} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
