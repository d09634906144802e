"""Faults across a run: non-finite values, a poisoned queue, resume, loss-state files,
loading under inference mode and activation checkpointing.

- A NaN or inf anywhere in a row gives NaN on every path (reference, streaming, Triton,
  the queue's incremental path, the module with ``check_inputs=False``), never a number.
- The queue pushes finite batches only: after a refused batch, the next steps are bitwise
  those of a run that never saw it.
- A loss restored from a ``save_queue=True`` state continues bitwise like the uninterrupted
  one (wrap-around, several feature widths, float32 and float64); a damaged state is an error.
- Loss-state files are written atomically; empty, truncated and foreign files are
  :class:`~d2sm_loss.weights.CheckpointError` naming the file and what to do.
- ``load_state_dict`` under ``inference_mode`` / ``no_grad`` leaves buffers usable for training.
- Activation checkpointing: a recomputed call with a queue raises; without one the gradient
  equals the gradient without checkpointing.

The distributed cases (ranks that disagree) are in ``test_distributed.py``.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from d2sm_loss import similarity_kl, weights
from d2sm_loss.queue import FeatureQueue

from helpers import conv_loss, images, triton_skip_reason

pytestmark = pytest.mark.filterwarnings("ignore:SemanticStatisticsLoss. the restored images are outside")

BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def features(n=7, d=19, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (y + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype), y.to(dtype)


# -- 1. non-finite values propagate ------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["reference", "streaming", "triton"])
@pytest.mark.parametrize("similarity", ["cosine", "softmax"])
@pytest.mark.parametrize("side", ["restored", "clean"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_non_finite_value_gives_nan_on_every_implementation(implementation, similarity, side, bad):
    if implementation == "triton" and triton_skip_reason():
        pytest.skip(triton_skip_reason())
    x, y = features()
    (x if side == "restored" else y)[2, 5] = BAD[bad]
    x.requires_grad_()
    value = similarity_kl(x, y, similarity=similarity, implementation=implementation)
    assert value.isnan(), float(value)
    rows = similarity_kl(x, y, similarity=similarity, implementation=implementation, reduction="none")
    assert rows.isnan().all()  # every row compares with the bad one
    (grad,) = torch.autograd.grad(value, x)
    assert not torch.isfinite(grad).all()  # no finite gradient towards garbage


@pytest.mark.parametrize("similarity", ["cosine", "softmax"])
@pytest.mark.parametrize("side", ["restored", "clean"])
def test_a_non_finite_batch_gives_nan_on_the_queue_path(similarity, side):
    queue = FeatureQueue(5, similarity=similarity)
    for seed in range(3):  # a filled queue of finite rows
        x, y = features(3, seed=seed)
        *_, blocks = queue(x, y)
        queue.push(x, y, blocks)
    x, y = features(3, seed=9)
    (x if side == "restored" else y)[1, 0] = math.nan
    x.requires_grad_()
    kl_batch, kl_queue, count, _ = queue(x, y)
    value = (kl_batch.sum() + kl_queue.sum()) / count
    assert value.isnan() and kl_batch.isnan().all() and kl_queue[: queue.count].isnan().all()
    (grad,) = torch.autograd.grad(value, x)
    assert not torch.isfinite(grad).all()


@pytest.mark.parametrize("queue_size", [0, 6])
@pytest.mark.parametrize("side", ["restored", "clean"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_the_module_without_checks_returns_nan_for_a_non_finite_pixel(queue_size, side, bad):
    loss = conv_loss(queue_size=queue_size, check_inputs=False)
    restored, clean = images(4)
    loss(restored, clean)  # the queue holds finite rows
    restored, clean = images(4, seed=1)
    with torch.no_grad():
        (restored if side == "restored" else clean)[2, 1, 7, 9] = BAD[bad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = loss(restored, clean)
    assert value.isnan(), float(value)


# -- 2. the queue accepts only finite rows -----------------------------------------------------


def batches(steps, size=3, seed=0):
    return [images(size, size=32, seed=seed + step) for step in range(steps)]


def train(loss, steps):
    """Losses and image gradients of ``steps`` (a list of image pairs)."""
    values, grads = [], []
    for restored, clean in steps:
        restored = restored.detach().clone().requires_grad_()
        value = loss(restored, clean)
        if value.isfinite():
            value.backward()
        values.append(value.detach())
        grads.append(restored.grad)
    return values, grads


@pytest.mark.parametrize("side", ["restored", "clean"])
def test_a_refused_batch_leaves_the_queue_as_if_it_never_came(side):
    steps = batches(9)  # 27 rows through a queue of 7: wraps several times
    bad_restored, bad_clean = (t.detach().clone() for t in images(3, size=32, seed=99))
    (bad_restored if side == "restored" else bad_clean)[0, 0, 3, 3] = math.nan
    clean_run = conv_loss(queue_size=7, check_inputs=False)
    want, want_grads = train(clean_run, steps)
    faulty = conv_loss(queue_size=7, check_inputs=False)
    with pytest.warns(UserWarning, match="not pushed into the memory queue") as record:
        got, got_grads = train(faulty, steps[:4] + [(bad_restored, bad_clean)] + steps[4:])
        train(faulty, [(bad_restored, bad_clean)])  # warned once
    assert sum("memory queue" in str(w.message) for w in record) == 1
    assert got.pop(4).isnan() and got_grads.pop(4) is None
    for step, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), (step, float(a), float(b))
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)
    (queue,) = faulty.queues
    assert int(queue.refused) == 2
    for name, buffer in clean_run.queues[0]._buffers.items():
        if name != "refused":
            assert torch.equal(buffer, queue._buffers[name]), name


def test_with_checks_a_non_finite_batch_raises_and_the_queue_is_untouched():
    loss = conv_loss(queue_size=5)
    train(loss, batches(2))
    before = {name: buffer.clone() for name, buffer in loss.queues[0]._buffers.items()}
    restored, clean = images(3, size=32, seed=5)
    with torch.no_grad():
        clean[1, 2, 0, 0] = math.inf
    with pytest.raises(ValueError, match="clean contains NaN or inf"):
        loss(restored, clean)
    for name, buffer in loss.queues[0]._buffers.items():
        assert torch.equal(buffer, before[name]), name


# -- 3. resume is bit-exact --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size, pool, queue_size", [(32, None, 7), (40, None, 10), (48, 3, 9)])
def test_a_resumed_loss_continues_bit_identically(dtype, size, pool, queue_size):
    """Saved mid-way (after wrap-around), loaded into a fresh loss through a file: the next
    steps' values and gradients are bitwise those of the uninterrupted loss."""
    steps = [images(3, size=size, seed=step) for step in range(10)]
    steps = [(r.detach().to(dtype), c.to(dtype)) for r, c in steps]
    options = dict(queue_size=queue_size, pool_size=pool, save_queue=True, similarity="cosine")
    uninterrupted = conv_loss(**options).to(dtype)
    train(uninterrupted, steps[:6])  # 18 rows: the queue has wrapped
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    resumed = conv_loss(**options).to(dtype)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    want, want_grads = train(uninterrupted, steps[6:])
    got, got_grads = train(resumed, steps[6:])
    for a, b in zip(got + got_grads, want + want_grads):
        assert torch.equal(a, b), (a - b).abs().max()


