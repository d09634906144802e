"""FeatureExtractor: where pretrained weights are found offline, how a missing network fails,
duplicate layers, the ``weights`` argument, and that importing the package patches nothing.

No test here opens a network connection: the hub request and timm's downloads are replaced by
fakes that record their calls, and torch hub's folder and the Hugging Face cache are temporary
folders.
"""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from d2sm_loss import FeatureExtractor, SemanticStatisticsLoss
from d2sm_loss.weights import hub as _hub
from d2sm_loss.weights import map_state_dict

from helpers import subprocess_env

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
huggingface_hub = pytest.importorskip("huggingface_hub")

RANDOM = "ignore:SemanticStatisticsLoss. backbone .* has random weights"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Network:
    """Records the hub request and timm's download attempts; both fail as without network."""

    def __init__(self) -> None:
        self.probes: list[tuple[str, dict]] = []
        self.downloads: list[tuple] = []
        self.answer = False  # True: the hub request succeeds

    def probe(self, url, **kwargs):
        self.probes.append((url, kwargs))
        if not self.answer:
            raise ConnectionError("[Errno -2] Name or service not known (test)")
        return object()

    def download(self, *args, **kwargs):
        self.downloads.append((args, kwargs))
        raise ConnectionError("timm tried to download (test)")


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches in tmp_path; returns (checkpoints folder, HF cache)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    hf = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    hf.mkdir()
    assert Path(torch.hub.get_dir()) / "checkpoints" == checkpoints
    return checkpoints, hf


@pytest.fixture
def network(monkeypatch):
    import timm.models._builder as timm_builder
    import timm.models._hub as timm_hub

    net = Network()
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", net.probe)
    monkeypatch.setattr(timm_hub, "hf_hub_download", net.download)
    monkeypatch.setattr(timm_builder, "load_state_dict_from_url", net.download)
    return net


def put_in_hf_cache(root: Path, repo: str, filename: str, state: dict) -> Path:
    """Lay out a file as huggingface_hub's cache does (refs/main -> snapshots/<commit>/file)."""
    from safetensors.torch import save_file

    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    path = snapshot / filename
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    return path


def random_resnet10t(seed=1):
    torch.manual_seed(seed)
    return timm.create_model("resnet10t").eval()


