"""SemanticStatisticsLoss end to end: backbones, layers, granularities, queue, freezing, errors.

Backbones are built with random weights (no network in CI) or from checkpoints written here.
"""

import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from torch import nn

from d2sm_loss import SemanticStatisticsLoss, similarity_kl
from d2sm_loss.rows import feature_rows

from helpers import conv_loss, images, timm_loss

pytestmark = pytest.mark.filterwarnings("ignore:SemanticStatisticsLoss. backbone .* has random weights")


SHARP = {"similarity": "softmax", "temperature": 0.05}  # random-weight features differ little: sharpen

FAMILIES = {
    "resnet10t": {},
    "mobilenetv3_small_050": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"backbone_kwargs": {"dynamic_img_size": True}},
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("granularity", ["image", "patch", "location"])
def test_every_granularity_on_several_families(family, granularity):
    torch.manual_seed(0)
    criterion = timm_loss(family, granularity=granularity, patch_size=32, patch_stride=16, similarity="softmax",
                     temperature=0.05, **FAMILIES[family])
    clean = images(batch=2, size=64, seed=0)[1]
    restored = images(batch=2, size=64, seed=1)[1].requires_grad_()
    loss = criterion(restored, clean)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(restored.grad).all() and restored.grad.abs().sum() > 0
    # The same number from the features, in float64, with the granularity's grouping done here.
    with torch.no_grad():
        prepare = criterion._prepare
        fx = criterion._extractor(prepare(restored))[0].double()
        fy = criterion._extractor(prepare(clean))[0].double()
    if granularity == "location":
        fx, fy = (f.flatten(2).transpose(1, 2) if f.dim() == 4 else f for f in (fx, fy))
    else:
        fx, fy = fx.flatten(1), fy.flatten(1)
    expected = similarity_kl(fx, fy, similarity="softmax", temperature=0.05, implementation="reference")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-3, atol=1e-6)
    same = clean.clone().requires_grad_()
    zero = criterion(same, clean)
    zero.backward()
    assert abs(zero.item()) < 1e-6
    assert same.grad.abs().max() < 1e-6


def test_location_granularity_is_the_mean_of_per_image_groups():
    criterion = timm_loss("resnet10t", layers=[2], granularity="location", implementation="reference", **SHARP)
    restored, clean = images(batch=2, size=40)
    with torch.no_grad():
        fx = criterion._extractor(restored)[0]
        fy = criterion._extractor(clean)[0]
    expected = similarity_kl(fx.flatten(2).transpose(1, 2), fy.flatten(2).transpose(1, 2), **SHARP)
    assert expected > 1e-4
    torch.testing.assert_close(criterion(restored, clean), expected, rtol=1e-5, atol=1e-9)


def test_patch_granularity_cuts_crops():
    criterion = timm_loss("resnet10t", layers=[1], granularity="patch", patch_size=16, patch_stride=8, pool_size=1, **SHARP)
    restored, clean = images(batch=2, size=32)
    crops_r = restored.unfold(2, 16, 8).unfold(3, 16, 8).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 16, 16)
    crops_c = clean.unfold(2, 16, 8).unfold(3, 16, 8).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 16, 16)
    assert crops_r.shape[0] == 2 * 3 * 3
    with torch.no_grad():
        fx = criterion._extractor(crops_r)[0].mean((2, 3))
        fy = criterion._extractor(crops_c)[0].mean((2, 3))
    expected = similarity_kl(fx, fy, **SHARP)
    assert expected > 1e-4
    torch.testing.assert_close(criterion(restored, clean), expected, rtol=1e-4, atol=1e-9)


