"""The BasicSR adapter: its conventions, its registration, and BasicSR's own training pipeline.

The pipeline test trains a tiny MSRResNet for a few iterations on the CPU through the package's
entry point (``python -m d2sm_loss.integrations.basicsr``) with pixel + perceptual + style + D2SM
from one ``perceptual_opt`` entry (``PerceptualD2SMLoss``, VGG19 with seeded random weights at
BasicSR's own path), validates, and resumes (``--auto_resume``, which BasicSR 1.4.2 alone cannot
do without CUDA) with the memory queue restored by ``D2SMSRModel``. The perceptual and style
terms are compared with BasicSR's own ``PerceptualLoss`` on the same weights.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2sm_loss import SemanticStatisticsLoss
from d2sm_loss.integrations.basicsr_losses import VGG19_LAYER_NAMES, D2SMLoss, D2SMPerceptualLoss, PerceptualD2SMLoss

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(backbone="mobilenetv2_100", pretrained=False)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _images(seed: int = 0, batch: int = 3, size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(batch, 3, size, size, generator=generator)
    restored = (clean + 0.1 * torch.randn(batch, 3, size, size, generator=generator)).clamp(0, 1)
    return restored.requires_grad_(), clean


# -- the classes, without BasicSR ------------------------------------------------------


def test_pixel_slot_applies_loss_weight():
    torch.manual_seed(0)
    plain = SemanticStatisticsLoss(**TINY)
    weighted = D2SMLoss(loss_weight=0.25, **TINY)
    weighted.backbone.load_state_dict(plain.backbone.state_dict())
    restored, clean = _images()
    expected = plain(restored, clean)
    value = weighted(restored, clean)
    assert value.dim() == 0 and expected.item() > 0
    torch.testing.assert_close(value, 0.25 * expected)
    with pytest.raises(ValueError, match="weight: D2SM compares images"):
        weighted(restored, clean, weight=torch.ones_like(clean))


def test_perceptual_slot_returns_percep_style_pair():
    torch.manual_seed(0)
    plain = SemanticStatisticsLoss(**TINY)
    loss = D2SMPerceptualLoss(perceptual_weight=2.0, style_weight=0, **TINY)
    loss.backbone.load_state_dict(plain.backbone.state_dict())
    restored, clean = _images()
    percep, style = loss(restored, clean)
    assert style is None
    torch.testing.assert_close(percep, 2.0 * plain(restored, clean))
    percep.backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0
    assert D2SMPerceptualLoss(perceptual_weight=0, **TINY)(restored, clean) == (None, None)


def test_weights_are_checked():
    with pytest.raises(ValueError, match="style_weight: D2SM has no style term"):
        D2SMPerceptualLoss(style_weight=1.0, **TINY)
    with pytest.raises(TypeError, match="perceptual_weight must be a number"):
        D2SMPerceptualLoss(perceptual_weight="1", **TINY)
    with pytest.raises(TypeError, match="loss_weight must be a number"):
        D2SMLoss(loss_weight=None, **TINY)


def test_vgg19_layer_names_are_basicsr_names_of_the_same_modules():
    timm = pytest.importorskip("timm")
    features = timm.create_model("vgg19", pretrained=False).features
    modules = dict(features.named_children())
    kinds = {"conv": torch.nn.Conv2d, "relu": torch.nn.ReLU, "pool": torch.nn.MaxPool2d}
    assert len(VGG19_LAYER_NAMES) == len(modules) == 37
    for name, module_name in VGG19_LAYER_NAMES.items():
        assert isinstance(modules[module_name.split(".")[1]], kinds[name[:4]]), name
    assert VGG19_LAYER_NAMES["conv5_4"] == "features.34"  # the paper's layer


def test_layer_weights_mapping_names_layers():
    loss = D2SMLoss(backbone="vgg19", pretrained=False, layer_weights={"conv4_4": 0.5, "conv5_4": 1.0})
    assert loss.layers == ["features.25", "features.34"] and loss.layer_weights == [0.5, 1.0]
    other = D2SMLoss(layer_weights={2: 1.0}, **TINY)  # timm feature indices for other backbones
    assert other.layer_weights == [1.0] and len(other.layers) == 1
    with pytest.raises(ValueError, match="layers and a layer_weights mapping"):
        D2SMLoss(layers=[1], layer_weights={2: 1.0}, **TINY)


# -- the import and its errors (subprocesses: a fresh module cache) ----------------------


def _import_adapter(tmp_path: Path, prelude: str = "", extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = _env()
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, env["PYTHONPATH"]])
    code = prelude + "\nimport d2sm_loss.integrations.basicsr\n"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_missing_basicsr_names_basicsr_fixed(tmp_path):
    done = _import_adapter(tmp_path, "import sys; sys.modules['basicsr'] = None")
    assert done.returncode != 0
    assert "ImportError: d2sm_loss.integrations.basicsr needs BasicSR: pip install basicsr-fixed" in done.stderr


def test_broken_basicsr_names_basicsr_fixed(tmp_path):
    # BasicSR 1.4.2 as published: its import of a module torchvision 0.17 removed fails.
    fake = tmp_path / "fake"
    (fake / "basicsr").mkdir(parents=True)
    (fake / "basicsr" / "__init__.py").write_text("import torchvision.transforms.functional_tensor\n")
    done = _import_adapter(tmp_path, extra_path=str(fake))
    assert done.returncode != 0
    assert "BasicSR is installed but `import basicsr` fails" in done.stderr
    assert "pip uninstall basicsr && pip install basicsr-fixed" in done.stderr


# -- in BasicSR -----------------------------------------------------------------------


def test_registered_in_basicsr_registries():
    pytest.importorskip("basicsr", exc_type=ImportError)
    from basicsr.losses import build_loss
    from basicsr.utils.registry import LOSS_REGISTRY, MODEL_REGISTRY

    import d2sm_loss.integrations.basicsr as adapter

    assert LOSS_REGISTRY.get("D2SMLoss") is D2SMLoss
    assert LOSS_REGISTRY.get("D2SMPerceptualLoss") is D2SMPerceptualLoss
    assert LOSS_REGISTRY.get("PerceptualD2SMLoss") is PerceptualD2SMLoss
    assert MODEL_REGISTRY.get("D2SMSRModel") is adapter.D2SMSRModel
    adapter.register()  # a second registration does nothing
    loss = build_loss({"type": "D2SMLoss", "loss_weight": 0.5, **TINY})
    assert isinstance(loss, D2SMLoss) and loss.loss_weight == 0.5


def _basicsr_vgg19_file(folder: Path) -> Path:
    """A seeded random torchvision VGG19 at BasicSR's path (``experiments/pretrained_models``
    under ``folder``), which BasicSR's VGGFeatureExtractor and PerceptualD2SMLoss both read."""
    torchvision = pytest.importorskip("torchvision")
    path = folder / "experiments" / "pretrained_models" / "vgg19-dcbb9e9d.pth"
    if not path.exists():
        path.parent.mkdir(parents=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.vgg19().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def vgg_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("basicsr_vgg")
    _basicsr_vgg19_file(folder)
    return folder


def test_perceptual_and_style_equal_basicsr_perceptual_loss(vgg_folder, monkeypatch):
    pytest.importorskip("basicsr", exc_type=ImportError)
    from basicsr.losses.basic_loss import PerceptualLoss

    monkeypatch.chdir(vgg_folder)  # both read experiments/pretrained_models/vgg19-dcbb9e9d.pth
    layer_weights = {"conv1_2": 0.1, "relu2_2": 0.5, "conv5_4": 1.0}
    theirs = PerceptualLoss(layer_weights, perceptual_weight=0.8, style_weight=30.0, range_norm=True)
    ours = PerceptualD2SMLoss(layer_weights, perceptual_weight=0.8, style_weight=30.0, range_norm=True, d2sm_weight=0)
    assert ours.layers == ["features.2", "features.8", "features.34"] and ours.d2sm is None
    restored, clean = _images(size=37)
    restored, clean = restored.detach() * 2 - 1, clean * 2 - 1  # range_norm: images in [-1, 1]
    for criterion in ("l1", "l2", "fro"):  # the same modules, criterion switched as the constructors do
        theirs.criterion_type = criterion
        theirs.criterion = {"l1": torch.nn.L1Loss(), "l2": torch.nn.MSELoss(), "fro": None}[criterion]
        ours.criterion = criterion
        x_theirs, x_ours = restored.clone().requires_grad_(), restored.clone().requires_grad_()
        expected = theirs(x_theirs, clean)
        value = ours(x_ours, clean)
        for mine, reference in zip(value, expected):
            torch.testing.assert_close(mine, reference, rtol=2e-5, atol=1e-7)
        sum(expected).backward()
        sum(value).backward()
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-8)


