"""d2sm_loss.weights on its own: the order in which weights are looked for, the error that names
what was tried, what timm is told, and mapping and checking a state dict. No model is built
beyond shape-only blueprints on the meta device and a small ResNet; no network is opened."""

import warnings

import pytest
import torch
from torch import nn

from d2sm_loss import FeatureExtractor
from d2sm_loss.weights import CheckpointError, WeightSource, check_complete, hub, map_state_dict, weight_source

timm = pytest.importorskip("timm")
huggingface_hub = pytest.importorskip("huggingface_hub")


def blueprint(name: str) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name)


@pytest.fixture
def offline(monkeypatch):
    """The hub request fails as without network; timm's downloads are not reached by these tests."""

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known (test)")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)


# ------------------------------------------------------------------ where weights are looked for


def test_the_own_weights_come_before_every_stand_in():
    cfg = blueprint("resnet18").pretrained_cfg
    found = hub.candidates("resnet18", cfg)
    exact = [c.exact for c in found]
    assert exact[0] and False in exact and exact == sorted(exact, reverse=True)
    assert "resnet18-f37072fd.pth" in [c.file_name for c in found if not c.exact]  # torchvision's tag
    assert all(c.exact for c in hub.candidates("resnet18.a1_in1k", cfg))  # a tag chosen by name


def test_the_first_candidate_on_disk_is_taken_without_a_warning(tmp_path, monkeypatch, offline):
    """Every candidate "lies" on disk (the same file): the backbone's own weights win, quietly."""
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    monkeypatch.setattr(hub, "locate", lambda candidate, cache_dir=None: path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = weight_source("resnet18", blueprint("resnet18"), pretrained=True)
    assert source.model_name == "resnet18.a1_in1k" and source.description == str(path) and not source.download


def test_the_checkpoint_argument_is_used_without_any_search(monkeypatch):
    monkeypatch.setattr(hub, "candidates", lambda *args: pytest.fail("searched for weights"))
    state = timm.create_model("resnet10t").state_dict()
    source = weight_source("resnet10t", blueprint("resnet10t"), pretrained=True, checkpoint=state)
    assert source.description == "the checkpoint argument" and source.pretrained
    assert torch.equal(source.overlay["state_dict"]["conv1.0.weight"], state["conv1.0.weight"])


def test_without_weights_or_network_the_error_names_every_place_tried(tmp_path, offline):
    with pytest.raises(RuntimeError) as caught:
        weight_source("resnet18", blueprint("resnet18"), pretrained=True, cache_dir=tmp_path)
    message = str(caught.value)
    assert f"torch hub's checkpoint folder {str(tmp_path)!r} for " in message
    assert "resnet18-f37072fd.pth" in message  # a stand-in's file was looked for too
    assert f"the Hugging Face cache {str(tmp_path)!r} for timm/resnet18.a1_in1k" in message
    assert "(ConnectionError: Name or service not known (test))" in message
    assert "checkpoint='/path/to/file.pth'" in message


# ------------------------------------------------------------------ what timm is told


def test_the_overlay_keeps_the_users_own_overlay():
    source = WeightSource("resnet10t", True, {"state_dict": {}}, "x")
    kwargs = source.timm_kwargs({"pretrained_cfg_overlay": {"mean": (0.5, 0.5, 0.5)}, "drop_rate": 0.1})
    assert kwargs == {
        "pretrained": True,
        "drop_rate": 0.1,
        "pretrained_cfg_overlay": {"mean": (0.5, 0.5, 0.5), "state_dict": {}},
    }


@pytest.mark.parametrize("download", [True, False])
def test_only_a_failed_download_becomes_the_offline_error(download):
    source = WeightSource("resnet10t", True, {}, "download", download=download)
    with pytest.raises(ValueError, match="not the network"):  # any other error passes unchanged
        with source.loading():
            raise ValueError("not the network")
    expected = RuntimeError if download else ConnectionError
    with pytest.raises(expected) as caught:
        with source.loading():
            raise ConnectionError("unreachable")
    if download:
        assert str(caught.value).startswith("could not download pretrained weights for backbone 'resnet10t'")


# ------------------------------------------------------------------ mapping and checking


class Small(nn.Module):
    pretrained_cfg = {"classifier": "fc"}

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def test_a_state_dict_maps_by_name_in_any_order_and_by_position_under_other_names():
    torch.manual_seed(0)
    model, state = Small(), Small().state_dict()
    by_name = map_state_dict(dict(reversed(state.items())), model)
    assert list(by_name) == list(model.state_dict())
    assert all(torch.equal(by_name[k], state[k]) for k in state)
    renamed = {f"features.{i}.{k.rsplit('.', 1)[1]}": v for i, (k, v) in enumerate(state.items())}
    by_position = map_state_dict(renamed, model)
    assert all(torch.equal(by_position[k], state[k]) for k in state)


def test_a_missing_classifier_is_allowed_any_other_missing_tensor_is_named():
    state = Small().state_dict()
    check_complete({k: v for k, v in state.items() if not k.startswith("fc.")}, Small(), "'x.pth'")
    with pytest.raises(CheckpointError, match=r"'x.pth' would leave 1 of the model's tensors unset .*conv.bias"):
        check_complete({k: v for k, v in state.items() if k != "conv.bias"}, Small(), "'x.pth'")


# ------------------------------------------------------------------ warnings


def test_the_weights_warnings_point_at_the_callers_line(tmp_path, monkeypatch, offline):
    with pytest.warns(UserWarning, match="random weights") as random:
        FeatureExtractor("resnet10t", pretrained=False)
    path = tmp_path / "resnet18-f37072fd.pth"  # resnet18.tv_in1k's file: a stand-in for "resnet18"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    monkeypatch.setattr(hub, "locate", lambda c, cache_dir=None: path if c.file_name == path.name else None)
    with pytest.warns(UserWarning, match="using torchvision's") as stand_in:
        weight_source("resnet18", blueprint("resnet18"), pretrained=True)
    assert [w.filename for w in [*random, *stand_in]] == [__file__, __file__]
