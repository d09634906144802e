"""The D2SM loss in PyTorch Lightning, configured with LightningCLI.

A DnCNN-style denoiser trained with ``L1 + d2sm_weight * criterion`` where ``criterion`` comes from the
config through ``class_path: d2sm_loss.SemanticStatisticsLoss`` (see
``examples/configs/lightning.yaml``); the loss is called in ``training_step`` and in
``validation_step``. Runs on the CPU, also as two DDP processes (gloo)::

    python examples/lightning_training.py fit --config examples/configs/lightning.yaml
    python examples/lightning_training.py fit --config examples/configs/lightning.yaml \\
        --trainer.devices 2 --trainer.strategy ddp --model.validate_on rank_zero
    python examples/lightning_training.py fit --config examples/configs/lightning.yaml \\
        --trainer.max_steps 12 --ckpt_path runs/lightning/checkpoints/last.ckpt          # resume

What the loss does here:

- training steps gather the feature rows of all ranks (the statistic is over the global batch)
  and update the memory queue, identical on every rank;
- validation calls (Lightning runs them in eval mode without gradients) compute the statistic
  over their own batch only, never touch the queue and never communicate: validation may run
  on every rank (``validate_on: every_rank``, each on its shard) or on rank 0 alone
  (``validate_on: rank_zero``), and at another image size than training;
- the queue is in the loss's ``state_dict`` when it is built with ``save_queue=True``, so
  Lightning's checkpoint keeps it and a resume starts with it full; without it the queue
  refills in ``ceil(queue_size / global batch)`` steps. Rank 0 prints the queue's fill when
  training starts.

Data: noisy/clean crops of photographs that install with scikit-image, the noise drawn once (seed 0).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import skimage.data
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from d2sm_loss import SemanticStatisticsLoss


def random_crops(images: list, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size`` x ``size`` crops of the (3, H, W) images."""
    crops = []
    for _ in range(count):
        image = images[torch.randint(len(images), (1,), generator=generator).item()]
        top, left = (torch.randint(n - size + 1, (1,), generator=generator).item() for n in image.shape[1:])
        crops.append(image[:, top : top + size, left : left + size])
    return torch.stack(crops)


def photos(*names: str) -> list:
    """Colour photographs of ``skimage.data`` as (3, H, W) tensors in [0, 1]."""
    return [torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255 for name in names]


class Denoiser(nn.Module):
    """A DnCNN-style network (Zhang et al. 2017): it predicts the noise, which is subtracted."""

    def __init__(self, depth: int = 5, width: int = 16) -> None:
        super().__init__()
        layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return noisy - self.body(noisy)


class Restorer(L.LightningModule):
    """A restoration network trained with L1 + ``d2sm_weight`` x the D2SM loss."""

    def __init__(
        self,
        net: nn.Module,
        criterion: SemanticStatisticsLoss,
        d2sm_weight: float = 0.1,
        lr: float = 1e-3,
        validate_on: Literal["every_rank", "rank_zero"] = "every_rank",
    ) -> None:
        super().__init__()
        self.net, self.criterion = net, criterion
        self.d2sm_weight, self.lr, self.validate_on = d2sm_weight, lr, validate_on

    def training_step(self, batch, batch_idx):
        noisy, clean = batch
        restored = self.net(noisy)
        l1 = F.l1_loss(restored, clean)
        d2sm = self.criterion(restored, clean)
        self.log_dict({"train/l1": l1, "train/d2sm": d2sm}, prog_bar=True)
        return l1 + self.d2sm_weight * d2sm

    def validation_step(self, batch, batch_idx):
        if self.validate_on == "rank_zero" and self.global_rank != 0:
            return
        noisy, clean = batch
        restored = self.net(noisy)
        d2sm = self.criterion(restored, clean)  # this batch only: no queue, no communication
        psnr = -10 * torch.log10(F.mse_loss(restored.clamp(0, 1), clean))
        every_rank = self.validate_on == "every_rank"
        self.log_dict({"val/d2sm": d2sm, "val/psnr": psnr}, sync_dist=every_rank, rank_zero_only=not every_rank)

    def on_validation_epoch_end(self) -> None:
        metrics = self.trainer.callback_metrics
        if self.global_rank == 0 and "val/d2sm" in metrics:
            print(f"validation at step {self.global_step}: d2sm {float(metrics['val/d2sm']):.4e}  "
                  f"psnr {float(metrics['val/psnr']):.2f} dB ({self.validate_on})", flush=True)

    def on_train_start(self) -> None:
        if self.global_rank == 0 and self.criterion.queues is not None:
            rows = self.criterion.queues[0].count
            print(f"D2SM memory queue: {rows} of {self.criterion.queue_size} rows at step {self.global_step}", flush=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)


class NoisyCrops(L.LightningDataModule):
    """Crops of scikit-image's photographs with Gaussian noise: training crops of ``crop`` pixels,
    validation crops of ``val_crop`` pixels (another size: validation calls keep no queue)."""

    def __init__(self, crop: int = 48, val_crop: int = 64, pool: int = 48, val_pool: int = 4,
                 batch_size: int = 4, sigma: float = 25.0) -> None:
        super().__init__()
        self.crop, self.val_crop, self.pool, self.val_pool = crop, val_crop, pool, val_pool
        self.batch_size, self.sigma = batch_size, sigma

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        self.train_set = self._pairs(photos("astronaut", "coffee", "rocket"), self.pool, self.crop, generator)
        self.val_set = self._pairs(photos("chelsea"), self.val_pool, self.val_crop, generator)  # held out

    def _pairs(self, images, count: int, crop: int, generator: torch.Generator) -> TensorDataset:
        clean = random_crops(images, count, crop, generator)
        return TensorDataset(clean + self.sigma / 255 * torch.randn(clean.shape, generator=generator), clean)

    def _sampler(self, dataset, shuffle: bool):
        # Trainer(use_distributed_sampler=False): the samplers are chosen here, so that rank-0-only
        # validation sees the whole validation set.
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world == 1 or (not shuffle and self.trainer.lightning_module.validate_on == "rank_zero"):
            return None
        return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=0)

    def train_dataloader(self):
        sampler = self._sampler(self.train_set, shuffle=True)
        return DataLoader(self.train_set, self.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, self.batch_size, sampler=self._sampler(self.val_set, shuffle=False))


def main(args=None) -> LightningCLI:
    return LightningCLI(Restorer, NoisyCrops, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