def test_a_damaged_saved_queue_is_an_error():
    loss = conv_loss(queue_size=5, save_queue=True)
    train(loss, batches(3))
    state = loss.state_dict()
    edited = dict(state, **{"queues.0.log_x": state["queues.0.log_x"] * 0.5})
    with pytest.raises(ValueError, match="does not match its saved rows"):
        conv_loss(queue_size=5).load_state_dict(edited)
    edited = dict(state, **{"queues.0.block_w": state["queues.0.block_w"] + 1.0})
    with pytest.raises(ValueError, match="block_w' does not match"):
        conv_loss(queue_size=5).load_state_dict(edited)
    poisoned = dict(state, **{"queues.0.clean": state["queues.0.clean"].clone().fill_(math.nan)})
    with pytest.raises(ValueError, match="NaN or inf rows"):
        conv_loss(queue_size=5).load_state_dict(poisoned)
    without_cache = {k: v for k, v in state.items() if k in ("queues.0.restored", "queues.0.clean")}
    fresh = conv_loss(queue_size=5)
    fresh.load_state_dict(without_cache)  # rows alone: the cache is rebuilt
    assert fresh.queues[0].count == 5


# -- 4. loss-state files -----------------------------------------------------------------------


def test_state_files_are_written_atomically(tmp_path, monkeypatch):
    save_state_dicts, load_state_dicts = weights.save_state_dicts, weights.load_state_dicts
    path = tmp_path / "4.d2sm.pth"
    save_state_dicts({"cri_pix": {"a": torch.ones(3)}}, path)

    def killed(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # the job dies while saving

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_state_dicts({"cri_pix": {"a": torch.zeros(3)}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["4.d2sm.pth"]  # no temporary file left
    assert torch.equal(load_state_dicts(path, remedy="")["cri_pix"]["a"], torch.ones(3))  # the old file, whole


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign", "not a mapping", "pickle"])
def test_a_bad_state_file_names_the_file_and_what_to_do(tmp_path, damage):
    save_state_dicts, load_state_dicts = weights.save_state_dicts, weights.load_state_dicts
    path = tmp_path / "8.d2sm.pth"
    save_state_dicts({"cri_pix": {"queues.0.restored": torch.randn(4, 6)}}, path)
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":
        torch.save({"weight": torch.ones(2)}, path)  # a model's state dict, not losses' states
    elif damage == "not a mapping":
        torch.save([torch.ones(2)], path)
    else:
        torch.save({"cri_pix": {"queues.0.restored": torch.ones(2)}, "opt": object()}, path)
    with pytest.raises(weights.CheckpointError) as error:
        load_state_dicts(path, remedy="Delete it.")
    assert str(path) in str(error.value) and str(error.value).endswith("Delete it.")


# -- 6. loading under inference mode -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("with_rows", [True, False])
def test_loading_under_inference_mode_keeps_the_loss_trainable(mode, with_rows):
    source = conv_loss(queue_size=5, save_queue=with_rows)
    train(source, batches(2))
    target = conv_loss(queue_size=5)
    train(target, batches(1, seed=50))
    with getattr(torch, mode)():
        target.load_state_dict(source.state_dict())
        target.reset_queue() if not with_rows else None
    assert not any(buffer.is_inference() for buffer in target.buffers())
    values, _ = train(target, batches(3, seed=7))  # training continues
    assert all(v.isfinite() for v in values)
    if with_rows:
        want, _ = train(source, batches(3, seed=7))
        assert all(torch.equal(a, b) for a, b in zip(values, want))


# -- 7. activation checkpointing ---------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_recomputed_call_with_a_queue_raises(reentrant):
    loss = conv_loss(queue_size=6)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    restored, clean = images(3, size=32)
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        checkpoint(lambda x: loss(net(x), clean), restored, use_reentrant=reentrant).backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_recomputed_call_without_a_queue_has_the_gradient_of_the_plain_call(reentrant):
    torch.manual_seed(3)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    restored, clean = images(3, size=32)
    loss = conv_loss()
    loss(net(restored), clean).backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    checkpoint(lambda x: loss(net(x), clean), restored, use_reentrant=reentrant).backward()
    for got, expected in zip((p.grad for p in net.parameters()), want):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
