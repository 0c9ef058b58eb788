"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (MIT licence): 60,000 train and
10,000 test images of 28 x 28 grey clothes in 10 classes, read from the package's idx files
(/usr/share/datasets/fashion-mnist); nothing is downloaded.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


REINSTALL = "reinstall dataset-fashion-mnist (apt-get install --reinstall dataset-fashion-mnist) or fix data.root"


def _idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, OSError) as err:  # not gzip, or cut short
        raise ValueError(f"{path} is not a readable gzip file ({err}): {REINSTALL}") from None
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path} is not an idx file (magic {found:#x}, expected {magic:#x}): {REINSTALL}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    expected = 4 + 4 * len(dims) + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path} holds {len(data):,} bytes where its header promises {expected:,} "
                         f"({' x '.join(map(str, dims))}): the file is truncated or damaged; {REINSTALL}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def load_fashion_mnist(split: str, root: str | Path = FASHION_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of ``split`` ("train" or "test")."""
    root = Path(root)
    images, labels = (root / name for name in FILES[split])
    if not images.is_file() or not labels.is_file():
        raise ValueError(f"Fashion-MNIST not found in {root}: install the Debian package with "
                         "`apt-get install dataset-fashion-mnist`, or set data.root to a folder holding "
                         f"{FILES[split][0]} and {FILES[split][1]}")
    x, y = _idx(images, 0x803), _idx(labels, 0x801)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))
