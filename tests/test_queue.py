"""The memory queue: the incremental statistic against the full computation, its cache,
its state (reset, checkpoints, moves) and what calls that do not train see.

The reference is :func:`d2sm_loss.similarity_kl` with ``implementation="reference"`` over
the batch rows followed by the queue's filled rows, recomputed from scratch every step.
"""

import copy
import functools
import math
import warnings

import pytest
import torch
from torch import nn

from d2sm_loss import similarity_kl
from d2sm_loss.ops.incremental import pairwise_log_similarities
from d2sm_loss.queue import FeatureQueue

import helpers

D = 13  # an awkward feature width


def rows(batch, seed, dtype=torch.float64, width=D):
    """Restored rows (requiring grad) close to their clean rows, as features of a
    restoration are."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(batch, width, generator=g, dtype=torch.float64)
    restored = clean + 0.4 * torch.randn(batch, width, generator=g, dtype=torch.float64)
    return restored.to(dtype).requires_grad_(), clean.to(dtype)


def full(queue, x, y, similarity, include_self, grad_of=None):
    """The reference: value and gradient of the full statistic over batch + queue rows."""
    all_x, all_y = x, y
    if queue.count:
        past_x, past_y = queue.rows()
        all_x, all_y = torch.cat([x, past_x.to(x.dtype)]), torch.cat([y, past_y.to(y.dtype)])
    if all_x.shape[0] < 2:
        return None, None
    value = similarity_kl(all_x, all_y, similarity=similarity, include_self=include_self, implementation="reference")
    (grad,) = torch.autograd.grad(value, grad_of if grad_of is not None else x)
    return value.detach(), grad


def incremental(queue, x, y, push=True):
    """The queue's statistic (mean over rows), its gradient, and the push."""
    kl_batch, kl_queue, count, blocks = queue(x, y)
    value = (kl_batch.sum() + kl_queue.sum()) / count
    (grad,) = torch.autograd.grad(value, x)
    if push:
        queue.push(x, y, blocks)
    return value.detach(), grad


def assert_cache_is_a_rebuild(queue, tol=1e-12):
    names = ("log_x", "log_y", "inverse_x", "inverse_y", "log_zx", "log_zy", "w")
    saved = {name: getattr(queue, name).clone() for name in names}
    queue.rebuild()
    count = queue.count
    for name, value in saved.items():
        fresh = getattr(queue, name)
        if value.dim() == 2:
            value, fresh = value[:count, :count], fresh[:count, :count]
        else:
            value, fresh = value[:count], fresh[:count]
        torch.testing.assert_close(value, fresh, rtol=tol, atol=tol, msg=name)


BATCHES = [1, 4, 4, 3, 4, 2, 4, 13, 4, 1, 5]  # starts with a batch of one; 13: more rows than the queue


@pytest.mark.parametrize(
    "similarity, include_self, size",
    [("cosine", True, 8), ("cosine", False, 11), ("softmax", True, 11), ("softmax", False, 8)],
)  # queues of 8 (a multiple of the usual batch of 4) and 11 (not), each with both options
def test_incremental_statistic_equals_the_full_one_over_many_steps(similarity, include_self, size):
    queue = FeatureQueue(size, similarity=similarity, temperature=0.1, include_self=include_self).double()
    compared = 0
    for step in range(210):  # wraps the queue many times
        x, y = rows(BATCHES[step % len(BATCHES)], seed=step)
        want, want_grad = full(queue, x, y, similarity, include_self)
        got, got_grad = incremental(queue, x, y)
        if want is None:  # a batch of one on an empty queue: nothing to compare yet
            assert got == 0 and not got_grad.any()
            continue
        assert want > 1e-4
        assert abs(got - want) <= 1e-10 * want
        helpers.assert_close(got_grad, want_grad, helpers.Tolerance(max_rtol=1e-10))
        compared += 1
        if step % 70 == 69:
            assert_cache_is_a_rebuild(queue)
    assert compared == 209 and queue.count == size