def test_layers_by_index_and_by_name_and_weighted_sum():
    restored, clean = images()
    restored = images(seed=5)[1]
    by_index = timm_loss("resnet10t", layers=[1, -1], granularity="location", **SHARP)
    assert by_index.layers == ["layer1", "layer4"]
    by_name = timm_loss("resnet10t", layers=["layer1", "layer4"], granularity="location", **SHARP)
    value = by_index(restored, clean)
    assert value > 1e-4
    torch.testing.assert_close(value, by_name(restored, clean), rtol=1e-6, atol=0)
    inner = timm_loss("resnet10t", layers=["layer2.0.conv1"])  # a node inside a block
    assert inner.layers == ["layer2.0.conv1"] and torch.isfinite(inner(restored, clean))
    weighted = timm_loss("resnet10t", layers=[1, 2], layer_weights=[0.25, 2.0], granularity="location", **SHARP)
    first = timm_loss("resnet10t", layers=[1], granularity="location", **SHARP)
    second = timm_loss("resnet10t", layers=[2], granularity="location", **SHARP)
    a, b = first(restored, clean), second(restored, clean)
    assert a > 1e-4 and b > 1e-4
    torch.testing.assert_close(weighted(restored, clean), 0.25 * a + 2.0 * b, rtol=1e-6, atol=0)


class TwoMaps(nn.Module):
    """A user backbone returning two feature maps, as a dict ("a", "b") or a list."""

    def __init__(self, as_dict=True):
        super().__init__()
        self.as_dict = as_dict
        self.a = nn.Conv2d(3, 8, 3, stride=2)
        self.b = nn.Conv2d(8, 16, 3, stride=2)

    def forward(self, x):
        a = torch.tanh(self.a(x))
        b = torch.tanh(self.b(a))
        return {"a": a, "b": b} if self.as_dict else [a, b]


def test_user_module_backbone():
    net = TwoMaps()
    criterion = SemanticStatisticsLoss(net, layers=["b"], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    restored, clean = images()
    loss = criterion(restored, clean)
    loss.backward()
    assert torch.isfinite(loss) and restored.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in criterion.backbone.parameters())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())  # the user's module is untouched
    with pytest.raises(ValueError, match="no output named 'c'"):
        SemanticStatisticsLoss(TwoMaps(), layers=["c"])(restored, clean)


def test_backbone_is_frozen_out_of_parameters_and_state_dict():
    criterion = timm_loss("resnet10t", queue_size=4)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
    model.criterion = criterion
    model.train()
    assert not criterion.backbone.training
    assert all(not p.requires_grad for p in criterion.backbone.parameters())
    assert list(criterion.parameters()) == []
    assert len(list(model.parameters())) == 2  # the conv's weight and bias only
    keys = list(model.state_dict())
    assert all(k.startswith("0.") or k.startswith("criterion.queues.") for k in keys), keys
    model.double()
    assert next(criterion.backbone.parameters()).dtype == torch.float64


def test_restored_features_get_gradient_but_clean_pass_builds_no_graph():
    criterion = timm_loss("resnet10t")
    restored, clean = images()
    clean.requires_grad_()
    criterion(restored, clean).backward()
    assert restored.grad is not None and clean.grad is None


def test_user_module_returning_several_maps_uses_each_with_its_weight():
    torch.manual_seed(0)
    net = TwoMaps(as_dict=False)
    restored, clean = images()
    first = SemanticStatisticsLoss(net, layers=[0], similarity="softmax")(restored, clean)
    second = SemanticStatisticsLoss(net, layers=[1], similarity="softmax")(restored, clean)
    both = SemanticStatisticsLoss(net, layer_weights=[0.5, 2.0], similarity="softmax")(restored, clean)
    assert first > 1e-5 and second > 1e-5
    torch.testing.assert_close(both, 0.5 * first + 2.0 * second)
    with pytest.raises(ValueError, match="returned 2 feature maps but the loss has 1 layer weight"):
        SemanticStatisticsLoss(net)(restored, clean)


