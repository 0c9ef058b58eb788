"""COCO data: loading, label mapping, transforms, collate, and bad input (all on tiny files in tmp_path)."""
import json

import pytest
import torch
from PIL import Image

from lors.data.coco import CocoDetection, collate_fn
from lors.data.transforms import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    ToTensor,
    make_coco_transforms,
    resized_size,
)

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}, {"id": 90, "name": "toothbrush"}]


def coco_dict():
    """Two images (w x h: 64x48 and 40x80), non-contiguous category ids 1, 5, 90, one crowd region."""
    return {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 3, "file_name": "b.png", "width": 40, "height": 80},
        ],
        "annotations": [
            {"id": 10, "image_id": 7, "category_id": 5, "bbox": [4, 6, 20, 10]},
            {"id": 11, "image_id": 7, "category_id": 90, "bbox": [30, 20, 30, 25]},
            {"id": 12, "image_id": 7, "category_id": 1, "bbox": [0, 0, 64, 48], "iscrowd": 1},
            {"id": 13, "image_id": 3, "category_id": 1, "bbox": [5, 10, 20, 40]},
        ],
        "categories": CATEGORIES,
    }


def write_dataset(tmp_path, data=None, draw_boxes=True):
    """Write the json and one PNG per image (black, with each box filled red); return (folder, json)."""
    data = coco_dict() if data is None else data
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for img in data["images"]:
        im = Image.new("RGB", (img["width"], img["height"]))
        if draw_boxes:
            for a in data["annotations"]:
                x, y, w, h = a["bbox"]
                if a["image_id"] == img["id"] and not a.get("iscrowd") and w > 0 and h > 0:
                    im.paste((255, 0, 0), (x, y, x + w, y + h))
        im.save(folder / img["file_name"])
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    return folder, ann_file


@pytest.fixture
def dataset(tmp_path):
    return CocoDetection(*write_dataset(tmp_path))


def test_item_has_image_in_unit_range_and_absolute_xyxy_target(dataset):
    assert len(dataset) == 2 and dataset.ids == [3, 7]
    img, target = dataset[1]  # image id 7, 64 wide and 48 high
    assert img.shape == (3, 48, 64) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() == 1.0
    assert target["image_id"] == 7
    assert target["orig_size"].tolist() == [48, 64] and target["size"].tolist() == [48, 64]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["boxes"].tolist() == [[4, 6, 24, 16], [30, 20, 60, 45]]
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    assert (img[0, y1:y2, x1:x2] == 1).all() and img[0, :y1].sum() == 0  # box covers the red patch


def test_crowd_annotations_are_not_training_targets(dataset):
    _, target = dataset[1]  # image 7 holds annotations 10, 11 and crowd 12
    assert len(target["boxes"]) == 2
    assert dataset.coco.anns[12]["iscrowd"] == 1  # still in the ground truth for COCOeval


def test_category_ids_map_to_contiguous_labels_and_back(dataset):
    assert dataset.num_classes == 3
    assert dataset.label_to_cat_id == [1, 5, 90]
    assert dataset.cat_id_to_label == {1: 0, 5: 1, 90: 2}
    assert dataset.class_names == ["person", "airplane", "toothbrush"]
    _, target = dataset[1]
    assert [dataset.label_to_cat_id[l] for l in target["labels"].tolist()] == [5, 90]
    assert all(dataset.cat_id_to_label[dataset.label_to_cat_id[l]] == l for l in range(3))


def test_image_without_annotations_gives_empty_target(tmp_path):
    data = coco_dict()
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 3]
    ds = CocoDetection(*write_dataset(tmp_path, data))
    _, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_resize_sets_shorter_side_and_scales_boxes(dataset):
    ds = CocoDetection(dataset.img_folder, dataset.ann_file, make_coco_transforms(False, [96], 1000, normalize=False))
    img, target = ds[1]  # 64x48 -> shorter side 96: scale 2
    assert img.shape == (3, 96, 128)
    assert target["size"].tolist() == [96, 128] and target["orig_size"].tolist() == [48, 64]
    assert target["boxes"].tolist() == [[8, 12, 48, 32], [60, 40, 120, 90]]
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    assert img[0, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].min() > 0.99  # red patch moved with the box


def test_resize_caps_longer_side():
    assert resized_size(800, 1200, 800, 1333) == (800, 1200)
    assert resized_size(480, 640, 800, 1333) == (800, 1067)
    assert resized_size(100, 1000, 800, 1333) == (133, 1333)  # 8000 wide at shorter side 800: capped


def test_flip_mirrors_boxes_and_pixels(dataset):
    flip = Compose([ToTensor(), RandomHorizontalFlip(p=1.0)])
    img, target = dataset.load_image(7), dataset.load_target(7, 64, 48)
    flipped, t = flip(img, target)
    assert t["boxes"].tolist() == [[40, 6, 60, 16], [4, 20, 34, 45]]  # x -> 64 - x
    x1, y1, x2, y2 = t["boxes"][0].int().tolist()
    assert (flipped[0, y1:y2, x1:x2] == 1).all()
    twice, t2 = flip(flipped, t)
    assert torch.equal(t2["boxes"], target["boxes"]) and torch.equal(twice, ToTensor()(img, target)[0])


