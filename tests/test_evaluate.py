"""COCOeval wrapper: perfect and wrong predictions, crowd regions, empty input, bad ids, box rescaling."""
import json

import pytest
import torch
from pycocotools.coco import COCO

from lors.data.coco import CocoDetection
from lors.data.transforms import RandomResize
from lors.experiments.detection.evaluate import COCO_METRICS as METRICS, coco_evaluate


def write_json(tmp_path, with_crowd=False):
    """Two images; boxes small (20x20), medium (50x40) and large (150x120); category ids 1, 5, 90."""
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20]},
        {"id": 2, "image_id": 1, "category_id": 90, "bbox": [100, 50, 50, 40]},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [30, 60, 150, 120]},
    ]
    if with_crowd:
        anns.append({"id": 4, "image_id": 2, "category_id": 1, "bbox": [200, 200, 80, 80], "iscrowd": 1})
    data = {
        "images": [
            {"id": 1, "file_name": "1.png", "width": 200, "height": 150},
            {"id": 2, "file_name": "2.png", "width": 300, "height": 300},
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}, {"id": 90, "name": "toothbrush"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def perfect_predictions(ds):
    """One dict per image from the data set's own targets (image files are not needed)."""
    preds = []
    for image_id in ds.ids:
        info = ds.coco.imgs[image_id]
        t = ds.load_target(image_id, info["width"], info["height"])
        preds.append({"image_id": image_id, "boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))})
    return preds


@pytest.fixture
def ds(tmp_path):
    return CocoDetection(tmp_path, write_json(tmp_path))


def test_perfect_predictions_give_ap_one(ds, capsys):
    stats = coco_evaluate(ds.coco, perfect_predictions(ds), ds.label_to_cat_id)
    assert set(stats) == set(METRICS)
    assert all(stats[k] == pytest.approx(1.0) for k in METRICS)  # one small, one medium, one large box
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in capsys.readouterr().out


def test_wrong_label_or_box_lowers_ap(ds):
    perfect = coco_evaluate(ds.coco, perfect_predictions(ds), ds.label_to_cat_id, verbose=False)
    wrong_label = perfect_predictions(ds)
    wrong_label[0]["labels"] = wrong_label[0]["labels"].flip(0)  # swap the two labels of image 1
    shifted = perfect_predictions(ds)
    shifted[1]["boxes"] = shifted[1]["boxes"] + 30.0  # IoU of the large box drops to 0.43
    for preds in (wrong_label, shifted):
        stats = coco_evaluate(ds.coco, preds, ds.label_to_cat_id, verbose=False)
        assert stats["AP"] < perfect["AP"] - 0.2


def test_detection_on_crowd_region_is_not_a_false_positive(tmp_path):
    ds = CocoDetection(tmp_path, write_json(tmp_path, with_crowd=True))
    preds = perfect_predictions(ds)  # the crowd region is not a target
    preds[1]["boxes"] = torch.cat([preds[1]["boxes"], torch.tensor([[205.0, 205.0, 275.0, 275.0]])])
    preds[1]["labels"] = torch.cat([preds[1]["labels"], torch.tensor([0])])
    preds[1]["scores"] = torch.tensor([0.5, 0.9])  # the crowd hit outranks the true box
    assert coco_evaluate(ds.coco, preds, ds.label_to_cat_id, verbose=False)["AP"] == pytest.approx(1.0)


def test_plain_pycocotools_gt_without_area_and_iscrowd(tmp_path):
    coco = COCO(str(write_json(tmp_path)))  # raw COCO: COCOeval alone would need area and iscrowd
    preds = [{"image_id": 2, "boxes": [[30, 60, 180, 180]], "labels": [0], "scores": [0.8]}]
    stats = coco_evaluate(coco, preds, {0: 1, 1: 5, 2: 90}, verbose=False)
    assert stats["AP"] == pytest.approx(1.0)  # only image 2 is scored
    assert stats["APs"] == -1.0 and stats["APm"] == -1.0  # image 2 has no small or medium boxes


@pytest.mark.parametrize("empty", ["no dicts", "no boxes"])
def test_empty_predictions_return_zeros_with_warning(ds, empty):
    preds = [] if empty == "no dicts" else [
        {"image_id": i, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
        for i in ds.ids
    ]
    with pytest.warns(UserWarning, match="no detections"):
        stats = coco_evaluate(ds.coco, preds, ds.label_to_cat_id)
    assert stats == {k: 0.0 for k in METRICS}


def test_bad_predictions_name_the_id(ds):
    preds = perfect_predictions(ds)
    preds[0]["image_id"] = 77
    with pytest.raises(ValueError, match="image id 77, which is not in the ground-truth"):
        coco_evaluate(ds.coco, preds, ds.label_to_cat_id)
    preds = perfect_predictions(ds)
    preds[1]["labels"] = torch.tensor([3])
    with pytest.raises(ValueError, match=r"image id 2 has label 3 .*outside 0..2"):
        coco_evaluate(ds.coco, preds, ds.label_to_cat_id)


def test_postprocess_maps_boxes_back_through_the_resize():
    from lors.models.adamixer import PostProcess
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [100.0, 50.0, 150.0, 90.0]])
    target = {"boxes": boxes, "size": torch.tensor([150, 200])}
    img, resized = RandomResize([800], 1333)(torch.zeros(3, 150, 200), target)
    assert img.shape[-2:] == (800, 1067)
    logits = torch.full((1, 2, 3), -5.0)
    logits[..., 0] = 5.0  # both queries score class 0 alone
    outputs = {"pred_logits": logits, "pred_boxes": resized["boxes"][None]}
    det = PostProcess(2)(outputs, resized["size"][None], torch.tensor([[150, 200]]))[0]
    back = det["boxes"][det["boxes"][:, 0].argsort()]
    assert torch.allclose(back, boxes, atol=1e-4)


def test_predict_leaves_the_model_in_the_mode_it_was_in():
    import torch

    from lors.experiments.detection.evaluate import predict
    from lors.models.adamixer import build_detector, load_detector_config
    torch.manual_seed(0)
    model = build_detector(load_detector_config("tiny", ["decoder.num_classes=3"]))
    images, sizes = torch.rand(1, 3, 64, 64), torch.tensor([[64, 64]])
    for mode in (True, False):
        model.train(mode)
        predict(model, images, sizes, sizes, max_detections=5)
        assert model.training is mode