def test_vit_tokens_by_name_lie_on_the_patch_grid_without_class_token():
    # The block's last graph node (traced), against the same block as a feature tap.
    by_name = timm_loss("vit_tiny_patch16_224", layers=["blocks.5.add_1"], granularity="location")
    by_index = timm_loss("vit_tiny_patch16_224", layers=[5], granularity="location")
    assert by_name._extractor._select is not None and by_index._extractor._select is None
    x = torch.rand(2, 3, 224, 224)
    named, indexed = by_name._extractor(x)[0], by_index._extractor(x)[0]
    assert named.shape == (2, 192, 14, 14)  # 196 patch tokens, the class token dropped
    torch.testing.assert_close(named, indexed)
    pooled = timm_loss("vit_tiny_patch16_224", layers=["blocks.5"], pool_size=2)
    assert feature_rows(pooled._extractor(x)[0], pooled.granularity, pooled.pool_size).shape == (2, 192 * 4)


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing")
def test_channels_last_timm_maps_are_permuted():
    extractor = timm_loss("swin_tiny_patch4_window7_224", layers=["layers.2"])._extractor
    (features,) = extractor(torch.rand(1, 3, 224, 224))
    assert features.shape == (1, 384, 14, 14) and extractor.reductions == [16]
    info = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, features_only=True).feature_info
    (deepest,) = timm_loss("swin_tiny_patch4_window7_224")._extractor(torch.rand(1, 3, 224, 224))
    assert deepest.shape == (1, info.channels()[-1], 7, 7)


def test_constant_and_black_images_are_finite():
    criterion = timm_loss("resnet10t", granularity="location", layers=[1])
    for value in (0.0, 1.0):
        restored = torch.full((2, 3, 32, 32), value, requires_grad=True)
        clean = torch.rand(2, 3, 32, 32)
        loss = criterion(restored, clean)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(restored.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu(dtype):
    criterion = timm_loss("resnet10t", layers=[2], granularity="location", **SHARP)
    restored, clean = images()
    full = criterion(restored, clean)
    assert full > 1e-4
    with torch.autocast("cpu", dtype=dtype):
        low = criterion(restored, clean)
    low.backward()
    assert low.dtype == torch.float32 and torch.isfinite(restored.grad).all()
    assert abs(low.item() - full.item()) <= 0.1 * abs(full.item()) + 1e-6
    queued = conv_loss(queue_size=5, pool_size=2, similarity="softmax")
    with torch.autocast("cpu", dtype=dtype):
        for seed in range(3):  # low-precision features meet the float32 queue
            value = queued(*images(seed=seed))
    assert value.dtype == torch.float32 and torch.isfinite(value) and queued.queues[0].restored.dtype == torch.float32


def test_grayscale_and_input_range():
    criterion = conv_loss(input_range=(0, 255), similarity="softmax")
    restored, clean = images(channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 255-range images are in range: no warning
        loss = criterion(restored * 255, clean * 255)
    # The reference sees the images exactly as the range mapping leaves them ((x * 255) / 255
    # differs from x in the last bit, which the sharp softmax statistic amplifies).
    mapped_restored, mapped_clean = (restored * 255) / 255, (clean * 255) / 255
    reference = conv_loss(similarity="softmax")(mapped_restored.expand(-1, 3, -1, -1), mapped_clean.expand(-1, 3, -1, -1))
    assert reference > 1e-5
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-8)


def test_out_of_range_values_warn_once():
    criterion = timm_loss("resnet10t")
    restored, clean = images()
    with pytest.warns(UserWarning, match="outside input_range") as record:
        criterion(restored * 3, clean)
        criterion(restored * 3, clean)
    assert sum("outside input_range" in str(w.message) for w in record) == 1
    assert [w.filename for w in record if "outside input_range" in str(w.message)] == [__file__]


def test_non_finite_inputs_raise_unless_checks_are_off():
    criterion = timm_loss("resnet10t")
    restored, clean = images()
    bad = restored.detach().clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="restored contains NaN or inf"):
        criterion(bad, clean)
    inf = clean.clone()
    inf[1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="clean contains NaN or inf"):
        criterion(restored, inf)
    timm_loss("resnet10t", check_inputs=False)(restored, clean)  # runs without the check