def test_random_transforms_are_deterministic_given_a_generator(dataset):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        tf = make_coco_transforms(True, [32, 48, 64, 96], 1000, normalize=False, generator=g)
        img, target = dataset.load_image(7), dataset.load_target(7, 64, 48)
        return [(tuple(o[0].shape), o[1]["boxes"].tolist()) for o in (tf(img, target) for _ in range(8))]

    assert run(0) == run(0)
    assert len({shape for shape, _ in run(0)}) > 1  # several scales drawn
    assert run(0) != run(1)


def test_eval_transform_has_no_flip_and_normalizes(dataset):
    tf = make_coco_transforms(False, [48], 1333)
    img, target = dataset.load_image(7), dataset.load_target(7, 64, 48)
    outs = [tf(img, target) for _ in range(5)]
    assert all(torch.equal(o[1]["boxes"], target["boxes"]) for o in outs)
    plain = ToTensor()(img, target)[0]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(outs[0][0], (plain - mean) / std, atol=1e-6)
    with pytest.raises(ValueError, match="ToTensor"):
        Normalize()(img, target)


def test_collate_pads_to_stride_and_keeps_sizes(dataset):
    batch = [dataset[0], dataset[1]]  # (3, 80, 40) and (3, 48, 64)
    images, sizes, targets = collate_fn(batch, stride=32)
    assert images.shape == (2, 3, 96, 64)
    assert sizes.tolist() == [[80, 40], [48, 64]]
    assert torch.equal(images[0, :, :80, :40], batch[0][0]) and images[0, :, 80:].abs().sum() == 0
    assert images[0, :, :, 40:].abs().sum() == 0
    assert [t["image_id"] for t in targets] == [3, 7]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    assert next(iter(loader))[0].shape == (2, 3, 96, 64)  # default stride 32


def test_degenerate_boxes_are_skipped_with_a_warning(tmp_path):
    data = coco_dict()
    data["annotations"] += [
        {"id": 20, "image_id": 3, "category_id": 5, "bbox": [1, 1, 0, 5]},
        {"id": 21, "image_id": 7, "category_id": 5, "bbox": [10, 10, 5, -2]},
        {"id": 22, "image_id": 7, "category_id": 5, "bbox": [70, 10, 5, 5]},  # outside the 64-wide image
    ]
    folder, ann_file = write_dataset(tmp_path, data)
    with pytest.warns(UserWarning, match="skipping 3") as record:
        ds = CocoDetection(folder, ann_file)
    msg = str(record[0].message)
    assert "image id 3 annotation id 20" in msg and "image id 7 annotation id 21" in msg and "annotation id 22" in msg
    assert len(ds[0][1]["boxes"]) == 1 and len(ds[1][1]["boxes"]) == 2


# ---- bad input: each raises ValueError naming the file or id -------------------------------------


def test_missing_annotation_file(tmp_path):
    with pytest.raises(ValueError, match="nope.json not found"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]"])
def test_corrupt_annotation_file(tmp_path, text):
    ann_file = tmp_path / "bad.json"
    ann_file.write_text(text)
    with pytest.raises(ValueError, match="bad.json"):
        CocoDetection(tmp_path, ann_file)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("categories"), r"top-level object lacks key\(s\) \['categories'\]"),
        (lambda d: d["images"][1].pop("file_name"), r"image #1 .*\['file_name'\]"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotation #0 .*\['bbox'\]"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation id 10 .*bbox"),
        (lambda d: d["annotations"][0].update(image_id=99), "annotation id 10 refers to image id 99"),
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 7 appears twice"),
    ],
)
def test_malformed_annotation_file(tmp_path, edit, expected):
    data = coco_dict()
    edit(data)
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=expected) as err:
        CocoDetection(tmp_path, ann_file)
    assert "instances.json" in str(err.value)


def test_unknown_category_id(tmp_path):
    data = coco_dict()
    data["annotations"][1]["category_id"] = 42
    with pytest.raises(ValueError, match=r"annotation id 11 .*category id 42.*not in 'categories'"):
        CocoDetection(*write_dataset(tmp_path, data))


def test_missing_image_file(tmp_path):
    folder, ann_file = write_dataset(tmp_path)
    (folder / "b.png").unlink()
    ds = CocoDetection(folder, ann_file)  # lazy: construction succeeds
    with pytest.raises(ValueError, match=r"b\.png \(image id 3 .*not found"):
        ds[0]
    with pytest.raises(ValueError, match=r"1 of 2 image files.*image id 3: .*b\.png missing"):
        ds.check_files()
    ds[1]  # the other image still loads


def test_empty_image_file(tmp_path):
    folder, ann_file = write_dataset(tmp_path)
    (folder / "a.png").write_bytes(b"")
    ds = CocoDetection(folder, ann_file)
    with pytest.raises(ValueError, match=r"a\.png \(image id 7\) is empty"):
        ds[1]
    with pytest.raises(ValueError, match="image id 7: .*empty"):
        ds.check_files()


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_undecodable_image_file(tmp_path, content):
    folder, ann_file = write_dataset(tmp_path)
    path = folder / "a.png"
    path.write_bytes(b"this is not an image" if content == "garbage" else path.read_bytes()[:60])
    ds = CocoDetection(folder, ann_file)
    ds.check_files()  # exists and non-empty: check_files does not decode
    with pytest.raises(ValueError, match=r"a\.png \(image id 7\) cannot be decoded"):
        ds[1]


def test_collate_rejects_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        collate_fn([])
