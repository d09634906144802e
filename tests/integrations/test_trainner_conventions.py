"""traiNNer-redux's conventions without traiNNer (it is not on PyPI): PerceptualD2SMLoss against
redux's perceptual loss as its source computes it (reimplemented here on torchvision's VGG19:
ImageNet normalisation, replicate padding in the first convolution, Charbonnier or L1 on the
conv maps, weighted per layer), and the loss state kept across a resume through a model class
with redux's save_training_state / resume_training signatures."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from d2sm_loss.integrations.trainner_losses import (
    REDUX_LAYER_WEIGHTS,
    PerceptualD2SMLoss,
    keep_loss_states,
    load_loss_states,
)
from d2sm_loss.perceptual import vgg_layer_names

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def vgg19() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg19().eval()


def _redux_perceptual(vgg: nn.Module, x: torch.Tensor, y: torch.Tensor, layer_weights, criterion) -> torch.Tensor:
    """traiNNer-redux's PerceptualFP16Loss with a conv criterion, from its source."""
    features = [m for m in vgg.features]
    first = nn.Conv2d(3, 64, 3, padding=1, padding_mode="replicate")
    first.load_state_dict(features[0].state_dict())
    features[0] = first
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    names = vgg_layer_names("vgg19")
    total = torch.zeros(())
    hx, hy = (x - mean) / std, (y - mean) / std
    position = 0
    for name in sorted(layer_weights, key=lambda n: int(names[n].split(".")[1])):
        end = int(names[name].split(".")[1]) + 1
        for module in features[position:end]:
            if isinstance(module, nn.ReLU):
                module = nn.ReLU(inplace=False)
            hx, hy = module(hx), module(hy)
        position = end
        diff = hx - hy.detach()
        distance = torch.sqrt(diff**2 + 1e-12).mean() if criterion == "charbonnier" else diff.abs().mean()
        total = total + distance * layer_weights[name]
    return total.clamp(min=0)


@pytest.mark.parametrize("criterion", ["charbonnier", "l1"])
def test_perceptual_term_is_redux_perceptual_loss(vgg19, criterion):
    layer_weights = {"conv1_2": 0.1, "conv3_4": 1.0, "conv4_4": 0.5}
    loss = PerceptualD2SMLoss(
        0.5, layer_weights, criterion, d2sm_weight=2.0, checkpoint=vgg19.state_dict(), queue_size=4,
    )
    generator = torch.Generator().manual_seed(1)
    clean = torch.rand(3, 3, 35, 35, generator=generator)
    restored = (clean + 0.1 * torch.randn(3, 3, 35, 35, generator=generator)).clamp(0, 1)
    x_ours, x_ref = restored.clone().requires_grad_(), restored.clone().requires_grad_()
    terms = loss(x_ours, clean)
    assert set(terms) == {"perceptual", "d2sm"} and loss.loss_weight == 0.5  # the model applies it
    expected = _redux_perceptual(vgg19, x_ref, clean, layer_weights, criterion)
    torch.testing.assert_close(terms["perceptual"], expected, rtol=2e-5, atol=1e-7)
    grad_ours = torch.autograd.grad(terms["perceptual"], x_ours)[0]
    grad_redux = torch.autograd.grad(expected, x_ref)[0]
    torch.testing.assert_close(grad_ours, grad_redux, rtol=1e-4, atol=1e-9)


def test_defaults_and_refusals(vgg19):
    weights = vgg19.state_dict()
    loss = PerceptualD2SMLoss(1.0, d2sm_weight=1.0, checkpoint=weights)
    assert loss.term_layers("perceptual") == {vgg_layer_names("vgg19")[k]: v for k, v in REDUX_LAYER_WEIGHTS.items()}
    assert loss.term_layers("d2sm") == {"features.34": 1.0}
    with pytest.raises(ValueError, match="criterion: perceptuald2smloss computes"):
        PerceptualD2SMLoss(1.0, criterion="pd+l1", d2sm_weight=1.0)
    with pytest.raises(ValueError, match="antialiased"):
        PerceptualD2SMLoss(1.0, antialiased=True, d2sm_weight=1.0)
    with pytest.raises(ValueError, match="alpha: only 0"):
        PerceptualD2SMLoss(1.0, alpha=[0.5] * 5, d2sm_weight=1.0)


class _ReduxLikeModel:
    """redux's BaseModel as far as the loss state goes: ``losses`` by label, ``opt.path``,
    ``opt.rank``, and its two methods' signatures."""

    def __init__(self, losses, folder) -> None:
        self.losses = losses
        self.opt = SimpleNamespace(rank=0, path=SimpleNamespace(training_states=str(folder)))
        self.saved: list[int] = []

    def save_training_state(self, epoch: int, current_iter: int) -> None:
        self.saved.append(current_iter)

    def resume_training(self, resume_state) -> None:
        self.resumed = resume_state["iter"]


def test_queue_survives_a_redux_resume(tmp_path):
    from d2sm_loss.integrations.trainner_losses import D2SMLoss

    keep_loss_states(_ReduxLikeModel)
    keep_loss_states(_ReduxLikeModel)  # once only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = dict(backbone="resnet10t", pretrained=False, queue_size=6, save_queue=True)
        torch.manual_seed(0)
        first = D2SMLoss(1.0, **options)
        model = _ReduxLikeModel({"l_g_d2sm": first, "l_g_l1": nn.L1Loss()}, tmp_path)
        for _ in range(2):
            first(torch.rand(3, 3, 40, 40, requires_grad=True), torch.rand(3, 3, 40, 40))
        model.save_training_state(0, 2)
        assert model.saved == [2] and (tmp_path / "2.d2sm.pth").exists()
        second = D2SMLoss(1.0, **options)
        resumed = _ReduxLikeModel({"l_g_d2sm": second, "l_g_l1": nn.L1Loss()}, tmp_path)
        resumed.resume_training({"iter": 2})
    assert resumed.resumed == 2
    torch.testing.assert_close(second.state_dict()["queues.0.restored"], first.state_dict()["queues.0.restored"])
    assert second._queue_list()[0].count == 6
    assert load_loss_states({"l_g_d2sm": second}, str(tmp_path), 4) == {}  # no file for that iteration