@pytest.mark.parametrize(
    "restored, clean, error, match",
    [
        (torch.rand(3, 32, 32), torch.rand(3, 32, 32), ValueError, "restored must have shape .B, C, H, W."),
        (torch.rand(2, 4, 32, 32), torch.rand(2, 4, 32, 32), ValueError, "1 or 3 channels"),
        (torch.rand(2, 3, 32, 32), torch.rand(2, 3, 40, 32), ValueError, "same shape"),
        (torch.ones(2, 3, 32, 32, dtype=torch.uint8), torch.ones(2, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, device="meta"), ValueError, "same device"),
        (torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), ValueError, "too small"),
        (torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), ValueError, "batch of one"),
        ("image", torch.rand(2, 3, 32, 32), TypeError, "restored must be a torch.Tensor"),
    ],
)
def test_bad_images(restored, clean, error, match):
    criterion = timm_loss("resnet10t")  # deepest tap has reduction 32
    with pytest.raises(error, match=match):
        criterion(restored, clean)


def test_patch_larger_than_image_and_vit_size():
    with pytest.raises(ValueError, match="too small for patch_size=64"):
        timm_loss("resnet10t", granularity="patch", patch_size=64)(*images(size=48))
    vit = timm_loss("vit_tiny_patch16_224", granularity="location")
    with pytest.raises(ValueError, match="exactly 224x224"):
        vit(*images(size=64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"granularity": "pixel"}, "granularity must be one of"),
        ({"similarity": "rbf"}, "similarity must be one of"),
        ({"reduction": "none"}, "reduction must be one of"),
        ({"implementation": "cuda"}, "implementation must be one of"),
        ({"queue_size": -1}, "queue_size"),
        ({"queue_size": 4, "granularity": "location"}, "queue_size"),
        ({"temperature": -0.1}, "temperature"),
        ({"input_range": (1, 0)}, "input_range"),
        ({"patch_size": 0}, "patch_size"),
        ({"pool_size": (2, 0)}, "pool_size"),
        ({"layers": [9]}, "feature index 9 is out of range"),
        ({"layers": ["layer9"]}, "not a module or node"),
        ({"layers": []}, "at least one layer"),
        ({"layers": [1], "layer_weights": [1.0, 2.0]}, "one weight per layer"),
        ({"mean": (0.5, 0.5)}, "mean must have 3 values"),
        ({"layers": [1], "layer_weights": [-1.0]}, "non-negative"),
        ({"layers": [1], "layer_weights": [float("nan")]}, "finite"),
        ({"granularity": "patch", "patch_size": 16}, "patch_size=16 is too small"),  # resnet10t's deepest tap is /32
        ({"temperature": float("inf")}, "temperature"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm_loss("resnet10t", **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer_weights": 2.0}, "layer_weights must be a sequence"),
        ({"include_self": 1}, "include_self must be a bool"),
        ({"check_inputs": "yes"}, "check_inputs must be a bool"),
        ({"distributed": None}, "distributed must be a bool"),
    ],
)
def test_bad_option_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        timm_loss("resnet10t", **kwargs)


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="not a timm model name.*resnet50"):
        timm_loss("resnet05")
    with pytest.raises(TypeError, match="backbone must be"):
        SemanticStatisticsLoss(42)


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="random weights"):
        SemanticStatisticsLoss("resnet10t", pretrained=False)


