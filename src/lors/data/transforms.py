"""Detection transforms on `(image, target)` pairs: flip, resize, to-tensor, normalise.

Each transform takes a PIL image or a (3, H, W) tensor and a target dict whose `boxes` are
absolute xyxy pixels (see `lors.data.coco`), and returns both, with the boxes moved to match.

The paper's 1x schedule (AdaMixer, as mmdetection): shorter side 800, longer side at most
1333, horizontal flip with p=0.5; `make_coco_transforms` builds it.

Randomness: a random transform draws from its `generator` when one is given, else from torch's
global generator. In DataLoader workers prefer the global one: the DataLoader seeds it per
worker (from `torch.manual_seed` or the loader's own `generator`), whereas a generator passed
here is copied into every worker with the same state, so all workers draw the same numbers.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

Target = dict[str, Any]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB. 16-bit grey (modes "I;16", "I;16B", ... and "I", the mode PIL gives
    16-bit PNGs in some versions) is scaled by 255/65535 = 1/257; PIL's own `convert("RGB")` clips
    it at 255, which turns a 16-bit image white. PIL already reads 16-bit RGB(A) PNGs as 8-bit."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        grey = np.asarray(img).astype(np.float32) / 257.0  # (H, W), 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def image_size(img: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(h, w) of a PIL image or a (..., H, W) tensor."""
    if isinstance(img, Image.Image):
        return img.height, img.width
    return int(img.shape[-2]), int(img.shape[-1])


def resized_size(h: int, w: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side `min_size`, shrunk so the longer side is <= `max_size`.

    The scale is min(min_size / short, max_size / long), applied to both sides and rounded,
    as mmdetection's keep-ratio resize does (1333x800 for a 4:3 image at 800/1333).
    """
    scale = min_size / min(h, w)
    if max_size is not None:
        scale = min(scale, max_size / max(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


class Compose:
    """Apply transforms in order: `Compose([a, b])(img, target) == b(*a(img, target))`."""

    def __init__(self, transforms: Sequence[Callable[[Any, Target], tuple[Any, Target]]]):
        self.transforms = list(transforms)

    def __call__(self, img: Any, target: Target) -> tuple[Any, Target]:
        for t in self.transforms:
            img, target = t(img, target)
        return img, target


class RandomHorizontalFlip:
    """Mirror the image left-right with probability `p`; box x-coordinates become W - x.

    Args:
        p: probability of flipping.
        generator: optional torch.Generator for the coin flip (see the module docstring).
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip p must be in [0, 1], got {p}")
        self.p = p
        self.generator = generator

    def __call__(self, img: Any, target: Target) -> tuple[Any, Target]:
        if torch.rand((), generator=self.generator).item() >= self.p:
            return img, target
        _, w = image_size(img)
        target = dict(target)
        boxes = target["boxes"]  # (n, 4) xyxy
        target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return TF.hflip(img), target


class RandomResize:
    """Resize keeping the aspect ratio: shorter side drawn from `min_sizes`, longer side <= `max_size`.

    Boxes are scaled by the actual (new_w / w, new_h / h) and `target["size"]` is set to (new_h, new_w).

    Args:
        min_sizes: candidate shorter sides; one is drawn uniformly per call (a single value: fixed).
        max_size: cap on the longer side, or None for no cap.
        generator: optional torch.Generator for the draw (see the module docstring).
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int | None = 1333, generator: torch.Generator | None = None):
        self.min_sizes = [int(s) for s in min_sizes]
        if not self.min_sizes or min(self.min_sizes) < 1:
            raise ValueError(f"RandomResize min_sizes must be a non-empty list of positive ints, got {min_sizes}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"RandomResize max_size must be positive or None, got {max_size}")
        self.max_size = max_size
        self.generator = generator

    def __call__(self, img: Any, target: Target) -> tuple[Any, Target]:
        if len(self.min_sizes) == 1:
            min_size = self.min_sizes[0]
        else:
            min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), (), generator=self.generator))]
        h, w = image_size(img)
        new_h, new_w = resized_size(h, w, min_size, self.max_size)
        img = TF.resize(img, [new_h, new_w], antialias=True)
        target = dict(target)
        scale = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=torch.float32)
        target["boxes"] = target["boxes"] * scale
        target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
        return img, target


class ToTensor:
    """PIL image (any mode, see `to_rgb`) -> float tensor (3, H, W) in [0, 1]; tensors pass through."""

    def __call__(self, img: Any, target: Target) -> tuple[torch.Tensor, Target]:
        if isinstance(img, Image.Image):
            img = TF.pil_to_tensor(to_rgb(img)).float().div_(255)
        return img, target


class Normalize:
    """(img - mean) / std per channel on a float (3, H, W) tensor; boxes stay in pixels."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, img: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if not isinstance(img, torch.Tensor):
            raise ValueError("Normalize needs a tensor image: put ToTensor() before it")
        return TF.normalize(img, self.mean, self.std), target


def make_coco_transforms(
    train: bool,
    min_sizes: Sequence[int] = (800,),
    max_size: int | None = 1333,
    flip_prob: float = 0.5,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> Compose:
    """The 1x transforms: [flip (train only)], resize, to-tensor, [normalise with ImageNet mean/std].

    Args:
        train: add the random horizontal flip and draw the shorter side from `min_sizes`;
            for evaluation the shorter side is `max(min_sizes)` and nothing is random.
        min_sizes: shorter side(s); several values give multi-scale training.
        max_size: cap on the longer side.
        flip_prob: flip probability in training.
        normalize: subtract the ImageNet mean and divide by its std.
        generator: optional torch.Generator shared by the random transforms.
    """
    if train:
        ts: list = [RandomHorizontalFlip(flip_prob, generator), RandomResize(min_sizes, max_size, generator)]
    else:
        ts = [RandomResize([max(min_sizes)], max_size)]
    ts.append(ToTensor())
    if normalize:
        ts.append(Normalize())
    return Compose(ts)