def test_perceptual_slot_with_d2sm_adds_it_to_percep(vgg_folder, monkeypatch):
    monkeypatch.chdir(vgg_folder)
    loss = PerceptualD2SMLoss({"conv3_4": 1.0}, d2sm_weight=0.5, style_weight=2.0, queue_size=6)
    assert loss.weights_source == os.path.join("experiments", "pretrained_models", "vgg19-dcbb9e9d.pth")
    assert loss.layers == ["features.16", "features.34"]  # perceptual/style at conv3_4, D2SM at conv5_4
    restored, clean = _images(size=37)
    percep, style = loss(restored, clean)
    terms = loss.last_terms
    assert set(terms) == {"perceptual", "style", "d2sm"} and terms["d2sm"] > 0
    torch.testing.assert_close(percep.detach(), terms["perceptual"] + terms["d2sm"])
    torch.testing.assert_close(style.detach(), terms["style"])
    only = PerceptualD2SMLoss({"conv3_4": 1.0}, perceptual_weight=0, d2sm_weight=0.5)
    percep, style = only(restored, clean)
    assert style is None and torch.equal(percep.detach(), only.last_terms["d2sm"])
    with pytest.raises(ValueError, match="criterion must be one of"):
        PerceptualD2SMLoss({"conv3_4": 1.0}, criterion="mse", d2sm_weight=0.1)
    with pytest.raises(TypeError, match="d2sm_weight"):
        PerceptualD2SMLoss({"conv3_4": 1.0})


