"""The loss under torch.distributed: 2 gloo processes on the CPU against one process.

Checked over several steps, with queue wrap-around and unequal batch sizes: the loss on
each rank equals the single-process loss on the concatenated batch, each rank's image
gradient equals its slice of the single-process gradient (times the world size with
``ddp_gradient_scale=True``), the queues are bitwise equal on all ranks, and a DDP
model update equals the single-process update.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from d2sm_loss import SemanticStatisticsLoss, similarity_kl

pytestmark = pytest.mark.filterwarnings("ignore:SemanticStatisticsLoss. restored has values outside")

WORLD = 2
STEPS = 4
SIZES = [3, 2]  # unequal per-rank batches; 5 rows a step wrap a queue of 7


def make_loss(**kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 5, stride=4), nn.Tanh())
    return SemanticStatisticsLoss(net, **{"queue_size": 7, "pool_size": 2, "similarity": "softmax", **kwargs})


def batch(step, size=sum(SIZES)):
    g = torch.Generator().manual_seed(step)
    clean = torch.rand(size, 3, 24, 24, generator=g)
    restored = torch.rand(size, 3, 24, 24, generator=g)
    return restored, clean


def make_model():
    torch.manual_seed(1)
    return nn.Conv2d(3, 3, 3, padding=1)


def run_steps(criterion, rows):
    """Losses, image gradients and queue state over STEPS steps, on the images ``rows``."""
    out = {"loss": [], "grad": []}
    for step in range(STEPS):
        restored, clean = batch(step)
        restored = restored[rows].clone().requires_grad_()
        loss = criterion(restored, clean[rows])
        loss.backward()
        out["loss"].append(loss.detach())
        out["grad"].append(restored.grad)
    queue = criterion.queues[0]
    out["queue"] = {name: buffer.clone() for name, buffer in queue._buffers.items()}  # rows, counters, cache
    out["queue_state"] = {"count": queue.count, "position": int(queue.position)}
    return out


def reference_steps(criterion, rows):
    """float64: the loss and gradient of each step, and those of the full statistic over the
    gathered batch plus the queue's rows (the reference)."""
    out = {"loss": [], "grad": [], "ref_loss": [], "ref_grad": []}
    for step in range(STEPS):
        restored, clean = (t.double() for t in batch(step))
        restored = restored[rows].clone().requires_grad_()
        (layer,) = criterion.rows(restored, clean[rows])
        x, y = layer.all_rows()
        want = similarity_kl(x, y, similarity="softmax", implementation="reference")
        (want_grad,) = torch.autograd.grad(want, restored)
        loss = criterion(restored, clean[rows])
        (grad,) = torch.autograd.grad(loss, restored)
        for key, value in zip(out, (loss.detach(), grad, want.detach(), want_grad)):
            out[key].append(value)
    return out


def validate_on_rank_zero(rank):
    """Rank 0 alone validates (eval, no_grad), as plain DDP scripts do: no collective may
    run, else it waits for rank 1 until the timeout. Then both ranks train one more step."""
    criterion = make_loss()
    restored, clean = batch(0)
    criterion(restored[rank : rank + 2], clean[rank : rank + 2])
    value = None
    if rank == 0:
        with torch.no_grad():
            value = criterion.eval()(*batch(7, size=2)).item()
        criterion.train()
    dist.barrier()
    criterion(restored[rank : rank + 2], clean[rank : rank + 2])
    return value


def model_step(criterion, rows, wrap):
    model = make_model()
    trained = wrap(model)
    noisy, clean = batch(100, size=4)
    restored = trained(noisy[rows])
    loss = nn.functional.l1_loss(restored, clean[rows]) + 0.5 * criterion(restored, clean[rows])
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def worker(rank, init_file, out_dir):
    import datetime

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        results = {
            "exact": run_steps(make_loss(ddp_gradient_scale=False), rows),
            "scaled": run_steps(make_loss(), rows),
            "float64": reference_steps(make_loss(ddp_gradient_scale=False).double(), rows),
            "validation": validate_on_rank_zero(rank),
        }
        equal_rows = slice(2 * rank, 2 * rank + 2)
        results["model_grads"] = model_step(
            make_loss(), equal_rows, lambda m: nn.parallel.DistributedDataParallel(m)
        )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_results():
    assert not dist.is_initialized()
    return {
        "exact": run_steps(make_loss(), slice(None)),
        "model_grads": model_step(make_loss(), slice(None), lambda m: m),
    }


