"""COCO-format detection data: a json + an image folder, read with pycocotools.

Each item is `(image, target)` as in torchvision's detection references:

    image   float tensor (3, H, W) in [0, 1] (or normalised, if the transforms normalise)
    target  dict with
        boxes     float32 (n, 4), absolute xyxy pixels of the (transformed) image
        labels    int64 (n,), contiguous 0..C-1 (`label_to_cat_id[label]` is the COCO category id)
        image_id  int, the COCO image id
        orig_size int64 (2,), (h, w) of the image file
        size      int64 (2,), (h, w) after the transforms

Validation is early. The constructor checks the json (readable, keys present, ids unique, every
annotation's image and category known, boxes of 4 numbers). Image files are checked when an item
is loaded, or all at once, before any training, with `verify_files=True` (`check_files()` and
`check_image_sizes()`). Every problem raises a ValueError naming the file or id and the fix; a bad
image file raises `ImageFileError`, which keeps its one line when a DataLoader worker raises it.

Images are read by `load_rgb` (also used by `lors detect predict`): 8-bit RGB, with 16-bit grey
scaled down rather than clipped white (`lors.data.transforms.to_rgb`).

Skipped annotations (documented, not errors):
- crowd regions (`iscrowd=1`): not trained on; COCOeval still uses them to ignore detections;
- degenerate boxes (width or height <= 0 after clipping to the image size stated in the json):
  one `warnings.warn` at construction lists their image and annotation ids;
- boxes that lie outside the real image (the json's width/height differ from the file's, or are
  absent): dropped at load time; `check_image_sizes()` warns once with the counts.
`count_crowded_images(dataset, num_queries)` warns once about images with more boxes than the
detector has queries (the surplus can never be matched).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torchvision.transforms.functional import pil_to_tensor

from lors.data.transforms import to_rgb

Target = dict[str, Any]
Transforms = Callable[[Any, Target], tuple[Any, Target]]

REQUIRED_KEYS = {
    "top level": ("images", "annotations", "categories"),
    "image": ("id", "file_name"),
    "annotation": ("id", "image_id", "category_id", "bbox"),
    "category": ("id", "name"),
}


class ImageFileError(ValueError):
    """A missing, empty or undecodable image file.

    A DataLoader worker's exception comes back to the main process rebuilt from a message that
    holds the worker's whole traceback; this class keeps only its own line and the worker's name.
    """

    def __init__(self, message: str):
        head, _, rest = message.partition("\n")
        if head.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            ours = [line.split(": ", 1)[1] for line in rest.splitlines()
                    if line.split(": ", 1)[0].endswith(type(self).__name__) and ": " in line]
            if ours:
                message = f"{ours[-1]} (raised in {head.split(' in ', 1)[1].rstrip('.')})"
        super().__init__(message)


def load_rgb(path: str | os.PathLike, source: str = "", fix: str = "pass a PNG or JPEG file") -> Image.Image:
    """The image file at `path`, fully decoded, as 8-bit RGB PIL (16-bit scaled, see `to_rgb`).

    Raises ImageFileError if it is missing, empty or undecodable; the message names the file,
    `source` (where it was listed, e.g. "image id 7") and `fix`.
    """
    path = Path(path)
    where = f" ({source})" if source else ""
    if not path.is_file():
        raise ImageFileError(f"image file {path}{where} not found: {fix}")
    if path.stat().st_size == 0:
        raise ImageFileError(f"image file {path}{where} is empty (0 bytes): {fix}")
    try:
        with Image.open(path) as img:
            img.load()  # the full decode, so a truncated file fails here
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageFileError(f"cannot read image: file {path}{where} cannot be decoded ({e}): {fix}") from e


def _read_json(ann_file: Path) -> dict:
    """Read and parse the annotation file; ValueError naming the file if it is missing or not JSON."""
    if not ann_file.is_file():
        raise ValueError(
            f"annotation file {ann_file} not found: pass the path of a COCO-format json "
            f"(e.g. annotations/instances_val2017.json)"
        )
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"annotation file {ann_file} is not valid JSON ({e}): re-download or re-export it"
        ) from e
    if not isinstance(data, dict):
        raise ValueError(
            f"annotation file {ann_file} holds a JSON {type(data).__name__}, not an object: "
            f"a COCO-format json is an object with keys {list(REQUIRED_KEYS['top level'])}"
        )
    return data


def _require(obj: Any, kind: str, where: str, ann_file: Path) -> None:
    """ValueError naming the file and record if `obj` is not a dict holding the keys of `kind`."""
    missing = [k for k in REQUIRED_KEYS[kind] if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(
            f"annotation file {ann_file}: {where} lacks key(s) {missing}: a COCO-format json needs "
            f"{list(REQUIRED_KEYS[kind])} in every {kind}"
        )


def _unique_ids(records: list[dict], kind: str, ann_file: Path) -> None:
    seen: set = set()
    for r in records:
        if r["id"] in seen:
            raise ValueError(f"annotation file {ann_file}: {kind} id {r['id']} appears twice: ids must be unique")
        seen.add(r["id"])


def validate_coco_dict(data: dict, ann_file: Path) -> list[tuple[Any, Any]]:
    """Check a parsed COCO dict; return (image id, annotation id) of the degenerate boxes.

    Raises ValueError (naming `ann_file` and the offending id) for missing keys, duplicate ids,
    annotations whose image or category id is absent, and boxes that are not 4 finite numbers.
    A box is degenerate when its width or height is <= 0 after clipping to the image's
    `width`/`height` (when the json gives them).
    """
    _require(data, "top level", "the top-level object", ann_file)
    for kind, key in (("image", "images"), ("annotation", "annotations"), ("category", "categories")):
        if not isinstance(data[key], list):
            raise ValueError(f"annotation file {ann_file}: '{key}' must be a list, got {type(data[key]).__name__}")
        for i, rec in enumerate(data[key]):
            _require(rec, kind, f"{kind} #{i} ({key}[{i}])", ann_file)
    if not data["categories"]:
        raise ValueError(f"annotation file {ann_file}: 'categories' is empty: list the classes as {{'id', 'name'}}")
    for kind, key in (("image", "images"), ("annotation", "annotations"), ("category", "categories")):
        _unique_ids(data[key], kind, ann_file)

    images = {img["id"]: img for img in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    degenerate = []
    for ann in data["annotations"]:
        if ann["image_id"] not in images:
            raise ValueError(
                f"annotation file {ann_file}: annotation id {ann['id']} refers to image id {ann['image_id']}, "
                f"which is not in 'images': add the image or remove the annotation"
            )
        if ann["category_id"] not in cat_ids:
            raise ValueError(
                f"annotation file {ann_file}: annotation id {ann['id']} (image id {ann['image_id']}) has "
                f"category id {ann['category_id']}, which is not in 'categories' (ids {sorted(cat_ids)}): "
                f"add the category or fix the annotation"
            )
        bbox = ann["bbox"]
        if not (
            isinstance(bbox, (list, tuple))
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            raise ValueError(
                f"annotation file {ann_file}: annotation id {ann['id']} (image id {ann['image_id']}) has "
                f"bbox {bbox!r}: a COCO bbox is 4 finite numbers [x, y, width, height]"
            )
        x, y, w, h = bbox
        img = images[ann["image_id"]]
        x2, y2 = x + w, y + h
        if "width" in img and "height" in img:
            x, x2 = min(max(x, 0), img["width"]), min(max(x2, 0), img["width"])
            y, y2 = min(max(y, 0), img["height"]), min(max(y2, 0), img["height"])
        if x2 <= x or y2 <= y:
            degenerate.append((ann["image_id"], ann["id"]))
    return degenerate


def fill_eval_defaults(coco: COCO) -> None:
    """Give every annotation the `area` and `iscrowd` keys that COCOeval reads (in place)."""
    for ann in coco.dataset.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection data set: `dataset[i] -> (image, target)` (see the module docstring).

    Args:
        img_folder: folder holding the images; an image's path is `img_folder / file_name`.
        ann_file: COCO-format json with `images`, `annotations` and `categories`.
        transforms: optional callable `(PIL image, target) -> (image, target)`, e.g. from
            `lors.data.transforms.make_coco_transforms`. Without it the image becomes a float
            tensor in [0, 1].
        verify_files: check now, not when an item loads, that every image file exists and is
            not empty (`check_files`, one ImageFileError counting and naming the bad ones) and has
            the json's size (`check_image_sizes`; reads each file's header, not its pixels).

    Attributes:
        coco: the pycocotools COCO object (annotations given default `area`/`iscrowd`), for COCOeval.
        ids: image ids in item order (sorted).
        cat_ids: COCO category ids, sorted; label i is category `cat_ids[i]`.
        label_to_cat_id: list, `label_to_cat_id[label]` is the COCO category id.
        cat_id_to_label: dict, COCO category id -> contiguous label.
        class_names: list of category names in label order.
    """

    def __init__(self, img_folder: str | os.PathLike, ann_file: str | os.PathLike, transforms: Transforms | None = None,
                 verify_files: bool = False):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        data = _read_json(self.ann_file)
        degenerate = validate_coco_dict(data, self.ann_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self.coco.createIndex()
        fill_eval_defaults(self.coco)

        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.label_to_cat_id = list(self.cat_ids)
        self.cat_id_to_label = {c: i for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self._skip = set(ann_id for _, ann_id in degenerate)
        if degenerate:
            shown = ", ".join(f"image id {i} annotation id {a}" for i, a in degenerate[:10])
            more = f" and {len(degenerate) - 10} more" if len(degenerate) > 10 else ""
            warnings.warn(
                f"{self.ann_file}: skipping {len(degenerate)} annotation(s) with zero or negative "
                f"width/height: {shown}{more}",
                stacklevel=2,
            )
        if verify_files:
            self.check_files()
            self.check_image_sizes()

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> Path:
        return self.img_folder / self.coco.imgs[image_id]["file_name"]

    def check_files(self) -> None:
        """Raise ImageFileError (a ValueError) listing the image files that are missing or empty (not decoded)."""
        bad = []
        for image_id in self.ids:
            path = self.image_path(image_id)
            if not path.is_file():
                bad.append(f"image id {image_id}: {path} missing")
            elif path.stat().st_size == 0:
                bad.append(f"image id {image_id}: {path} empty (0 bytes)")
        if bad:
            shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise ImageFileError(
                f"{len(bad)} of {len(self.ids)} image files of {self.ann_file} are unusable: {shown}. "
                f"Check that img_folder={self.img_folder} is the folder the json's file_name entries refer to"
            )

    def check_image_sizes(self) -> tuple[int, int]:
        """Compare each image file's size (from its header) with the json's width/height.

        Warns once, with counts, when sizes differ or training boxes lie outside their real image
        (they are dropped at load time). Returns (images whose size differs, boxes dropped).
        """
        differ, dropped, first = [], {}, None
        for image_id in self.ids:
            path, info = self.image_path(image_id), self.coco.imgs[image_id]
            try:
                with Image.open(path) as img:
                    w, h = img.size
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise ImageFileError(f"image file {path} (image id {image_id}) cannot be read ({e}): "
                                     f"re-copy the image or remove it from {self.ann_file}") from e
            if (info.get("width", w), info.get("height", h)) != (w, h):
                differ.append(image_id)
                first = first or f"image id {image_id}: json {info.get('width')}x{info.get('height')}, file {w}x{h}"
            n = sum(1 for a in self.train_annotations(image_id) if not _inside(a["bbox"], w, h))
            if n:
                dropped[image_id] = n
        if differ or dropped:
            warnings.warn(
                f"{self.ann_file}: {len(differ)} of {len(self.ids)} image files differ in size from the "
                f"json's width/height{f' ({first})' if first else ''}; {sum(dropped.values())} box(es) in "
                f"{len(dropped)} image(s) lie outside their image file and are dropped from training: fix "
                f"width/height and bbox in the json, or the image files",
                stacklevel=2,
            )
        return len(differ), sum(dropped.values())

    def load_image(self, image_id: int) -> Image.Image:
        """The image as 8-bit RGB PIL; ImageFileError naming the file, image id and json if missing or undecodable."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise ImageFileError(
                f"image file {path} (image id {image_id} of {self.ann_file}) not found: check that "
                f"img_folder={self.img_folder} is the folder the json's file_name entries refer to"
            )
        return load_rgb(path, f"image id {image_id}", f"re-copy the image or remove it from {self.ann_file}")

    def train_annotations(self, image_id: int) -> list[dict]:
        """The annotations of `image_id` that are training targets: not crowd, not degenerate."""
        return [a for a in self.coco.imgToAnns.get(image_id, [])
                if not a.get("iscrowd", 0) and a["id"] not in self._skip]

    def load_target(self, image_id: int, width: int, height: int) -> Target:
        """Training target of one image: crowd and degenerate annotations dropped, boxes clipped."""
        anns = self.train_annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        # boxes degenerate only after clipping to the real image size (json without width/height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        size = torch.tensor([height, width], dtype=torch.int64)
        return {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "image_id": image_id,
            "orig_size": size,
            "size": size.clone(),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.ids[index]
        img = self.load_image(image_id)
        target = self.load_target(image_id, *img.size)
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        if isinstance(img, Image.Image):
            img = pil_to_tensor(img).float().div_(255)
        target["size"] = torch.tensor(img.shape[-2:], dtype=torch.int64)
        return img, target


def _inside(bbox: list, width: int, height: int) -> bool:
    """Whether an xywh box keeps a positive area when clipped to a (width, height) image."""
    x, y, w, h = bbox
    return min(x + w, width) > max(x, 0) and min(y + h, height) > max(y, 0)


def count_crowded_images(dataset: CocoDetection, num_queries: int) -> tuple[int, int]:
    """(images with more training boxes than `num_queries`, boxes that can never be matched).

    Each query matches at most one box, so the surplus is never learned. Warns once with both
    counts when there is any; call it with `decoder.num_queries` before training.
    """
    counts = {i: n for i in dataset.ids if (n := len(dataset.train_annotations(i))) > num_queries}
    surplus = sum(counts.values()) - num_queries * len(counts)
    if counts:
        worst = max(counts, key=counts.get)
        warnings.warn(
            f"{dataset.ann_file}: {len(counts)} image(s) hold more ground-truth boxes than "
            f"decoder.num_queries={num_queries} (most: {counts[worst]} in image id {worst}); {surplus} "
            f"box(es) can never be matched and are not learned: set decoder.num_queries >= {counts[worst]}",
            stacklevel=2,
        )
    return len(counts), surplus


def collate_fn(
    batch: list[tuple[torch.Tensor, Target]], stride: int = 32
) -> tuple[torch.Tensor, torch.Tensor, list[Target]]:
    """Pad a list of `(image (3, H_i, W_i), target)` into one batch.

    Images are zero-padded at the bottom and right to (B, 3, Hmax, Wmax), with Hmax and Wmax
    rounded up to a multiple of `stride` (for the backbone's stride-32 feature map).

    Returns:
        images: (B, 3, Hmax, Wmax) float tensor.
        image_sizes: (B, 2) int64, the (h, w) of each image before padding.
        targets: the list of target dicts, unchanged.
    """
    if not batch:
        raise ValueError("collate_fn got an empty batch: the data set or sampler yields no items")
    if stride < 1:
        raise ValueError(f"collate_fn stride must be >= 1, got {stride}")
    images = [img for img, _ in batch]
    sizes = torch.tensor([img.shape[-2:] for img in images], dtype=torch.int64)
    h_max = -(-int(sizes[:, 0].max()) // stride) * stride
    w_max = -(-int(sizes[:, 1].max()) // stride) * stride
    padded = torch.stack([F.pad(img, (0, w_max - img.shape[-1], 0, h_max - img.shape[-2])) for img in images])
    return padded, sizes, [t for _, t in batch]
