"""Images for the experiments: built-in photographs or folders, training crops, test crops.

Built-in data (nothing is downloaded): photographs shipped by scikit-image, scikit-learn and
matplotlib, split by image into fixed lists. Grayscale photographs are replicated to three
channels and used for training only; the test set is five colour photographs.

* train: hubble_deep_field, retina, stereo_motorcycle (left view), immunohistochemistry,
  china (scikit-learn), grace_hopper (matplotlib), and the grayscale camera, brick, grass,
  gravel, coins, clock, moon, page, text.
* test: astronaut, chelsea, coffee, rocket, flower (scikit-learn).

Images are float32 tensors (3, H, W) in [0, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
BUILTIN_TRAIN = (
    "hubble_deep_field", "retina", "stereo_motorcycle", "immunohistochemistry", "china",
    "grace_hopper", "camera", "brick", "grass", "gravel", "coins", "clock", "moon", "page", "text",
)
BUILTIN_TEST = ("astronaut", "chelsea", "coffee", "rocket", "flower")


@dataclasses.dataclass
class Sample:
    name: str
    clean: Tensor  # (3, H, W) in [0, 1]
    degraded: Tensor | None = None  # real paired degraded image, (3, H / scale, W / scale)


def to_tensor(image: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def to_numpy(image: Tensor) -> np.ndarray:
    """(3, H, W) -> float64 (H, W, 3), clipped to [0, 1]."""
    return image.detach().clamp(0, 1).permute(1, 2, 0).double().cpu().numpy()


def builtin_image(name: str) -> np.ndarray:
    """One built-in photograph as uint8 (H, W, 3)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib.cbook
        from PIL import Image

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
            image = np.asarray(im.convert("RGB"))
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
    if image.ndim == 2:  # grayscale: replicate to RGB
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def list_images(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def match_degraded(clean: Path, degraded: Sequence[Path]) -> Path:
    """The degraded file paired with ``clean``: same stem, or the stem followed by a non-digit
    (``0001.png`` <- ``0001x4.png`` in DIV2K, ``0001_0.8_0.2.jpg`` in RESIDE)."""
    stem = clean.stem
    for path in degraded:
        other = path.stem
        if other == stem or (other.startswith(stem) and not other[len(stem)].isdigit()):
            return path
    raise FileNotFoundError(f"no degraded image pairs with {clean.name}")


def load_folder(folder: str | Path, degraded_folder: str | Path | None = None) -> list[Sample]:
    """Every image of ``folder``, with its paired degraded image when ``degraded_folder`` is given."""
    pairs = list_images(degraded_folder) if degraded_folder else None
    samples = []
    for path in list_images(folder):
        degraded = to_tensor(read_image(match_degraded(path, pairs))) if pairs else None
        samples.append(Sample(path.stem, to_tensor(read_image(path)), degraded))
    return samples


def load_images(
    data: str | None = None,
    degraded: str | None = None,
    test_data: str | None = None,
    test_degraded: str | None = None,
    scale: int = 1,
) -> tuple[list[Sample], list[Sample]]:
    """Train and test samples: the built-in photographs (``data=None``), or folders of images;
    without ``test_data`` the last 10 % of the sorted ``data`` files are held out."""
    if data is None:
        if degraded or test_data or test_degraded:
            raise ValueError("--degraded/--test-data/--test-degraded need --data")
        train = [Sample(n, to_tensor(builtin_image(n))) for n in BUILTIN_TRAIN]
        test = [Sample(n, to_tensor(builtin_image(n))) for n in BUILTIN_TEST]
        return train, test
    train = load_folder(data, degraded)
    if test_data is not None:
        test = load_folder(test_data, test_degraded)
    else:
        if test_degraded:
            raise ValueError("--test-degraded needs --test-data")
        if len(train) < 2:
            raise ValueError(f"--data {data} needs at least 2 images when --test-data is not given")
        n_test = max(1, len(train) // 10)
        train, test = train[:-n_test], train[-n_test:]
    for sample in train + test:
        if sample.degraded is not None:
            h, w = sample.clean.shape[-2:]
            if sample.degraded.shape[-2:] != (h // scale, w // scale):
                raise ValueError(
                    f"{sample.name}: degraded image is {tuple(sample.degraded.shape[-2:])}, expected "
                    f"{(h // scale, w // scale)} (clean {(h, w)} / scale {scale})"
                )
    return train, test


def sample_batch(
    images: Sequence[Sample], batch_size: int, crop: int, scale: int, generator: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """Random ``crop`` x ``crop`` clean patches (and their paired degraded patches, if any) with
    random horizontal and vertical flips. ``crop`` must be a multiple of ``scale``."""
    lr_crop = crop // scale
    clean, degraded = [], []
    for _ in range(batch_size):
        sample = images[int(torch.randint(len(images), (1,), generator=generator))]
        h, w = sample.clean.shape[-2:]
        if min(h, w) < crop:
            raise ValueError(f"image {sample.name} ({h}x{w}) is smaller than --crop {crop}")
        # the corner on the low-resolution grid, so that paired SR patches stay aligned
        y = int(torch.randint(h // scale - lr_crop + 1, (1,), generator=generator)) * scale
        x = int(torch.randint(w // scale - lr_crop + 1, (1,), generator=generator)) * scale
        flip_h, flip_v = (torch.rand(2, generator=generator) < 0.5).tolist()
        flips = [d for d, f in ((-1, flip_h), (-2, flip_v)) if f]
        patch = sample.clean[:, y : y + crop, x : x + crop]
        clean.append(patch.flip(flips) if flips else patch)
        if sample.degraded is not None:
            patch = sample.degraded[:, y // scale : y // scale + lr_crop, x // scale : x // scale + lr_crop]
            degraded.append(patch.flip(flips) if flips else patch)
    return torch.stack(clean), (torch.stack(degraded) if degraded else None)


def center_crop(sample: Sample, size: int, scale: int = 1) -> Sample:
    """Center crop to at most ``size`` x ``size`` pixels, with sides multiples of ``scale``."""
    h, w = sample.clean.shape[-2:]
    ch, cw = (min(h, size) // scale) * scale, (min(w, size) // scale) * scale
    y, x = ((h - ch) // 2 // scale) * scale, ((w - cw) // 2 // scale) * scale
    clean = sample.clean[:, y : y + ch, x : x + cw]
    degraded = None
    if sample.degraded is not None:
        degraded = sample.degraded[:, y // scale : (y + ch) // scale, x // scale : (x + cw) // scale]
    return Sample(sample.name, clean.contiguous(), degraded)


def random_crops(samples: Sequence[Sample], per_image: int, size: int, generator: torch.Generator) -> list[Sample]:
    """``per_image`` crops of ``size`` x ``size`` pixels at random positions of each clean image
    (no flips), named ``<image>_<k>``: many test inputs from few photographs."""
    crops = []
    for sample in samples:
        h, w = sample.clean.shape[-2:]
        if min(h, w) < size:
            raise ValueError(f"image {sample.name} ({h}x{w}) is smaller than the test crop {size}")
        for k in range(per_image):
            y = int(torch.randint(h - size + 1, (1,), generator=generator))
            x = int(torch.randint(w - size + 1, (1,), generator=generator))
            crops.append(Sample(f"{sample.name}_{k}", sample.clean[:, y : y + size, x : x + size].contiguous()))
    return crops
