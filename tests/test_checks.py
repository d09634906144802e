"""Argument checks of SemanticStatisticsLoss and similarity_kl: every bad option is refused
before a backbone is built, with a message naming it; numbers may be NumPy or 0-d tensor
scalars; non-finite values, empty batches and overflowing features are errors; swapped
arguments and maps with very few locations are warned about."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import d2sm_loss.loss
from d2sm_loss import SemanticStatisticsLoss, similarity_kl

from helpers import images


def conv(scale=1.0):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 5, stride=4), nn.Tanh())
    if scale != 1.0:
        net.append(Scale(scale))
    return net


class Scale(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


BAD_OPTIONS = [
    ({"input_range": 1}, TypeError, "input_range must be a sequence of numbers"),
    ({"input_range": (0, float("inf"))}, ValueError, r"input_range\[1\] must be a finite number"),
    ({"input_range": (0, 1, 2)}, ValueError, "input_range must have 2 values"),
    ({"pool_size": 2.5}, TypeError, "pool_size must be a sequence of ints"),
    ({"pool_size": (2, 2.0)}, TypeError, r"pool_size\[1\] must be an int"),
    ({"patch_size": 32.0}, TypeError, "patch_size must be an int"),
    ({"patch_stride": 0}, ValueError, "patch_stride must be an int >= 1"),
    ({"queue_size": 2.0}, TypeError, "queue_size must be an int"),
    ({"queue_size": True}, TypeError, "queue_size must be an int"),
    ({"temperature": "0.1"}, TypeError, "temperature must be a number"),
    ({"temperature": float("nan")}, ValueError, "temperature must be a finite number"),
    ({"temperature": 0}, ValueError, "temperature must be positive"),
    ({"mean": "abc"}, TypeError, "mean must be a sequence of numbers"),
    ({"mean": (0.5, float("nan"), 0.5)}, ValueError, r"mean\[1\] must be a finite number"),
    ({"std": (1.0, float("inf"), 1.0)}, ValueError, r"std\[1\] must be a finite number"),
    ({"std": (1.0, 0.0, 1.0)}, ValueError, r"std\[1\] must be positive"),
    ({"layer_weights": [1.0, "a"]}, TypeError, r"layer_weights\[1\] must be a number"),
    ({"layer_weights": [float("inf")]}, ValueError, r"layer_weights\[0\] must be a finite number"),
    ({"layer_weights": 2.0}, TypeError, "layer_weights must be a sequence of numbers"),
    ({"layer_weights": [0.0]}, ValueError, "layer_weights are all 0"),
    ({"layer_weights": []}, ValueError, "layer_weights must hold one weight per layer, got an empty sequence"),
    ({"layer_weights": np.float32(2.0)}, TypeError, "layer_weights must be a sequence of numbers"),
    ({"mean": np.array(0.5)}, TypeError, "mean must be a sequence of numbers"),
    ({"input_range": np.float64(1.0)}, TypeError, "input_range must be a sequence of numbers"),
    ({"backbone_kwargs": [1]}, TypeError, "backbone_kwargs must be a mapping"),
    ({"backbone_autocast": "no"}, TypeError, "backbone_autocast must be a bool"),
    ({"pretrained": 1}, TypeError, "pretrained must be a bool"),
    ({"granularity": None}, ValueError, "granularity must be one of"),
    ({"reduction": "none"}, ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_OPTIONS, ids=[next(iter(k)) + str(i) for i, (k, _, _) in enumerate(BAD_OPTIONS)])
def test_bad_options_are_refused_before_the_backbone_is_built(monkeypatch, kwargs, error, match):
    def no_build(*args, **kwargs):
        raise AssertionError("the backbone was built before the options were checked")

    monkeypatch.setattr(d2sm_loss.loss, "FeatureExtractor", no_build)
    with pytest.raises(error, match=match):
        SemanticStatisticsLoss("resnet10t", **{"pretrained": False, **kwargs})


def test_numpy_and_tensor_scalars_are_accepted():
    kwargs = dict(
        temperature=np.float32(0.25),
        queue_size=np.int64(4),
        patch_size=torch.tensor(16),
        patch_stride=np.int32(8),
        layer_weights=np.array([2.0]),
        input_range=np.array([0.0, 255.0]),
        pool_size=np.int64(2),
        include_self=np.bool_(True),
        similarity="softmax",
    )
    criterion = SemanticStatisticsLoss(conv(), **kwargs)
    assert criterion.temperature == 0.25 and type(criterion.temperature) is float
    assert criterion.queue_size == 4 and type(criterion.queue_size) is int
    assert (criterion.patch_size, criterion.patch_stride, criterion.pool_size) == (16, 8, (2, 2))
    assert criterion.layer_weights == [2.0] and criterion.input_range == (0.0, 255.0)
    plain = SemanticStatisticsLoss(
        conv(), temperature=0.25, queue_size=4, patch_size=16, patch_stride=8, layer_weights=[2.0],
        input_range=(0, 255), pool_size=2, similarity="softmax",
    )
    restored, clean = images()
    torch.testing.assert_close(criterion(restored * 255, clean * 255), plain(restored * 255, clean * 255))


def test_functional_options_take_numpy_scalars_and_refuse_non_finite():
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    want = similarity_kl(x, y, similarity="softmax", temperature=0.3)
    torch.testing.assert_close(similarity_kl(x, y, similarity="softmax", temperature=np.float64(0.3)), want)
    torch.testing.assert_close(similarity_kl(x, y, similarity="softmax", temperature=torch.tensor(0.3)), want)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        similarity_kl(x, y, similarity="softmax", temperature=float("nan"))
    with pytest.raises(TypeError, match="include_self must be a bool"):
        similarity_kl(x, y, include_self=1)
    with pytest.raises(ValueError, match="similarity must be one of"):
        similarity_kl(x, y, similarity=3)


def test_empty_batch_is_an_error():
    criterion = SemanticStatisticsLoss(conv())
    with pytest.raises(ValueError, match="restored is an empty batch"):
        criterion(torch.rand(0, 3, 32, 32), torch.rand(0, 3, 32, 32))


@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 0, 3), (5, 0), (0, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_functional_empty_input_is_an_error_not_a_nan(shape, reduction):
    with pytest.raises(ValueError, match="restored must have at least one group, one row and one feature"):
        similarity_kl(torch.randn(shape), torch.randn(shape), reduction=reduction)


def test_features_that_overflow_inside_the_backbone_are_an_error_not_a_nan_loss():
    criterion = SemanticStatisticsLoss(conv(scale=float("inf")))  # finite images, infinite features
    restored, clean = images()
    with pytest.raises(ValueError, match="not finite although the images are: the values overflow inside the backbone"):
        criterion(restored, clean)


def test_swapped_arguments_warn_once():
    criterion = SemanticStatisticsLoss(conv())
    restored, clean = images()
    restored = restored.detach()
    clean = clean.clone().requires_grad_()
    with pytest.warns(UserWarning, match=r"restored images come first") as record:
        criterion(restored, clean)
        criterion(restored, clean)
    assert sum("come first" in str(w.message) for w in record) == 1
    assert record[0].filename == __file__  # the user's line, not torch's Module.__call__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SemanticStatisticsLoss(conv())(*images())  # the right order: no warning


def test_location_granularity_with_few_locations_warns():
    criterion = SemanticStatisticsLoss(conv(), granularity="location")
    with pytest.warns(UserWarning, match=r"only 9 locations on 16x16 images .*Use larger images, a shallower layer") as record:
        criterion(*images(size=16))  # a 3 x 3 map
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SemanticStatisticsLoss(conv(), granularity="location")(*images(size=32))  # 7 x 7 = 49 locations