@pytest.mark.parametrize("similarity", ["cosine", "softmax"])
def test_float32_incremental_statistic_is_as_close_to_float64_as_the_float32_reference(similarity):
    queue32 = FeatureQueue(9, similarity=similarity)
    queue64 = FeatureQueue(9, similarity=similarity).double()
    for step in range(40):
        x, y = rows(4, seed=step)
        want, want_grad = full(queue64, x, y, similarity, True)
        x32 = x.detach().float().requires_grad_()
        ref32, _ = full(queue32, x32, y.float(), similarity, True)
        got, got_grad = incremental(queue32, x32, y.float())
        incremental(queue64, x, y)
        # Within float32's tolerance, and no worse than a few times the float32 reference's error.
        error, ref_error = abs(got.double() - want), abs(ref32.double() - want)
        assert error <= max(4 * ref_error, 1e-6 * want + 1e-7), (float(error), float(ref_error))
        helpers.assert_close(got_grad.double(), want_grad, helpers.Tolerance(max_rtol=1e-4))
    assert_cache_is_a_rebuild(queue32, tol=1e-5)


def test_second_order_derivatives_equal_the_full_statistics():
    """The incremental path is made of differentiable torch operations: its gradient has a
    graph, and derivatives of the gradient equal the reference's (no fallback needed)."""
    queue = FeatureQueue(7, similarity="cosine").double()
    for step in range(3):
        incremental(queue, *rows(3, seed=step))
    x, y = rows(3, seed=10)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kl_batch, kl_queue, count, _ = queue(x, y)
    (grad,) = torch.autograd.grad((kl_batch.sum() + kl_queue.sum()) / count, x, create_graph=True)
    (got,) = torch.autograd.grad((grad * direction).sum(), x)
    past_x, past_y = queue.rows()
    value = similarity_kl(torch.cat([x, past_x]), torch.cat([y, past_y]), implementation="reference")
    (ref_grad,) = torch.autograd.grad(value, x, create_graph=True)
    (want,) = torch.autograd.grad((ref_grad * direction).sum(), x)
    helpers.assert_close(grad.detach(), ref_grad.detach(), helpers.Tolerance(max_rtol=1e-10))
    helpers.assert_close(got, want, helpers.Tolerance(max_rtol=1e-9))


def test_unfilled_slots_are_ignored_exactly():
    """Whatever the unfilled slots hold (here garbage), the statistic is the one over the
    filled rows."""
    queue = FeatureQueue(10).double()
    incremental(queue, *rows(3, seed=0))
    clean = FeatureQueue(10).double()
    incremental(clean, *rows(3, seed=0))
    queue.restored[5:] = 1e3 * torch.randn(5, D, dtype=torch.float64)
    queue.clean[5:] = -7.0
    queue.log_x[5:] = 1e6
    queue.log_y[:, 5:] = float("nan")
    every = torch.arange(10)
    queue._refresh_sums(every, torch.arange(queue.blocks), every)  # the sums from the garbage cache
    x, y = rows(4, seed=1)
    got, got_grad = incremental(queue, x, y, push=False)
    want, want_grad = incremental(clean, x, y, push=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


# -- through the loss ------------------------------------------------------------------


#: The loss and images of this file: pool_size 2 by default; 24-pixel images, noise 0.2.
conv_loss = functools.partial(helpers.conv_loss, pool_size=2)
images = functools.partial(helpers.images, size=24, noise=0.2)


def loss_step(criterion, restored, clean):
    """One training call and its reference (the full statistic over the same rows)."""
    (layer,) = criterion.rows(restored, clean)
    x, y = layer.all_rows()
    want = similarity_kl(x, y, similarity=criterion.similarity, include_self=criterion.include_self,
                         implementation="reference")
    (want_grad,) = torch.autograd.grad(want, restored)
    got = criterion(restored, clean)
    (got_grad,) = torch.autograd.grad(got, restored)
    return got.detach(), got_grad, want.detach(), want_grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_with_queue_equals_the_full_statistic(reduction):
    criterion = conv_loss(queue_size=7, similarity="softmax", reduction=reduction).double()
    for step in range(12):
        batch = [3, 2, 4][step % 3]
        count = criterion.queues[0].count
        restored, clean = images(batch=batch, seed=step, dtype=torch.float64)
        got, got_grad, want, want_grad = loss_step(criterion, restored, clean)
        if reduction == "sum":  # the sum over the rows compared: mean times their number
            want, want_grad = want * (batch + count), want_grad * (batch + count)
        assert abs(got - want) <= 1e-10 * want
        helpers.assert_close(got_grad, want_grad, helpers.Tolerance(max_rtol=1e-10))
        assert criterion.last_implementation == "incremental"


def test_reset_state_dict_round_trips_and_moves_keep_the_statistic_exact(tmp_path):
    criterion = conv_loss(queue_size=7, save_queue=True).double()
    for step in range(5):
        loss_step(criterion, *images(seed=step, dtype=torch.float64))
    # Round trip through a file, into a loss that would not save its queue.
    path = tmp_path / "loss.pt"
    torch.save(criterion.state_dict(), path)
    fresh = conv_loss(queue_size=7).double()
    fresh.load_state_dict(torch.load(path))
    assert fresh.queues[0].count == 7 and int(fresh.queues[0].position) == int(criterion.queues[0].position)
    assert_cache_is_a_rebuild(fresh.queues[0])
    restored, clean = images(seed=50, dtype=torch.float64)
    a = loss_step(criterion, restored, clean)
    b = loss_step(fresh, restored, clean)
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=0)
    assert abs(b[0] - b[2]) <= 1e-10 * b[2]
    # reset: empty, then exact again from the first step
    fresh.reset_queue()
    assert fresh.queues[0].count == 0 and fresh.queues[0].feature_size is None
    for step in range(3):
        got, got_grad, want, want_grad = loss_step(fresh, *images(seed=60 + step, dtype=torch.float64))
        assert abs(got - want) <= 1e-10 * want
        helpers.assert_close(got_grad, want_grad, helpers.Tolerance(max_rtol=1e-10))
    # float64 -> float32 -> float64 moves: the cache is rebuilt in the new dtype
    fresh.float()
    assert fresh.queues[0].log_x.dtype == torch.float32
    assert_cache_is_a_rebuild(fresh.queues[0], tol=1e-6)
    got, got_grad, want, want_grad = loss_step(fresh, *images(seed=70))
    assert abs(got - want) <= 1e-5 * want + 1e-7
    fresh.double()
    assert_cache_is_a_rebuild(fresh.queues[0])
    got, got_grad, want, want_grad = loss_step(fresh, *images(seed=71, dtype=torch.float64))
    assert abs(got - want) <= 1e-10 * want


