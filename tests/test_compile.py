"""SemanticStatisticsLoss inside torch.compile: one graph, eager values, no recompilation.

A small convolutional backbone keeps the compile times of the CPU CI short; what is under
test is the loss's own code (checks, rows, queue, statistic), not the backbone.
"""

import copy
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from d2sm_loss import SemanticStatisticsLoss

pytestmark = pytest.mark.slow


def make_loss(**kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Tanh(), nn.Conv2d(8, 12, 3, stride=2), nn.Tanh())
    kwargs.setdefault("check_inputs", False)
    return SemanticStatisticsLoss(net, **kwargs)


def batches(steps, batch=4, size=22):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        clean = torch.rand(batch, 3, size, size, generator=g)
        out.append(((clean + 0.2 * torch.randn(clean.shape, generator=g)).clamp(0, 1), clean))
    return out


def run(criterion, data, compiled):
    """The loss and its gradient on the restored images, step by step (training mode)."""
    fn = torch.compile(criterion, fullgraph=True, backend="aot_eager") if compiled else criterion
    values, grads = [], []
    for restored, clean in data:
        restored = restored.clone().requires_grad_()
        value = fn(restored, clean)
        (grad,) = torch.autograd.grad(value, restored)
        values.append(value.detach())
        grads.append(grad)
    return values, grads


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "options",
    [
        {"granularity": "image"},
        {"granularity": "image", "queue_size": 10},
        {"granularity": "location"},
        {"granularity": "patch", "patch_size": 11, "queue_size": 7},
    ],
    ids=["image", "image-queue", "location", "patch-queue"],
)
def test_fullgraph_compile_matches_eager(options):
    eager = make_loss(**options)
    compiled = copy.deepcopy(eager)
    data = batches(6)
    want_values, want_grads = run(eager, data, compiled=False)
    got_values, got_grads = run(compiled, data, compiled=True)
    for want, got in zip(want_values, got_values):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for want, got in zip(want_grads, got_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    if eager.queues is not None:
        for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a)


@pytest.mark.parametrize("queue_size", [3, 10], ids=["queue-smaller-than-batch", "queue-larger-than-batch"])
def test_a_training_step_with_a_queue_compiles_once_from_the_first_step(queue_size):
    """Fixed-size queue buffers with the fill count in a tensor: one graph from the empty
    queue through filling and wrap-around; a batch size that changes once adds at most
    one graph."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 3, padding=1)
    criterion = make_loss(queue_size=queue_size)

    @torch.compile(fullgraph=True, backend="eager")
    def step(noisy, clean):
        restored = model(noisy)
        return nn.functional.l1_loss(restored, clean) + 0.1 * criterion(restored, clean)

    data = batches(110) + batches(10, batch=5)
    graphs = []
    for noisy, clean in data:
        step(noisy, clean).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert criterion.queues[0].count == queue_size
    assert graphs[:110] == [1] * 110
    assert graphs[-1] <= 2


def test_a_training_step_compiles_into_one_graph():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 3, padding=1)
    criterion = make_loss(queue_size=6)

    def loss_of(noisy, clean):
        restored = model(noisy)
        return nn.functional.l1_loss(restored, clean) + 0.1 * criterion(restored, clean)

    explanation = torch._dynamo.explain(loss_of)(*batches(1)[0])
    assert explanation.graph_count == 1
    assert explanation.graph_break_count == 0


def test_input_check_is_the_one_graph_break():
    criterion = make_loss(check_inputs=True)
    restored, clean = batches(1)[0]
    explanation = torch._dynamo.explain(criterion)(restored.requires_grad_(), clean)
    # Dynamo reports a break once per frame it interrupts (the check runs inside rows(),
    # inside forward()): every report must point at the same line, the check's sync.
    places = {(b.user_stack[-1].name, b.user_stack[-1].lineno) for b in explanation.break_reasons}
    assert explanation.graph_break_count >= 1
    assert len(places) == 1
    assert next(iter(places))[0] == "check_values"  # d2sm_loss.checks.check_values


def test_the_shape_warnings_do_not_break_a_fullgraph_compile():
    """Few locations (a 3 x 3 map) and swapped arguments warn in eager calls; a compiled
    step must still be one graph, with the eager value."""
    restored, clean = batches(1, size=16)[0]
    eager = make_loss(granularity="location")
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, backend="eager")
    with pytest.warns(UserWarning, match="only 9 locations"):
        want = eager(restored.clone().requires_grad_(), clean)
    got = compiled(restored.clone().requires_grad_(), clean)
    torch.testing.assert_close(got, want)
    swapped = torch.compile(make_loss(), fullgraph=True, backend="eager")
    torch.testing.assert_close(swapped(restored, clean.clone().requires_grad_()), make_loss()(restored, clean))


def test_the_range_warning_of_a_compiled_call_points_at_the_caller():
    """With check_inputs=True the graph breaks at the check anyway; its warning must name the
    caller's line and come alone (no note from torch.compile about untraceable code)."""
    step = torch.compile(make_loss(check_inputs=True), backend="eager")
    restored, clean = batches(1)[0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        step(2 * restored, clean)
    assert [(w.filename, "outside input_range" in str(w.message)) for w in record] == [(__file__, True)]


def test_auto_takes_the_streaming_path_while_compiling(monkeypatch):
    """The Triton self-check cannot run inside a trace: "auto" must not reach it there."""
    from d2sm_loss import functional

    def no_self_check(device):
        raise AssertionError("the Triton self-check ran inside a compiled graph")

    monkeypatch.setattr(functional, "_triton_self_check", no_self_check)
    monkeypatch.setattr(functional, "_triton_error", lambda: None)

    @torch.compile(fullgraph=True, backend="eager")
    def pick(x):
        return x * (1.0 if functional.resolve_implementation("auto", torch.device("cuda"), 8) == "streaming" else 2.0)

    torch.testing.assert_close(pick(torch.ones(3)), torch.ones(3))
