"""FeatureLosses: perceptual, style and D2SM terms from one backbone pass, each equal to what a
separate computation gives on the same weights (D2SM: SemanticStatisticsLoss; perceptual and
style: a float64 computation from the maps here, BasicSR's PerceptualLoss in
tests/integrations)."""

from __future__ import annotations

import warnings

import pytest
import torch

from d2sm_loss import SemanticStatisticsLoss
from d2sm_loss.perceptual import FeatureLosses, feature_distance, gram_matrix, vgg_layer_names

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False).state_dict()


def _images(seed: int = 0, batch: int = 3, size: int = 45) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(batch, 3, size, size, generator=generator)
    restored = (clean + 0.2 * torch.randn(batch, 3, size, size, generator=generator)).clamp(0, 1)
    return restored, clean


def _maps_float64(model: FeatureLosses, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [m.double() for m in model.feature_maps(images)]


@pytest.mark.parametrize("criterion", ["l1", "l2", "fro"])
def test_terms_equal_separate_computations(weights, criterion):
    options = dict(queue_size=6, save_queue=True, similarity="cosine")
    losses = FeatureLosses(
        "resnet10t", {1: 0.3, 2: 1.0}, checkpoint=weights, perceptual_weight=0.7, style_weight=20.0,
        d2sm_weight=0.5, criterion=criterion, d2sm_layer_weights={3: 1.0, 2: 0.25}, **options,
    )
    alone = SemanticStatisticsLoss("resnet10t", [3, 2], [1.0, 0.25], checkpoint=weights, **options)
    assert losses.layers == ["layer1", "layer2", "layer3"]  # the union, each layer once
    for step in range(3):  # the queue fills the same way in both
        restored, clean = _images(step)
        x = restored.clone().requires_grad_()
        x_alone = restored.clone().requires_grad_()
        terms = losses(x, clean)
        assert set(terms) == {"perceptual", "style", "d2sm"}
        d2sm = alone(x_alone, clean)
        torch.testing.assert_close(terms["d2sm"], 0.5 * d2sm, rtol=1e-5, atol=1e-8)
        # perceptual and style from the maps in float64, by the formulas
        xm, ym = _maps_float64(losses, restored), _maps_float64(losses, clean)
        perceptual = style = 0.0
        for index, weight in ((0, 0.3), (1, 1.0)):
            diff = xm[index] - ym[index]
            b, c, h, w = xm[index].shape
            gx = torch.einsum("bchw,bdhw->bcd", xm[index], xm[index]) / (c * h * w)
            gy = torch.einsum("bchw,bdhw->bcd", ym[index], ym[index]) / (c * h * w)
            distance = {"l1": lambda d: d.abs().mean(), "l2": lambda d: d.pow(2).mean(),
                        "fro": lambda d: d.pow(2).sum().sqrt()}[criterion]
            perceptual += weight * distance(diff)
            style += weight * distance(gx - gy)
        torch.testing.assert_close(terms["perceptual"].double(), 0.7 * perceptual, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(terms["style"].double(), 20.0 * style, rtol=1e-4, atol=1e-12)
        # the D2SM term's gradient is the separate module's
        grad_total = torch.autograd.grad(terms["d2sm"], x)[0]
        grad_alone = torch.autograd.grad(0.5 * d2sm, x_alone)[0]
        torch.testing.assert_close(grad_total, grad_alone, rtol=1e-4, atol=1e-9)
    state = losses.state_dict()
    torch.testing.assert_close(state["d2sm.queues.0.restored"], alone.state_dict()["queues.0.restored"])


def test_one_backbone_pass_per_batch(weights):
    losses = FeatureLosses("resnet10t", {1: 1.0}, checkpoint=weights, style_weight=1.0, d2sm_weight=1.0)
    calls = []
    losses.backbone.register_forward_hook(lambda *args: calls.append(1))
    restored, clean = _images()
    sum(losses(restored.requires_grad_(), clean).values()).backward()
    assert len(calls) == 2  # restored and clean, once each, for the three terms


def test_zero_weights_skip_terms_and_the_d2sm_module(weights):
    losses = FeatureLosses("resnet10t", {2: 1.0}, checkpoint=weights, d2sm_weight=0)
    assert losses.d2sm is None and losses.layers == ["layer2"]
    terms = losses(*_images())
    assert list(terms) == ["perceptual"] and losses.last_terms["perceptual"].requires_grad is False
    only = FeatureLosses("resnet10t", checkpoint=weights, perceptual_weight=0)
    assert list(only(*_images())) == ["d2sm"] and only.layers == ["layer4"]  # the default D2SM layer


def test_input_range_and_grayscale_match_the_d2sm_loss(weights):
    losses = FeatureLosses("resnet10t", {2: 1.0}, checkpoint=weights, input_range=(-1, 1), perceptual_weight=0)
    alone = SemanticStatisticsLoss("resnet10t", checkpoint=weights, input_range=(-1, 1))
    restored, clean = _images()
    gray_x, gray_y = restored[:, :1] * 2 - 1, clean[:, :1] * 2 - 1
    torch.testing.assert_close(losses(gray_x, gray_y)["d2sm"], alone(gray_x, gray_y))


def test_gram_and_distance_helpers():
    features = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    expected = torch.stack([f.reshape(5, 12) @ f.reshape(5, 12).T for f in features]) / 60
    torch.testing.assert_close(gram_matrix(features), expected)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(feature_distance(x, y, "fro"), torch.sqrt(((x - y) ** 2).sum()))
    with pytest.raises(ValueError, match="style: Gram matrices need"):
        gram_matrix(torch.randn(2, 5, 3))


def test_vgg_layer_names():
    assert vgg_layer_names("vgg19")["conv5_4"] == "features.34"
    assert vgg_layer_names("vgg16")["conv5_3"] == "features.28" and vgg_layer_names("vgg16")["pool5"] == "features.30"
    assert vgg_layer_names("resnet50") == {}


def test_errors_name_the_argument(weights):
    kwargs = dict(checkpoint=weights)
    with pytest.raises(ValueError, match="are all 0"):
        FeatureLosses("resnet10t", perceptual_weight=0, d2sm_weight=0, **kwargs)
    with pytest.raises(ValueError, match="criterion must be one of"):
        FeatureLosses("resnet10t", criterion="l3", **kwargs)
    with pytest.raises(TypeError, match="layer_weights must be a mapping"):
        FeatureLosses("resnet10t", [1, 2], **kwargs)
    with pytest.raises(ValueError, match=r"d2sm_layer_weights\[3\] must be non-negative"):
        FeatureLosses("resnet10t", d2sm_layer_weights={3: -1.0}, **kwargs)
    with pytest.raises(ValueError, match="style_weight must be non-negative"):
        FeatureLosses("resnet10t", style_weight=-1, **kwargs)
    with pytest.raises(TypeError, match="layers: not an option of the D2SM term alone"):
        FeatureLosses("resnet10t", layers=[1], **kwargs)
    with pytest.raises(ValueError, match="granularity='patch'"):
        FeatureLosses("resnet10t", granularity="patch", **kwargs)
    losses = FeatureLosses("resnet10t", {3: 1.0}, **kwargs)
    with pytest.raises(ValueError, match="too small"):
        losses(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))


def test_backbone_autocast_false_runs_float32(weights):
    losses = FeatureLosses("resnet10t", {2: 1.0}, checkpoint=weights, style_weight=1.0)
    restored, clean = _images()
    reference = losses(restored, clean)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        terms = losses(restored.bfloat16(), clean.bfloat16())
    for name in reference:
        assert terms[name].dtype == torch.float32
        torch.testing.assert_close(terms[name], reference[name], rtol=0.05, atol=1e-5)


def test_feature_indices_out_of_order_return_their_own_maps():
    # timm's features_only returns its taps in increasing order whatever the order asked for
    from d2sm_loss import FeatureExtractor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = FeatureExtractor("resnet10t", [3, 1], pretrained=False)
    maps = extractor(torch.rand(1, 3, 64, 64))
    assert extractor.layers == ["layer3", "layer1"]
    assert [m.shape[1] for m in maps] == [256, 64]


def test_a_map_before_an_in_place_activation_is_returned_as_computed():
    # As VGG's ReLU(inplace=True) after conv5_4 ("features.34"), ResNet's act1 follows bn1 in place;
    # the map must keep its negatives.
    from d2sm_loss import FeatureExtractor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = FeatureExtractor("resnet10t", ["layer1.0.bn1", "layer2.0.bn1"], pretrained=False)
    conv, deeper = extractor(torch.rand(1, 3, 32, 32))
    assert (conv < 0).any() and (deeper < 0).any()


def test_a_user_module_backbone_selects_its_returned_maps():
    class TwoMaps(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.second = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)

        def forward(self, images):
            first = self.first(images)
            return [first, self.second(first)]

    torch.manual_seed(0)
    net = TwoMaps()
    losses = FeatureLosses(net, {0: 1.0}, d2sm_layer_weights={1: 1.0})
    restored, clean = _images(size=16)
    terms = losses(restored, clean)
    with torch.no_grad():
        x, y = net.first(restored), net.first(clean)
    torch.testing.assert_close(terms["perceptual"], (x - y).abs().mean())
    alone = SemanticStatisticsLoss(net, [1])
    torch.testing.assert_close(terms["d2sm"], alone(restored, clean))


def test_a_deep_copy_owns_one_backbone_of_its_own(weights):
    import copy

    losses = FeatureLosses("resnet10t", {2: 1.0}, checkpoint=weights, queue_size=4)
    assert losses.d2sm._extractor.model.extractor is losses._extractor  # the D2SM term shares the pass
    twin = copy.deepcopy(losses)
    assert twin._extractor is not losses._extractor
    assert twin.d2sm._extractor.model.extractor is twin._extractor
    restored, clean = _images()
    for a, b in zip(losses(restored, clean).values(), twin(restored, clean).values()):
        torch.testing.assert_close(a, b)