def test_half_move_keeps_the_queue_rows_in_float32_unrounded():
    criterion = conv_loss(queue_size=6)
    for step in range(3):
        criterion(*images(seed=step))
    before = criterion.queues[0].rows()[0].clone()
    criterion.half()
    queue = criterion.queues[0]
    assert queue.restored.dtype == queue.log_x.dtype == torch.float32
    torch.testing.assert_close(queue.rows()[0], before, rtol=0, atol=0)  # not rounded to float16
    criterion.float()
    assert_cache_is_a_rebuild(queue, tol=1e-6)


def test_the_queue_is_out_of_the_state_dict_unless_save_queue():
    default = conv_loss(queue_size=5)
    default(*images())
    assert not any("queues" in key for key in default.state_dict())
    kept = conv_loss(queue_size=5, save_queue=True)
    kept(*images())
    state = kept.state_dict()
    assert state["queues.0.restored"].shape == (3, 24) and int(state["queues.0.size"]) == 5
    # Tensors only, so that tensor-only formats (safetensors: accelerate's save_state) can save it.
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    default.load_state_dict(load_safetensors(save_safetensors({k: v.contiguous() for k, v in state.items()})))
    assert default.queues[0].count == 3
    default.reset_queue()
    # Both directions load strictly; a state dict without the queue empties it.
    default.load_state_dict(state)
    assert default.queues[0].count == 3
    torch.testing.assert_close(default.queues[0].rows()[0], kept.queues[0].rows()[0])
    kept.load_state_dict(conv_loss(queue_size=5).state_dict())
    assert kept.queues[0].count == 0


def test_checkpoints_of_the_earlier_queue_format_load():
    """The earlier FeatureQueue saved ``restored``/``clean`` (the filled rows, growing while
    filling), ``position`` and ``_extra_state`` ({"size": size}) in every state dict."""
    g = torch.Generator().manual_seed(0)
    for count, position in ((4, 4), (6, 2)):  # filling, and full after wrapping
        old = {
            "queues.0.restored": torch.randn(count, 24, generator=g),
            "queues.0.clean": torch.randn(count, 24, generator=g),
            "queues.0.position": torch.tensor(position),
            "queues.0._extra_state": {"size": 6},
        }
        criterion = conv_loss(queue_size=6)
        criterion.load_state_dict(old)
        queue = criterion.queues[0]
        assert queue.count == count and int(queue.position) == position
        torch.testing.assert_close(queue.rows()[0], old["queues.0.restored"])
        got, _, want, _ = loss_step(criterion, *images(seed=1))
        assert abs(got - want) <= 1e-5 * want
        assert queue.count == min(count + 3, 6) and int(queue.position) == (position + 3) % 6
    with pytest.raises(ValueError, match="queue_size"):
        conv_loss(queue_size=4).load_state_dict(old)


