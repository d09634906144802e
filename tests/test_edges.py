"""Configurations at the edges: a statistic that would be identically zero is an error,
never a silent constant; the user's module is not changed in place; the extractor stays
in eval mode."""

import pytest
import torch
from torch import nn

from d2sm_loss import SemanticStatisticsLoss

from helpers import conv_loss, images, timm_loss

pytestmark = pytest.mark.filterwarnings("ignore:SemanticStatisticsLoss. backbone .* has random weights")


# --- never a silent constant -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_two_images_without_the_diagonal_is_an_error(mode):
    criterion = conv_loss(include_self=False, pool_size=2, similarity="softmax", temperature=0.05)
    criterion.train(mode == "train")
    with pytest.raises(ValueError, match="include_self=False.*2 images.*identically 0"):
        with torch.set_grad_enabled(mode != "no_grad"):
            criterion(*images(batch=2))
    assert criterion(images(batch=3, seed=1)[0], images(batch=3, seed=2)[1]) > 1e-4  # three images compare


def test_two_crops_without_the_diagonal_is_an_error():
    criterion = conv_loss(include_self=False, granularity="patch", patch_size=24)
    restored, clean = images(batch=1, size=48)
    with pytest.raises(ValueError, match="include_self=False.*2 crops.*identically 0"):
        criterion(restored[:, :, :24], clean[:, :, :24])  # a 24 x 48 image: two crops


def test_two_locations_without_the_diagonal_is_an_error():
    with pytest.raises(ValueError, match="pool_size.*identically 0"):
        conv_loss(include_self=False, granularity="location", pool_size=(1, 2))
    with pytest.raises(ValueError, match="pool_size.*nothing to compare"):
        conv_loss(granularity="location", pool_size=1)
    criterion = conv_loss(include_self=False, granularity="location")
    with pytest.raises(ValueError, match="include_self=False.*2 locations.*identically 0"):
        criterion(*[t[:, :, :8, :12] for t in images(batch=2)])  # a 1 x 2 map of the stride-4 conv


def test_a_filling_queue_lets_a_small_batch_through_but_a_full_one_does_not():
    criterion = conv_loss(include_self=False, queue_size=1, pool_size=2)
    first = criterion(*images(batch=2, seed=0))  # the queue is filling: zero, attached to the graph
    assert first.item() == 0.0 and first.requires_grad
    restored, clean = images(batch=2, seed=1)
    second = criterion(restored, clean)  # 2 rows + 1 queued row
    second.backward()
    assert second > 0 and restored.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="identically 0"):
        criterion(*images(batch=1, seed=2))  # 1 row + the full queue's 1 row, forever


# --- ownership of the user's module ------------------------------------------------------


class Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.norm(self.conv(x)))


def test_the_users_module_is_not_changed_in_place(tmp_path):
    torch.manual_seed(0)
    net = Probe().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    other = Probe()
    torch.save(other.state_dict(), tmp_path / "other.pth")
    criterion = SemanticStatisticsLoss(net, checkpoint=tmp_path / "other.pth")
    assert net.training and all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the checkpoint went to the copy
    assert torch.equal(criterion.backbone.conv.weight, other.conv.weight)
    assert not criterion.backbone.training and not any(p.requires_grad for p in criterion.backbone.parameters())
    # The user's network keeps training, e.g. as a discriminator beside the loss.
    restored, clean = images()
    (net(restored).mean() + criterion(restored, clean)).backward()
    assert net.conv.weight.grad is not None and criterion.backbone.conv.weight.grad is None


def test_a_stand_alone_feature_extractor_stays_in_eval_mode():
    from d2sm_loss import FeatureExtractor

    torch.manual_seed(0)
    extractor = FeatureExtractor(Probe())
    parent = nn.Sequential(nn.Conv2d(3, 3, 1), extractor)
    parent.train()
    assert parent[0].training
    assert not extractor.training and not any(m.training for m in extractor.modules())
    extractor.train()
    assert not any(m.training for m in extractor.modules())
    x = torch.rand(2, 3, 16, 16)
    first, second = extractor(x)[0], extractor(x)[0]
    assert torch.equal(first, second)  # no dropout, no batch statistics


# --- backbones chosen by name behave like integer taps -----------------------------------


@pytest.mark.parametrize("layers", [["blocks.3"], ["blocks.3.mlp.fc2"], [3]])
def test_a_vit_layer_by_name_checks_the_image_size_like_a_tap(layers):
    criterion = timm_loss("vit_tiny_patch16_224", layers=layers)
    with pytest.raises(ValueError, match="takes images of exactly 224x224, got 64x64"):
        criterion(*images(batch=2, size=64))
    patches = timm_loss("vit_tiny_patch16_224", layers=layers, granularity="patch", patch_size=32)
    with pytest.raises(ValueError, match="takes images of exactly 224x224; set patch_size=224"):
        patches(*images(batch=2, size=64))


def test_a_feature_tap_named_by_its_module_is_that_tap():
    kwargs = {"backbone_kwargs": {"dynamic_img_size": True}}
    by_name = timm_loss("deit_tiny_distilled_patch16_224", layers=["blocks.3"], **kwargs)
    by_index = timm_loss("deit_tiny_distilled_patch16_224", layers=[3], **kwargs)
    restored, clean = images(batch=3, size=64)
    torch.testing.assert_close(by_name(restored, clean), by_index(restored, clean), rtol=0, atol=0)
    assert by_name.layers == by_index.layers == ["blocks.3"]
    resnet_tap = timm_loss("resnet10t", layers=["layer2"])  # the tap, against the traced node of its block
    resnet_node = timm_loss("resnet10t", layers=["layer2.0"])
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(resnet_tap._extractor(x)[0], resnet_node._extractor(x)[0])


def test_a_model_that_cannot_be_traced_names_layers_and_suggests_a_tap():
    with pytest.raises(ValueError, match=r"layers: .*cannot be traced.*layers=\[\d+\]") as caught:
        timm_loss("deit_tiny_distilled_patch16_224", layers=["blocks.3.mlp.fc2"],
                  backbone_kwargs={"dynamic_img_size": True})
    assert "blocks.3" in str(caught.value)  # the taps are listed