def test_pretrained_without_network_says_how_to_pass_a_file():
    code = (
        "from d2sm_loss import SemanticStatisticsLoss\n"
        "try:\n"
        "    SemanticStatisticsLoss('resnet10t', pretrained=True)\n"
        "except RuntimeError as e:\n"
        "    print('MESSAGE', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "MESSAGE could not download pretrained weights for backbone 'resnet10t'" in out.stdout, out.stderr
    assert "checkpoint='/path/to/file.pth'" in out.stdout
    assert "Traceback" not in out.stderr


def test_torchvision_checkpoint_loads_into_timm_by_position(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(weights=None).eval()
    path = tmp_path / "mobilenet_v2_tv.pth"
    torch.save(tv.state_dict(), path)
    criterion = SemanticStatisticsLoss("mobilenetv2_100", layers=[2], checkpoint=path, granularity="location")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours = criterion.backbone((x - criterion._extractor.mean) / criterion._extractor.std)[0]
        theirs = tv.features[:7]((x - criterion._extractor.mean) / criterion._extractor.std)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)  # features.6 ends stage 3 (/8)


def test_mismatched_checkpoint_names_the_first_mismatch(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet.pth'.*entry 0, 'conv1.0.weight', .*shape \(24, 3, 3, 3\)"):
        SemanticStatisticsLoss("mobilenetv2_100", checkpoint=path)


def test_timm_format_checkpoint_loads_by_name(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("resnet10t").eval()
    path = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    criterion = SemanticStatisticsLoss("resnet10t", layers=[-1], checkpoint=path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        normalised = (x - criterion._extractor.mean) / criterion._extractor.std
        torch.testing.assert_close(criterion.backbone(normalised)[0], full.forward_features(normalised))


def test_paper_preset_configuration():
    criterion = SemanticStatisticsLoss.paper(pretrained=False)
    assert criterion.layers == ["features.34"]  # conv5_4 before its ReLU
    assert isinstance(dict(criterion.backbone.named_modules())["features.34"], nn.Conv2d)
    assert criterion.granularity == "image" and criterion.similarity == "cosine" and criterion.include_self
    assert criterion.queue_size == 224
    torch.testing.assert_close(criterion._extractor.mean.flatten(), torch.tensor([0.4488, 0.4371, 0.4040]))
    torch.testing.assert_close(criterion._extractor.std.flatten(), torch.ones(3))
    restored, clean = images(batch=2, size=32)
    loss = criterion(restored, clean)
    loss.backward()
    assert loss.requires_grad is True or loss.grad_fn is not None
    assert restored.grad.abs().sum() > 0
    assert criterion.queues[0].count == 2
    override = SemanticStatisticsLoss.paper(pretrained=False, queue_size=16, similarity="softmax")
    assert override.queue_size == 16 and override.similarity == "softmax"


def test_default_layer_is_vgg19_conv5_4_before_its_relu():
    """After a ReLU every feature is >= 0, so every cosine is >= 0: the default taps the
    last convolution of VGG19 before its ReLU, where cosines of real images can be negative."""
    criterion = SemanticStatisticsLoss(pretrained=False)
    assert criterion.layers == ["features.34"]
    assert isinstance(dict(criterion.backbone.named_modules())["features.34"], nn.Conv2d)
    torch.testing.assert_close(criterion._extractor.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    restored, clean = images(batch=3, size=32)
    with torch.no_grad():
        (features,) = criterion.feature_maps(restored)
    assert (features < 0).any()  # not a post-ReLU map
    assert timm_loss("resnet10t").layers == ["layer4"]  # other backbones: the deepest tap


def test_rows_and_statistic_are_the_forward_and_leave_the_queue_alone():
    criterion = conv_loss(queue_size=5, similarity="softmax")
    for seed in range(3):  # an empty, a partly filled and a wrapped queue
        restored, clean = images(seed=seed)
        before = {k: v.clone() for k, v in criterion.state_dict().items() if isinstance(v, torch.Tensor)}
        rows = criterion.rows(restored, clean)
        seam = criterion.statistic(rows)
        after = criterion.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # rows() does not push
        (layer,) = rows
        assert layer.batch_rows == 3 and layer.restored.shape[0] == 3 and layer.queue is criterion.queues[0]
        assert layer.all_rows()[0].shape[0] == 3 + criterion.queues[0].count
        torch.testing.assert_close(layer.restored[:3], criterion.feature_maps(restored)[0].flatten(1))
        torch.testing.assert_close(seam, criterion(restored, clean))


def test_location_rows_are_one_group_per_image():
    criterion = conv_loss(granularity="location")
    restored, clean = images(size=45)
    (layer,) = criterion.rows(restored, clean)
    maps = criterion.feature_maps(restored)[0]
    assert layer.restored.shape == (3, maps.shape[2] * maps.shape[3], maps.shape[1])
    torch.testing.assert_close(layer.restored, maps.flatten(2).transpose(1, 2))
    assert layer.clean.grad_fn is None and layer.restored.grad_fn is not None