# -- calls that do not train --------------------------------------------------------------


def test_calls_that_do_not_train_use_their_own_batch_only():
    criterion = conv_loss(queue_size=6, pool_size=None, similarity="softmax")
    for step in range(3):  # train on 24 x 24 crops
        criterion(*images(seed=step))
    saved = {name: b.clone() for name, b in criterion.queues[0]._buffers.items()}
    untrained = conv_loss(queue_size=6, pool_size=None, similarity="softmax")
    restored, clean = images(batch=2, size=40, seed=9)  # full-size validation images
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            value = criterion(restored, clean)
            assert torch.isfinite(value)
            # the value does not depend on training history
            torch.testing.assert_close(value, untrained(restored, clean), rtol=0, atol=0)
    criterion.eval()
    value = criterion(restored, clean)
    (layer,) = criterion.rows(restored, clean)
    assert layer.queue is None and layer.restored.shape[0] == 2
    torch.testing.assert_close(value, similarity_kl(layer.restored, layer.clean, similarity="softmax"))
    for name, buffer in criterion.queues[0]._buffers.items():
        assert torch.equal(buffer, saved[name]), name  # neither read into nor written
    criterion.train()
    criterion(*images(seed=5))  # training continues at the crop size
    assert criterion.queues[0].count == 6


def test_a_batch_of_one_in_a_call_that_does_not_train_is_zero_with_one_warning():
    for options in ({"queue_size": 4}, {}, {"granularity": "patch", "patch_size": 24, "pool_size": 2}):
        criterion = conv_loss(**options)
        criterion(*images(batch=2, seed=0))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with torch.no_grad():
                first = criterion(*images(batch=1, seed=1))
            second = criterion.eval()(*images(batch=1, seed=2))
        assert first.item() == 0.0 and second.item() == 0.0 and not second.requires_grad
        assert len([w for w in record if "nothing to compare" in str(w.message)]) == 1
        assert all(q.count == 2 for q in criterion.queues or [])


def test_the_refill_after_a_resume_without_the_queue_takes_ceil_size_over_batch_steps():
    criterion = conv_loss(queue_size=10)
    criterion.load_state_dict(conv_loss(queue_size=10).state_dict())
    steps = 0
    while criterion.queues[0].count < 10:
        criterion(*images(batch=4, seed=steps))
        steps += 1
    assert steps == math.ceil(10 / 4)


def test_cache_memory():
    """Two size x size matrices (columns padded to whole blocks of about sqrt(size)), three
    block sums a row and block, five size-vectors."""
    queue = FeatureQueue(37)
    assert (queue.block, queue.blocks) == (6, 7)
    cache = sum(b.numel() for n, b in queue._buffers.items() if n not in ("restored", "clean", "filled", "position", "refused"))
    assert cache == 2 * 37 * 42 + 3 * 37 * 7 + 5 * 37
    assert pairwise_log_similarities(torch.randn(5, 3), "cosine", 0.1).shape == (5, 5)


def test_backward_after_later_pushes_uses_the_rows_of_its_forward():
    """Pushes write the rows in place; a backward that runs after one or several later
    pushes (two calls summed before one backward) still differentiates its own forward."""
    queue = FeatureQueue(6).double()
    reference = FeatureQueue(6).double()
    for step in range(3):
        for q in (queue, reference):
            incremental(q, *rows(4, seed=step))
    values = []
    x1, y1 = rows(4, seed=10)
    x2, y2 = rows(3, seed=11)
    for x, y in ((x1, y1), (x2, y2)):
        kl_batch, kl_queue, count, blocks = queue(x, y)
        values.append((kl_batch.sum() + kl_queue.sum()) / count)
        queue.push(x, y, blocks)
    g1, g2 = torch.autograd.grad(values[0] + values[1], (x1, x2))
    want1 = incremental(reference, x1, y1)[1]
    want2 = incremental(reference, x2, y2)[1]
    helpers.assert_close(g1, want1, helpers.Tolerance(max_rtol=1e-12))
    helpers.assert_close(g2, want2, helpers.Tolerance(max_rtol=1e-12))


