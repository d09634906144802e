"""gradient_norms / gradient_ratio / suggest_weight against autograd computed by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2sm_loss import SemanticStatisticsLoss, gradient_norms, gradient_ratio, suggest_weight


def setup():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 3, padding=1)
    criterion = SemanticStatisticsLoss(nn.Sequential(nn.Conv2d(3, 6, 5, stride=4), nn.Tanh()), similarity="softmax")
    clean = torch.rand(4, 3, 29, 31)
    restored = model((clean + 0.2 * torch.randn_like(clean)).clamp(0, 1))
    return model, criterion, restored, clean


def test_norms_and_ratio_match_autograd_and_leave_the_graph_usable():
    model, criterion, restored, clean = setup()
    pixel = F.l1_loss(restored, clean)
    semantic = criterion(restored, clean)
    norms = gradient_norms({"pixel": pixel, "semantic": semantic}, restored)
    (g_pixel,) = torch.autograd.grad(pixel, restored, retain_graph=True)
    (g_semantic,) = torch.autograd.grad(semantic, restored, retain_graph=True)
    assert norms["pixel"] == pytest.approx(g_pixel.double().norm().item(), rel=1e-12)
    assert norms["semantic"] == pytest.approx(g_semantic.double().norm().item(), rel=1e-12)
    assert norms["semantic"] > 0
    ratio = gradient_ratio(semantic, pixel, restored)
    assert ratio == pytest.approx(norms["semantic"] / norms["pixel"], rel=1e-12)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated
    (pixel + semantic).backward()  # graphs retained
    assert model.weight.grad is not None


def test_suggested_weight_reaches_the_target_ratio():
    _, criterion, restored, clean = setup()
    pixel = F.l1_loss(restored, clean)
    semantic = criterion(restored, clean)
    weight = suggest_weight(semantic, pixel, restored, target=0.25)
    assert gradient_ratio(weight * semantic, pixel, restored) == pytest.approx(0.25, rel=1e-6)


def test_errors():
    _, criterion, restored, clean = setup()
    pixel = F.l1_loss(restored, clean)
    with pytest.raises(ValueError, match="inputs must be a tensor in the autograd graph"):
        gradient_norms({"pixel": pixel}, clean)
    with pytest.raises(ValueError, match=r"losses\['detached'\] has no autograd graph"):
        gradient_norms({"detached": pixel.detach()}, restored)
    with pytest.raises(ValueError, match=r"losses\['rows'\] must be a scalar tensor"):
        gradient_norms({"rows": restored.sum(dim=(1, 2, 3))}, restored)
    with pytest.raises(ValueError, match="reference has a zero gradient"):
        gradient_ratio(pixel, (restored * 0).sum(), restored)
    with pytest.raises(ValueError, match="target must be positive"):
        suggest_weight(criterion(restored, clean), pixel, restored, target=0)