def deepest_features(extractor: FeatureExtractor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return extractor.model((x - extractor.mean) / extractor.std)[0]


def normalised(extractor: FeatureExtractor, x: torch.Tensor) -> torch.Tensor:
    return (x - extractor.mean) / extractor.std


# ------------------------------------------------------------------ weights found offline


def test_own_file_in_torch_hub_folder_loads_without_network(caches, network):
    checkpoints, _ = caches
    full = random_resnet10t()
    url_name = timm.models.get_pretrained_cfg("resnet10t.c3_in1k").url.rsplit("/", 1)[-1]
    torch.save(full.state_dict(), checkpoints / url_name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model's own weights: no warning
        extractor = FeatureExtractor("resnet10t", layers=[-1])
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(deepest_features(extractor, x), full.forward_features(normalised(extractor, x)))
    assert extractor.weights_source == str(checkpoints / url_name)
    assert network.probes == [] and network.downloads == []


def test_hugging_face_cache_loads_without_network(caches, network):
    _, hf = caches
    full = random_resnet10t(seed=2)
    path = put_in_hf_cache(hf, "timm/resnet10t.c3_in1k", "model.safetensors", full.state_dict())
    extractor = FeatureExtractor("resnet10t", layers=["layer3"])
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        expected = full.layer3(full.layer2(full.layer1(full.maxpool(full.act1(full.bn1(full.conv1(normalised(extractor, x))))))))
        got = extractor(x)[0]
    torch.testing.assert_close(got, expected)
    assert Path(extractor.weights_source) == path
    assert network.probes == [] and network.downloads == []


def test_torchvision_file_in_torch_hub_folder_loads_by_position(caches, network):
    """torchvision's MobileNetV2 file (other names, same tensors in order) stands in for
    timm's own mobilenetv2_100 weights, with a warning that names it."""
    checkpoints, _ = caches
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(weights=None).eval()
    path = checkpoints / "mobilenet_v2-b0353104.pth"
    torch.save(tv.state_dict(), path)
    with pytest.warns(UserWarning, match="mobilenet_v2-b0353104.pth"):
        extractor = FeatureExtractor("mobilenetv2_100", layers=[2])
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        expected = tv.features[:7](normalised(extractor, x))  # features.6 ends stage 3 (/8)
    torch.testing.assert_close(extractor(x)[0], expected, rtol=1e-4, atol=1e-5)
    assert extractor.weights_source == str(path)
    assert network.probes == [] and network.downloads == []


def test_torchvision_file_of_another_tag_stands_in_only_for_a_name_without_tag(caches, network):
    checkpoints, _ = caches
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None).eval()
    torch.save(tv.state_dict(), checkpoints / "resnet18-f37072fd.pth")  # resnet18.tv_in1k's URL
    with pytest.warns(UserWarning, match="'resnet18.tv_in1k'"):
        extractor = FeatureExtractor("resnet18", layers=[-1])
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        trunk = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3, tv.layer4)
        torch.testing.assert_close(extractor(x)[0], trunk(normalised(extractor, x)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: exactly these weights, no warning
        FeatureExtractor("resnet18.tv_in1k", layers=[-1])
    with pytest.raises(RuntimeError, match="could not download pretrained weights for backbone 'resnet18.a1_in1k'"):
        FeatureExtractor("resnet18.a1_in1k", layers=[-1])  # another tag named: no stand-in
    assert network.downloads == []


@pytest.mark.parametrize("timm_name", sorted(_hub._TORCHVISION_FILES))
def test_every_listed_torchvision_file_fits_its_timm_model_by_position(timm_name):
    """The files listed for the offline look-up are torchvision's: its builders' state dicts
    (shapes only, on the meta device) map onto the timm models by position."""
    assert timm.models.get_pretrained_cfg(timm_name) is not None
    for file_name in _hub._TORCHVISION_FILES[timm_name]:
        builder = file_name.rsplit("-", 1)[0]
        with torch.device("meta"):
            source = torchvision.models.get_model(builder, weights=None).state_dict()
            target = timm.create_model(timm_name)
        mapped = map_state_dict(source, target)
        assert list(mapped) == list(target.state_dict())


# ------------------------------------------------------------------ no network


def test_without_network_fails_after_one_request_and_names_the_ways_to_pass_weights(caches, network):
    checkpoints, hf = caches
    with pytest.raises(RuntimeError) as caught:
        SemanticStatisticsLoss("resnet10t", pretrained=True)
    message = str(caught.value)
    assert "could not download pretrained weights for backbone 'resnet10t'" in message
    assert "checkpoint='/path/to/file.pth'" in message and "checkpoint='package:NAME'" in message
    assert str(checkpoints) in message and "resnet10t_176_c3-f3215ab1.pth" in message
    assert str(hf) in message and "timm/resnet10t.c3_in1k" in message
    assert len(network.probes) == 1 and network.downloads == []  # no retries, no download
    url, kwargs = network.probes[0]
    assert "timm/resnet10t.c3_in1k" in url and kwargs["timeout"] == _hub.PROBE_TIMEOUT_S <= 10


def test_a_hub_that_answers_lets_timm_download(caches, network, monkeypatch):
    import timm.models._hub as timm_hub

    _, hf = caches
    full = random_resnet10t(seed=3)
    path = put_in_hf_cache(hf / "elsewhere", "timm/resnet10t.c3_in1k", "model.safetensors", full.state_dict())
    network.answer = True
    fetched = []
    monkeypatch.setattr(timm_hub, "hf_hub_download", lambda repo_id, filename, **kw: fetched.append(filename) or path)
    extractor = FeatureExtractor("resnet10t", layers=[-1])
    assert len(network.probes) == 1 and fetched == ["model.safetensors"]
    assert extractor.weights_source == "download of timm/resnet10t.c3_in1k"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deepest_features(extractor, x), full.forward_features(normalised(extractor, x)))


def test_download_blocker_for_a_torch_hub_url(monkeypatch):
    """A URL source (no Hugging Face id) is checked with one HEAD request; a refused
    connection (port 9 on this host) is a blocker, no configured source is none."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    assert isinstance(_hub.download_blocker({"url": "http://127.0.0.1:9/weights.pth"}, timeout=2.0), OSError)
    assert _hub.download_blocker({}) is None


def test_hf_hub_offline_blocks_without_a_request(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    blocker = _hub.download_blocker({"hf_hub_id": "timm/resnet10t.c3_in1k"})
    assert isinstance(blocker, ConnectionError)


# ------------------------------------------------------------------ duplicate layers


@pytest.mark.filterwarnings(RANDOM)
@pytest.mark.parametrize(
    "layers, match",
    [
        ([1, 1], "1 is given twice"),
        (["layer2", "layer2"], "'layer2' is given twice"),
        ([-1, 4], "-1 and 4 are the same layer of 'resnet10t' \\('layer4'\\)"),
        ([3, "layer3"], "3 and 'layer3' are the same layer"),
        (["layer3", "LAST_OF_LAYER3"], "'layer3' and '.*' are the same layer"),
    ],
)
def test_the_same_layer_chosen_twice_is_an_error(layers, match):
    from timm.models import get_graph_node_names

    with torch.device("meta"):
        nodes = get_graph_node_names(timm.create_model("resnet10t"))[1]
    last = [n for n in nodes if n.startswith("layer3.")][-1]
    layers = [last if layer == "LAST_OF_LAYER3" else layer for layer in layers]
    with pytest.raises(ValueError, match=match):
        FeatureExtractor("resnet10t", layers=layers, pretrained=False)


@pytest.mark.filterwarnings(RANDOM)
def test_integer_scalars_choose_layers_like_ints():
    np = pytest.importorskip("numpy")
    extractor = FeatureExtractor("resnet10t", layers=[np.int64(1), torch.tensor(-1)], pretrained=False)
    assert extractor.layers == ["layer1", "layer4"]
    with pytest.raises(TypeError, match="layers must hold ints .* got 1.0"):
        FeatureExtractor("resnet10t", layers=[1.0], pretrained=False)


def test_the_same_map_of_a_user_module_chosen_twice_is_an_error():
    class TwoMaps(nn.Module):
        def forward(self, x):
            return [x.mean(1, keepdim=True), x.amax(1, keepdim=True)]

    with pytest.raises(ValueError, match="'a' is given twice"):
        FeatureExtractor(nn.Identity(), layers=["a", "a"])
    extractor = FeatureExtractor(TwoMaps(), layers=[0, -2])
    with pytest.raises(ValueError, match="0 and -2 are the same layer of 'TwoMaps'"):
        extractor(torch.rand(1, 3, 8, 8))
    assert len(FeatureExtractor(TwoMaps(), layers=[0, -1])(torch.rand(1, 3, 8, 8))) == 2


# ------------------------------------------------------------------ the weights argument


@pytest.mark.parametrize(
    "weights, error, match",
    [
        ("/no/such/checkpoint.pth", FileNotFoundError, "'/no/such/checkpoint.pth' is no such file"),
        ("package:no-such-distribution-d2sm", FileNotFoundError, "no installed distribution"),
        (True, TypeError, "pass pretrained=True"),
        (3, TypeError, "checkpoint must be a checkpoint path, 'package:NAME' or a state dict, got int 3"),
        ({}, ValueError, "state dict is empty"),
        ("FOLDER", FileNotFoundError, "is a folder"),
    ],
)
def test_bad_weights_fail_before_any_model_is_built(weights, error, match, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the weights argument was checked")

    monkeypatch.setattr(timm, "create_model", no_model)
    weights = str(tmp_path) if weights == "FOLDER" else weights
    with pytest.raises(error, match=match):
        FeatureExtractor("resnet10t", checkpoint=weights)


def test_weights_load_into_a_user_module(tmp_path):
    torch.manual_seed(0)
    net, trained = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    torch.save(trained.state_dict(), tmp_path / "conv.pth")
    extractor = FeatureExtractor(net, checkpoint=tmp_path / "conv.pth")
    torch.testing.assert_close(extractor.model.weight, trained.weight)  # loaded into the extractor's copy
    assert extractor.weights_source == str(tmp_path / "conv.pth")


# ------------------------------------------------------------------ no patching


def test_a_broken_torchvision_is_reported_not_patched(tmp_path):
    """The package imports without torchvision, and building a backbone with a torchvision
    whose compiled operators do not load raises torchvision's own error: no operator schema is
    declared in its place."""
    code = (
        "import importlib.abc, sys, torch\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torchvision':\n"
        "            raise RuntimeError('operator torchvision::nms does not exist')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import d2sm_loss\n"
        "assert 'torchvision' not in sys.modules and 'timm' not in sys.modules\n"
        "try:\n"
        "    d2sm_loss.FeatureExtractor('resnet10t', pretrained=False)\n"
        "except RuntimeError as error:\n"
        "    print('ERROR', error)\n"
        "try:\n"
        "    torch.ops.torchvision.nms\n"
        "    print('DECLARED')\n"
        "except (AttributeError, RuntimeError):\n"
        "    print('NOT DECLARED')\n"
    )
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], env=subprocess_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert "ERROR operator torchvision::nms does not exist" in out.stdout, out.stderr
    assert "NOT DECLARED" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mean": (0.5, float("nan"), 0.5)}, ValueError, r"mean\[1\] must be a finite number"),
        ({"std": (1.0, 0.0, 1.0)}, ValueError, r"std\[1\] must be positive"),
        ({"std": (1.0, 1.0)}, ValueError, "std must have 3 values"),
        ({"pretrained": "yes"}, TypeError, "pretrained must be a bool"),
    ],
)
def test_feature_extractor_checks_its_options_as_the_loss_does(kwargs, error, match):
    with pytest.raises(error, match=match):
        FeatureExtractor(nn.Conv2d(3, 4, 3), **kwargs)