# -- the module's queues: training calls fill and read them, other calls leave them alone ------


def test_queue_wraps_around_and_matches_manual_statistic():
    k, batch = 5, 3
    criterion = helpers.conv_loss(queue_size=k, pool_size=2, similarity="softmax", implementation="reference")
    seen_x, seen_y = [], []
    for step in range(4):
        restored, clean = helpers.images(batch=batch, seed=step)
        restored = helpers.images(batch=batch, seed=100 + step)[1]  # unrelated images: a clearly non-zero loss
        with torch.no_grad():
            fx = nn.functional.adaptive_avg_pool2d(criterion._extractor(restored)[0], 2).flatten(1)
            fy = nn.functional.adaptive_avg_pool2d(criterion._extractor(clean)[0], 2).flatten(1)
        past_x = torch.cat(seen_x)[-k:] if seen_x else fx[:0]
        past_y = torch.cat(seen_y)[-k:] if seen_y else fy[:0]
        loss = criterion(restored, clean)
        queue = criterion.queues[0]
        assert queue.count == min(batch * (step + 1), k)
        # The statistic is over the current batch plus the filled queue rows.
        stored_x, stored_y = queue.rows()
        assert sorted(map(tuple, stored_x.tolist())) == sorted(map(tuple, torch.cat(seen_x + [fx])[-k:].tolist()))
        expected = similarity_kl(torch.cat([fx, past_x]), torch.cat([fy, past_y]), similarity="softmax", implementation="reference")
        assert loss > 1e-4
        # float32: the KL is a small difference of O(1) logarithms, both paths round at ~1e-7
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
        seen_x.append(fx)
        seen_y.append(fy)


def test_queue_rows_in_another_order_give_the_same_loss():
    # The ring buffer's row order must not matter: the mean over rows is order-free. Training
    # calls read the queue; noise in its rows must change the value, or the comparison is empty.
    criterion = helpers.conv_loss(queue_size=7, pool_size=3)
    for seed in range(3):
        criterion(*helpers.images(batch=4, seed=seed))
    permuted, noisy = copy.deepcopy(criterion), copy.deepcopy(criterion)
    for queue in permuted.queues:
        perm = torch.randperm(queue.count)
        queue.restored[: queue.count] = queue.restored[: queue.count][perm]
        queue.clean[: queue.count] = queue.clean[: queue.count][perm]
        queue.rebuild()
    for queue in noisy.queues:
        queue.restored[: queue.count] = torch.randn_like(queue.restored[: queue.count])
        queue.rebuild()
    restored, clean = helpers.images(seed=10)
    expected = criterion(restored, clean)
    torch.testing.assert_close(permuted(restored, clean), expected)
    assert not torch.allclose(noisy(restored, clean), expected)


def test_queue_is_only_updated_in_training_mode():
    criterion = helpers.timm_loss("resnet10t", queue_size=6, pool_size=1)
    criterion.eval()
    criterion(*helpers.images())
    assert criterion.queues[0].count == 0
    criterion.train()
    criterion(*helpers.images())
    assert criterion.queues[0].count == 3


def test_queue_survives_save_and_load_into_a_fresh_loss(tmp_path):
    criterion = helpers.conv_loss(queue_size=8, pool_size=2, save_queue=True)
    for seed in range(3):
        criterion(*helpers.images(seed=seed))
    path = tmp_path / "loss.pt"
    torch.save(criterion.state_dict(), path)
    fresh = helpers.conv_loss(queue_size=8, pool_size=2)
    fresh.load_state_dict(torch.load(path))
    assert fresh.queues[0].count == 8 and fresh.queues[0].position == criterion.queues[0].position
    torch.testing.assert_close(fresh.queues[0].restored, criterion.queues[0].restored)
    restored, clean = helpers.images(seed=7)
    # Training calls read the queue: the loaded one must give the saved one's value.
    torch.testing.assert_close(fresh(restored, clean), criterion(restored, clean))
    with pytest.raises(ValueError, match="queue_size"):
        helpers.conv_loss(queue_size=4, pool_size=2).load_state_dict(criterion.state_dict())