def test_loss_on_every_rank_equals_single_process_loss(distributed_results, single_results):
    for rank_results in distributed_results:
        for name in ("exact", "scaled"):
            for got, want in zip(rank_results[name]["loss"], single_results["exact"]["loss"]):
                assert want > 1e-3
                torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_each_rank_gets_its_slice_of_the_gradient(distributed_results, single_results):
    for rank, rank_results in enumerate(distributed_results):
        start = sum(SIZES[:rank])
        for step in range(STEPS):
            want = single_results["exact"]["grad"][step][start : start + SIZES[rank]]
            assert want.abs().sum() > 0
            torch.testing.assert_close(rank_results["exact"]["grad"][step], want, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(rank_results["scaled"]["grad"][step], WORLD * want, rtol=1e-5, atol=1e-9)


def test_queues_are_bitwise_equal_across_ranks_and_match_single_process(distributed_results, single_results):
    first, second = distributed_results
    assert first["exact"]["queue_state"] == second["exact"]["queue_state"]
    assert first["exact"]["queue_state"]["count"] == 7  # filled and wrapped: 4 steps x 5 rows
    assert {"restored", "clean", "log_x", "log_y", "log_zx"} <= set(first["exact"]["queue"])
    for key, value in first["exact"]["queue"].items():
        assert torch.equal(value, second["exact"]["queue"][key]), key
        torch.testing.assert_close(value, single_results["exact"]["queue"][key], rtol=1e-6, atol=1e-7)


def test_incremental_statistic_under_ddp_equals_the_full_one(distributed_results):
    """float64, unequal batches, a queue of 7 wrapped by 5 rows a step."""
    for rank_results in distributed_results:
        result = rank_results["float64"]
        for got, want in zip(result["loss"], result["ref_loss"]):
            assert want > 1e-3 and abs(got - want) <= 1e-10 * want
        for got, want in zip(result["grad"], result["ref_grad"]):
            assert want.abs().max() > 0 and (got - want).abs().max() <= 1e-10 * want.abs().max()


def test_validation_on_rank_zero_alone_does_not_communicate(distributed_results):
    single = make_loss()
    with torch.no_grad():
        want = single.eval()(*batch(7, size=2)).item()
    assert distributed_results[0]["validation"] == pytest.approx(want, rel=1e-6)
    assert distributed_results[1]["validation"] is None


def test_ddp_model_update_equals_single_process_update(distributed_results, single_results):
    for rank_results in distributed_results:
        for got, want in zip(rank_results["model_grads"], single_results["model_grads"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_distributed_option_is_a_no_op_without_process_group():
    restored, clean = batch(0)
    on, off = make_loss(), make_loss(distributed=False)
    torch.testing.assert_close(on(restored, clean), off(restored, clean))


def test_ddp_example_runs_under_torchrun(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("skimage")
    script = Path(__file__).resolve().parents[1] / "examples" / "ddp_training.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "--steps", "4", "--random-backbone", "--crop", "48", "--pool", "24", "--out", str(tmp_path)]
    from helpers import subprocess_env

    env = subprocess_env(OMP_NUM_THREADS="1")  # the d2sm_loss this run tests
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "ddp_results.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 4
    assert result["queues_identical_across_ranks"] is True
    assert all(torch.isfinite(torch.tensor([h["l1"], h["d2sm"]])).all() for h in result["history"])


# --- validation on one rank only ---------------------------------------------------------


def rank0_validates_worker(rank, init_file, out_dir):
    """Both ranks train a step; then rank 0 alone computes the loss in eval mode, under
    no_grad, and in training mode under no_grad (what a rank-0-only validation loop does),
    while rank 1 waits at a barrier. A collective in those calls would never be matched."""
    import datetime

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30)
    )
    try:
        criterion = make_loss(queue_size=0)
        restored, clean = batch(0, size=4)
        own = slice(2 * rank, 2 * rank + 2)
        criterion(restored[own].clone().requires_grad_(), clean[own]).backward()
        values = {}
        if rank == 0:
            val_restored, val_clean = batch(7, size=3)
            criterion.eval()
            values["eval"] = criterion(val_restored, val_clean)
            with torch.no_grad():
                values["eval_no_grad"] = criterion(val_restored, val_clean)
            criterion.train()
            with torch.no_grad():
                values["train_no_grad"] = criterion(val_restored, val_clean)
            with torch.inference_mode():
                values["train_inference_mode"] = criterion(val_restored, val_clean)
            values = {k: v.detach().clone() for k, v in values.items()}
        dist.barrier()
        torch.save(values, os.path.join(out_dir, f"validate{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(worker, tmp_path, hung: str, seconds: float = 120) -> None:
    """Run ``worker(rank, init_file, out_dir)`` on ``WORLD`` spawned ranks; a rank that dies
    (e.g. an abort inside gloo, exit -6) raises here, and ranks still running after
    ``seconds`` fail the test with ``hung`` and are killed."""
    import time

    context = mp.start_processes(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + seconds
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(hung)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def test_validation_on_rank_zero_only_does_not_communicate(tmp_path):
    run_ranks(rank0_validates_worker, tmp_path,
              hung="rank-0-only validation hung: a non-training call waited for the other rank")
    values = torch.load(tmp_path / "validate0.pt")
    val_restored, val_clean = batch(7, size=3)
    want = make_loss(queue_size=0, distributed=False)(val_restored, val_clean)
    assert want > 1e-3
    for name, value in values.items():  # rank 0's batch alone, as in a single process
        torch.testing.assert_close(value, want.detach(), rtol=1e-6, atol=0, msg=name)


# --- ranks that disagree ------------------------------------------------------------------


def disagreeing_worker(rank, init_file, out_dir):
    """Each case gives rank 1 something rank 0 does not have; every rank records the error it
    raised. A last ordinary step shows that the process group is still usable."""
    import datetime

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30)
    )
    try:
        errors = {}

        def attempt(name, criterion, restored, clean):
            try:
                criterion(restored.requires_grad_(), clean).backward()
                errors[name] = None
            except ValueError as error:
                errors[name] = str(error)

        # Images of another size: rows of another width (no pool_size).
        side = 24 if rank == 0 else 32
        attempt("size", make_loss(pool_size=None), torch.rand(2, 3, side, side), torch.rand(2, 3, side, side))
        double = rank == 1
        criterion = make_loss().double() if double else make_loss()
        attempt("dtype", criterion, *(t.double() if double else t for t in batch(2, size=2)))
        for name, side, check in (("nan_restored", 0, True), ("inf_clean", 1, True), ("nan_clean_unchecked", 1, False)):
            images = [t.clone() for t in batch(3, size=2)]
            if rank == 1:
                images[side][1, 0, 4, 4] = float("nan") if name.startswith("nan") else float("inf")
            attempt(name, make_loss(check_inputs=check), *images)
        attempt("after", make_loss(), *batch(4, size=2))
        torch.save(errors, os.path.join(out_dir, f"disagree{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_that_disagree_raise_the_same_error_on_every_rank(tmp_path):
    run_ranks(disagreeing_worker, tmp_path, hung="ranks that disagree hung")
    first, second = (torch.load(tmp_path / f"disagree{rank}.pt") for rank in range(WORLD))
    assert first == second  # the same message on every rank
    assert "rank 1 has rows of 294 features (images of 32x32) against rank 0's 150 (images of 24x24)" in first["size"]
    assert "rank 1 has float64 features against rank 0's float32" in first["dtype"]
    assert "rank 1's restored images contain NaN or inf" in first["nan_restored"]
    assert "rank 1's clean images contain NaN or inf" in first["inf_clean"]
    assert "rank 1's clean images contain NaN or inf" in first["nan_clean_unchecked"]
    assert first["after"] is None
