"""Every checkpoint that cannot be loaded gives an error that names the file and says what
is wrong with it; a file found by ``pretrained=True`` also says how to get past it."""

from collections import OrderedDict

import pytest
import torch
from test_backbones import caches, network, random_resnet10t  # noqa: F401  (fixtures)

from d2sm_loss import FeatureExtractor, load_checkpoint
from d2sm_loss.weights import CheckpointError, map_state_dict

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    good = random_resnet10t().state_dict()
    torch.save(good, folder / "good.pth")
    data = (folder / "good.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    (folder / "empty.pth").write_bytes(b"")
    (folder / "text.pth").write_text("model weights are in the other folder\n")
    torch.save({"epoch": 3, "lr": [0.1]}, folder / "no_tensors.pth")
    torch.save({"model": torch.nn.Linear(2, 2)}, folder / "module.pth")  # a pickled module, not a state dict
    torch.save(timm.create_model("resnet18").state_dict(), folder / "resnet18.pth")
    return folder


@pytest.mark.parametrize(
    "name, what",
    [
        ("empty.pth", "is empty \\(0 bytes\\)"),
        ("truncated.pth", "is truncated or corrupt"),
        ("text.pth", "is not a PyTorch or safetensors checkpoint"),
        ("no_tensors.pth", "holds no tensors"),
        ("module.pth", "holds Python objects that torch.load\\(weights_only=True\\) does not load"),
        ("resnet18.pth", "does not fit ResNet.*another architecture"),
    ],
)
def test_a_bad_checkpoint_names_the_file_and_what_is_wrong(files, name, what):
    path = str(files / name)
    with pytest.raises(CheckpointError, match=what) as caught:
        FeatureExtractor("resnet10t", checkpoint=path)
    assert repr(path) in str(caught.value)
    with pytest.raises(ValueError, match=what):  # also for a user's module
        load_checkpoint(random_resnet10t(), path)


def _own_file(checkpoints):
    return checkpoints / timm.models.get_pretrained_cfg("resnet10t.c3_in1k").url.rsplit("/", 1)[-1]


@pytest.mark.parametrize("damage", ["truncated", "empty", "other architecture"])
def test_a_bad_file_found_by_pretrained_says_how_to_get_past_it(caches, network, damage):  # noqa: F811
    checkpoints, _ = caches
    path = _own_file(checkpoints)
    if damage == "other architecture":
        torch.save(timm.create_model("resnet18").state_dict(), path)
    else:
        torch.save(random_resnet10t().state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"")
    with pytest.raises(CheckpointError) as caught:
        FeatureExtractor("resnet10t", pretrained=True)
    message = str(caught.value)
    assert repr(str(path)) in message and "torch hub's checkpoint folder" in message
    assert "delete it" in message and "checkpoint=PATH" in message
    assert network.downloads == []


def _renamed(state, order=None):
    """The tensors under other names (a torchvision-style file), optionally reordered."""
    items = list(state.items())
    if order is not None:
        items = [items[i] for i in order]
    return OrderedDict((f"net.{i}.{key.rsplit('.', 1)[-1]}", value) for i, (key, value) in enumerate(items))


def test_matching_by_position_checks_each_tensors_role():
    model = random_resnet10t()
    state = model.state_dict()
    keys = list(state)
    mapped = map_state_dict(_renamed(state), model)  # same order: loads
    assert all(torch.equal(mapped[k], state[k]) for k in keys)
    mean, var = keys.index("conv1.1.running_mean"), keys.index("conv1.1.running_var")
    order = list(range(len(keys)))
    order[mean], order[var] = var, mean  # a BatchNorm's (C,) statistics swapped: equal shapes
    with pytest.raises(CheckpointError, match="role 'running_var' against 'running_mean'"):
        map_state_dict(_renamed(state, order), model)


def test_a_file_sorted_by_name_says_it_cannot_be_matched_by_position(tmp_path):
    from safetensors.torch import save_file

    model = random_resnet10t()
    state = _renamed(model.state_dict())
    path = tmp_path / "sorted.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))  # stored sorted by name
    with pytest.raises(CheckpointError, match="does not keep the order of its tensors.*cannot be matched by position") as caught:
        map_state_dict(path, model)
    assert repr(str(path)) in str(caught.value)