def test_feature_size_change_is_a_clear_error_and_reset_recovers():
    criterion = helpers.conv_loss(queue_size=4)
    criterion(*helpers.images(size=48))
    with pytest.raises(ValueError, match="image or patch size changed"):
        criterion(*helpers.images(size=64))
    criterion.reset_queue()
    assert torch.isfinite(criterion(*helpers.images(size=64)))


def test_queue_is_not_updated_without_gradients_and_training_continues_after_inference_mode():
    criterion = helpers.conv_loss(queue_size=6, pool_size=2)
    with torch.no_grad():
        criterion(*helpers.images())
    with torch.inference_mode():
        criterion(*helpers.images(seed=1))
    assert criterion.queues[0].count == 0  # validation-style calls leave the queue alone
    restored, clean = helpers.images(seed=2)
    criterion(restored, clean).backward()
    assert criterion.queues[0].count == 3 and restored.grad.abs().sum() > 0


def test_queues_advance_only_when_every_layer_succeeds():
    criterion = helpers.timm_loss("resnet10t", layers=[1, 2], queue_size=4, pool_size=1)
    criterion(*helpers.images())
    assert [q.count for q in criterion.queues] == [3, 3]
    criterion.queues[1].restored = criterion.queues[1].restored[:, :5]  # the second layer's check fails
    criterion.queues[1].clean = criterion.queues[1].clean[:, :5]
    with pytest.raises(ValueError, match="image or patch size changed"):
        criterion(*helpers.images(seed=1))
    assert [q.count for q in criterion.queues] == [3, 3]


def test_batch_of_one_trains_with_a_queue_and_is_an_error_without():
    criterion = helpers.conv_loss(queue_size=4, pool_size=2)
    restored, clean = helpers.images(batch=1)
    value = criterion(restored, clean)  # fills the empty queue: 0, attached to the graph
    assert value.item() == 0.0 and value.requires_grad and criterion.queues[0].count == 1
    with pytest.raises(ValueError, match="single image .*queue_size=0"):
        helpers.conv_loss(pool_size=2)(*helpers.images(batch=1))
    patches = helpers.timm_loss("resnet10t", granularity="patch", patch_size=32)
    with pytest.raises(ValueError, match="single crop"):
        patches(*helpers.images(batch=1, size=40))  # one 32 x 32 crop
    location = helpers.timm_loss("resnet10t", granularity="location")
    with pytest.raises(ValueError, match="single location"):
        location(*helpers.images(size=32))  # the /32 tap of a 32 x 32 image is 1 x 1


def test_queue_follows_double_and_a_failed_load_changes_nothing():
    criterion = helpers.conv_loss(queue_size=4, pool_size=2, save_queue=True).double()
    criterion(*(t.double() for t in helpers.images()))
    assert criterion.queues[0].restored.dtype == torch.float64
    small = helpers.conv_loss(queue_size=2, pool_size=2)
    with pytest.raises(ValueError, match="queue_size"):
        small.load_state_dict(criterion.state_dict())
    assert small.queues[0].feature_size is None and small.queues[0].count == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_full_queue_keeps_float32_rows_after_a_low_precision_cast(dtype):
    criterion = helpers.conv_loss(queue_size=4, pool_size=2)
    for seed in range(2):  # 6 rows: full, the position has wrapped
        criterion(*helpers.images(seed=seed))
    criterion.to(dtype)  # a low-precision backbone; the queue's buffers are cast with it
    restored, clean = helpers.images(seed=2)
    value = criterion(restored.to(dtype), clean.to(dtype))
    queue = criterion.queues[0]
    assert torch.isfinite(value) and queue.count == 4
    assert queue.restored.dtype == queue.clean.dtype == torch.float32
    assert int(queue.position) == (2 + 3) % 4  # 3 rows written from position 2


def test_batch_of_one_with_queue_works_after_first_step():
    criterion = helpers.conv_loss(queue_size=4, pool_size=2, similarity="softmax")
    first = criterion(*helpers.images(batch=1, seed=0))
    assert first.item() == pytest.approx(0.0, abs=1e-7)  # a single row has nothing to compare yet
    restored, clean = helpers.images(batch=1, seed=1)
    second = criterion(restored, clean)
    second.backward()
    assert second > 1e-4 and restored.grad.abs().sum() > 0
