"""BasicSR's loss-state file (``training_states/ITER.d2sm.pth``) written by ``D2SMSRModel``:
atomic writes, and a damaged, empty, foreign or mismatched file on resume is a
:class:`~d2sm_loss.weights.CheckpointError` naming the file and what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("basicsr")

from basicsr.models.sr_model import SRModel  # noqa: E402

from d2sm_loss import SemanticStatisticsLoss  # noqa: E402
from d2sm_loss.integrations.basicsr import D2SMSRModel  # noqa: E402
from d2sm_loss.weights import CheckpointError  # noqa: E402


def make_loss(queue_size=4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 5, stride=4), nn.Tanh())
    return SemanticStatisticsLoss(net, queue_size=queue_size, save_queue=True)


def model(tmp_path, loss):
    """A D2SMSRModel without BasicSR's networks: only what saving and resuming the loss state reads."""
    instance = D2SMSRModel.__new__(D2SMSRModel)
    instance.opt = {"path": {"training_states": str(tmp_path)}}
    instance.device = torch.device("cpu")
    instance.cri_perceptual = loss
    return instance


@pytest.fixture
def no_basicsr_state(monkeypatch):
    monkeypatch.setattr(SRModel, "save_training_state", lambda self, epoch, current_iter: None)
    monkeypatch.setattr(SRModel, "resume_training", lambda self, resume_state: None)


def train(loss, steps=3):
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        loss(torch.rand(3, 3, 24, 24, generator=g).requires_grad_(), torch.rand(3, 3, 24, 24, generator=g))


def test_the_state_round_trips_and_leaves_no_temporary_file(tmp_path, no_basicsr_state):
    source = make_loss()
    train(source)
    model(tmp_path, source).save_training_state(0, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4.d2sm.pth"]
    target = make_loss()
    model(tmp_path, target).resume_training({"iter": 4})
    assert torch.equal(target.queues[0].restored, source.queues[0].restored)


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign", "other queue size"])
def test_a_bad_state_file_on_resume_names_the_file_and_what_to_do(tmp_path, no_basicsr_state, damage):
    source = make_loss()
    train(source)
    model(tmp_path, source).save_training_state(0, 4)
    path = tmp_path / "4.d2sm.pth"
    target = make_loss(queue_size=6 if damage == "other queue size" else 4)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "foreign":
        torch.save({"params": {"weight": torch.ones(2)}}, path)  # e.g. a network file under this name
    with pytest.raises(CheckpointError) as error:
        model(tmp_path, target).resume_training({"iter": 4})
    message = str(error.value)
    assert str(path) in message and f"Delete {path}" in message, message