OPTIONS = """
name: d2sm_tiny
model_type: D2SMSRModel
scale: 2
num_gpu: 0
manual_seed: 0
datasets:
  train:
    name: tiny
    type: PairedImageDataset
    dataroot_gt: data/train/gt
    dataroot_lq: data/train/lq
    filename_tmpl: '{}'
    io_backend: {type: disk}
    gt_size: 48
    use_hflip: true
    use_rot: true
    num_worker_per_gpu: 0
    batch_size_per_gpu: 3
    dataset_enlarge_ratio: 10
    prefetch_mode: ~
  val:
    name: tiny_val
    type: PairedImageDataset
    dataroot_gt: data/val/gt
    dataroot_lq: data/val/lq
    io_backend: {type: disk}
network_g: {type: MSRResNet, num_in_ch: 3, num_out_ch: 3, num_feat: 8, num_block: 1, upscale: 2}
path: {pretrain_network_g: ~, strict_load_g: true, resume_state: ~}
train:
  optim_g: {type: Adam, lr: 1.0e-3}
  scheduler: {type: MultiStepLR, milestones: [100], gamma: 0.5}
  total_iter: 4
  warmup_iter: -1
  pixel_opt: {type: L1Loss, loss_weight: 1.0, reduction: mean}
  perceptual_opt:
    type: PerceptualD2SMLoss
    layer_weights: {conv3_4: 1.0, conv5_4: 1.0}
    perceptual_weight: 1.0
    style_weight: 10.0
    d2sm_weight: 0.1
    queue_size: 12
    save_queue: true
val:
  val_freq: 2
  save_img: false
  metrics:
    psnr: {type: calculate_psnr, crop_border: 2, test_y_channel: false}
logger: {print_freq: 1, save_checkpoint_freq: 2, use_tb_logger: false, wandb: {project: ~}}
dist_params: {backend: gloo, port: 29500}
"""


def _write_pairs(folder: Path, count: int, size: int, seed: int) -> None:
    cv2 = pytest.importorskip("cv2")
    (folder / "gt").mkdir(parents=True)
    (folder / "lq").mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        # smooth random images (upsampled noise), so that the features differ between images
        coarse = torch.rand(1, 3, 6, 6, generator=generator)
        gt = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        gt = (gt.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        lq = cv2.resize(gt, (size // 2, size // 2), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / "gt" / f"{index:03d}.png"), gt)
        cv2.imwrite(str(folder / "lq" / f"{index:03d}.png"), lq)


def _train(tmp_path: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "d2sm_loss.integrations.basicsr", "-opt", "options.yml", *args],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout + done.stderr


def test_basicsr_train_pipeline_validates_and_resumes_with_the_queue(tmp_path):
    pytest.importorskip("basicsr", exc_type=ImportError)
    _write_pairs(tmp_path / "data" / "train", 6, 64, seed=0)
    _write_pairs(tmp_path / "data" / "val", 2, 56, seed=1)
    (tmp_path / "options.yml").write_text(OPTIONS)
    _basicsr_vgg19_file(tmp_path)

    first = _train(tmp_path)
    # four iterations, each logging the pixel, perceptual (with D2SM), style and D2SM terms;
    # validation at iterations 2 and 4 and at the end
    for term in ("l_pix", "l_percep", "l_style", "l_d2sm"):
        values = [float(v) for v in re.findall(rf"{term}: ([-+\d.e]+)", first)]
        assert len(values) == 4 and all(v > 0 for v in values), (term, first[-3000:])
    assert len(re.findall(r"# psnr: [\d.]+", first)) == 3
    states = tmp_path / "experiments" / "d2sm_tiny" / "training_states"
    saved = torch.load(states / "4.d2sm.pth", weights_only=True)
    queue = saved["cri_perceptual"]["d2sm.queues.0.restored"]
    assert queue.shape[0] == 12  # 4 iterations x 3 images fill the 12 rows

    second = _train(tmp_path, "--auto_resume", "--force_yml", "train:total_iter=6")
    assert "Resuming training from epoch: 0, iter: 4." in second
    assert "D2SM loss state of cri_perceptual restored from" in second and "(memory queue: 12 rows)" in second
    assert re.search(r"iter:\s+5,", second) and re.search(r"iter:\s+6,", second)
    assert not re.search(r"iter:\s+[1-4],", second)
    resumed = torch.load(states / "6.d2sm.pth", weights_only=True)["cri_perceptual"]["d2sm.queues.0.restored"]
    assert resumed.shape == queue.shape and not torch.equal(resumed, queue)  # it kept training
