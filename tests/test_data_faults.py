"""Data faults from issue 11: benchmark folders are never replaced, 16-bit images keep their
contrast, missing image files are clear errors (also from DataLoader workers), silent box loss warns."""
import dataclasses
import io
import json
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lors.cli import build_parser
from lors.data.benchmark import build_or_reuse
from lors.data.benchmark import BenchmarkConfig, build_benchmark, content_hash, read_meta
from lors.data.coco import CocoDetection, ImageFileError, collate_fn, count_crowded_images, load_rgb
from lors.data.transforms import to_rgb
from test_coco_data import coco_dict, write_dataset

SMALL = BenchmarkConfig(image_size=64, num_train=3, num_val=2, max_objects=2, min_digit_size=10,
                        max_digit_size=24, seed=3)


def cli(argv):
    """`lors detect ARGV`, with the command's errors raised rather than printed."""
    args = build_parser().parse_args(["detect", *argv])
    return args.func(args)


@pytest.fixture
def bench(tmp_path):
    """A small benchmark with a user's file and a cached backbone beside it."""
    out = build_benchmark(tmp_path / "b", SMALL, progress=False)
    (out / "notes.txt").write_text("mine")
    (out / "resnet18_digits-0123456789ab.pth").write_bytes(b"weights")
    (out / "resnet18_digits-0123456789ab.json").write_text("{}")
    return out


def extras(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("notes", "resnet18"))}


# ---- item 7: a benchmark folder is never replaced ------------------------------------------------


def test_other_settings_are_refused_naming_the_keys_and_nothing_is_deleted(bench, tmp_path):
    before, meta = extras(bench), read_meta(bench)
    with pytest.raises(ValueError, match=r"num_val: folder 2 vs requested 5; seed: folder 3 vs requested 0") as err:
        build_benchmark(bench, dataclasses.replace(SMALL, num_val=5, seed=0), progress=False)
    assert "another folder" in str(err.value) and f"delete {bench} yourself" in str(err.value)
    assert "num_val=2 seed=3" in str(err.value)  # the folder's values, ready to pass
    assert extras(bench) == before and read_meta(bench) == meta and content_hash(bench) == meta["content_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folders left


def test_same_settings_reuse_the_folder_and_keep_other_files(bench):
    before = extras(bench)
    assert build_benchmark(bench, dataclasses.replace(SMALL), progress=False) == bench
    assert extras(bench) == before


def test_benchmark_of_another_builder_version_is_refused(bench):
    meta = read_meta(bench)
    (bench / "meta.json").write_text(json.dumps({**meta, "builder_version": 0}))
    with pytest.raises(ValueError, match="builder_version: folder 0 vs requested 1"):
        build_benchmark(bench, SMALL, progress=False)
    assert (bench / "notes.txt").is_file()


def test_cli_data_with_default_settings_refuses_a_small_folder(bench):
    with pytest.raises(ValueError, match="num_train: folder 3 vs requested 800"):
        cli(["data", "--out", str(bench), "--quiet"])
    assert read_meta(bench)["counts"]["train"]["images"] == 3 and (bench / "notes.txt").is_file()


def test_data_dir_without_settings_reuses_the_folders_own(bench):
    assert build_or_reuse(bench, progress=False) == bench  # not rebuilt with 800 default images
    assert read_meta(bench)["counts"]["train"]["images"] == 3
    assert build_or_reuse(bench, ["num_train=3"], progress=False) == bench  # repeating a value is fine
    with pytest.raises(ValueError, match="num_train: folder 3 vs requested 9"):
        build_or_reuse(bench, ["num_train=9"], progress=False)
    assert (bench / "resnet18_digits-0123456789ab.pth").is_file()


def test_data_dir_missing_or_empty_is_built(tmp_path):
    overrides = ["num_train=2", "num_val=1", "max_objects=2"]
    out = build_or_reuse(tmp_path / "new", overrides, progress=False)
    assert read_meta(out)["counts"]["train"]["images"] == 2 and read_meta(out)["config"]["num_train"] == 2
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o750)
    os.chmod(empty, 0o750)
    inode = empty.stat().st_ino
    assert build_or_reuse(empty, overrides, progress=False) == empty
    assert read_meta(empty)["counts"]["val"]["images"] == 1
    assert empty.stat().st_ino == inode and empty.stat().st_mode & 0o777 == 0o750  # the folder itself is kept


def test_new_folder_gets_the_umask_mode_not_0700(tmp_path):
    umask = os.umask(0o022)
    try:
        out = build_benchmark(tmp_path / "b", SMALL, progress=False)
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755


# ---- item 9: 16-bit images are scaled, not clipped white -----------------------------------------


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of a (H, W) grey or (H, W, 3) RGB uint16 array (PIL cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    colour = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def gradient(h=48, w=64):
    """(h, w) uint16 covering 0..65535."""
    return np.linspace(0, 65535, h * w).reshape(h, w).round().astype(np.uint16)


@pytest.mark.parametrize("colour", ["grey", "rgb"])
def test_16bit_png_in_the_data_set_keeps_its_values(tmp_path, colour):
    folder, ann_file = write_dataset(tmp_path)
    grey = gradient()
    arr = grey if colour == "grey" else np.stack([grey, grey // 2, 65535 - grey], axis=-1)
    (folder / "a.png").write_bytes(png16(arr))  # image id 7, 64x48
    ds = CocoDetection(folder, ann_file)
    img, _ = ds[1]  # (3, 48, 64) in [0, 1]
    expected = torch.from_numpy(arr.astype(np.float32) / 65535)
    expected = expected.expand(3, -1, -1) if colour == "grey" else expected.permute(2, 0, 1)
    assert (img - expected).abs().max() <= 1 / 255 + 1e-6
    assert (img == 1).float().mean() < 0.01  # not white (it was 99.6 % white)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_to_rgb_scales_16bit_modes_by_257(mode):
    a = gradient(4, 8)
    if mode == "I":
        img = Image.fromarray(a.astype(np.int32))
    else:
        img = Image.frombytes(mode, (8, 4), a.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    assert img.mode == mode
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (4, 8, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], np.rint(a / 257).astype(np.uint8))


def test_load_rgb_reads_16bit_for_predict_too(tmp_path):
    (tmp_path / "x.png").write_bytes(png16(gradient()))
    rgb = np.asarray(load_rgb(tmp_path / "x.png"))
    assert rgb.shape == (48, 64, 3) and abs(rgb.mean() - 127.5) < 1


def test_predict_reads_its_image_with_load_rgb(tmp_path, monkeypatch):
    import lors.data.coco
    import lors.experiments.detection.evaluate
    from lors.experiments.detection.predict import predict_image
    seen = []

    def fake_load(path, *args, **kwargs):
        seen.append(path)
        raise ImageFileError("stop here")

    monkeypatch.setattr(lors.experiments.detection.evaluate, "run_config", lambda *a: (None, None, {}))
    monkeypatch.setattr(lors.data.coco, "load_rgb", fake_load)
    with pytest.raises(ImageFileError, match="stop here"):
        predict_image("c", str(tmp_path / "x.png"), str(tmp_path / "o.png"), 0.3)
    assert [str(p) for p in seen] == [str(tmp_path / "x.png")]


def test_load_rgb_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ImageFileError, match=r"nope\.png not found: pass a PNG or JPEG file"):
        load_rgb(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png cannot be decoded"):
        load_rgb(tmp_path / "bad.png")


# ---- missing image files: before training, and one line from a worker ----------------------------


def test_verify_files_counts_and_names_missing_files_at_construction(tmp_path):
    folder, ann_file = write_dataset(tmp_path)
    (folder / "a.png").unlink()
    (folder / "b.png").unlink()
    with pytest.raises(ImageFileError, match=r"2 of 2 image files of .*instances\.json are unusable: "
                                             r"image id 3: .*b\.png missing; image id 7: .*a\.png missing"):
        CocoDetection(folder, ann_file, verify_files=True)


def test_missing_file_in_a_dataloader_worker_is_one_clear_line(tmp_path):
    folder, ann_file = write_dataset(tmp_path)
    (folder / "b.png").unlink()
    ds = CocoDetection(folder, ann_file)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_fn)
    with pytest.raises(ValueError) as err:
        next(iter(loader))
    msg = str(err.value)
    assert err.type is ImageFileError and "\n" not in msg and "Traceback" not in msg
    assert "b.png (image id 3 of" in msg and "instances.json) not found" in msg
    assert "DataLoader worker process 0" in msg


def test_image_file_error_survives_pickling():
    import pickle
    err = pickle.loads(pickle.dumps(ImageFileError("image file x.png not found")))
    assert str(err) == "image file x.png not found"


# ---- silent box loss warns once, with counts -----------------------------------------------------


def test_json_size_different_from_the_file_warns_once_with_counts(tmp_path):
    data = coco_dict()
    data["annotations"].append({"id": 30, "image_id": 7, "category_id": 5, "bbox": [40, 30, 10, 10]})
    folder, ann_file = write_dataset(tmp_path, data)
    Image.new("RGB", (32, 24)).save(folder / "a.png")  # the json says 64x48
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(folder, ann_file, verify_files=True)
    msgs = [str(r.message) for r in record if "differ in size" in str(r.message)]
    assert len(msgs) == 1
    assert "1 of 2 image files differ" in msgs[0] and "image id 7: json 64x48, file 32x24" in msgs[0]
    assert "1 box(es) in 1 image(s)" in msgs[0] and "dropped" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ds.check_image_sizes() == (1, 1)
    assert len(ds[1][1]["boxes"]) == 2  # of the 3 training boxes of image 7, the one outside is gone


def test_matching_sizes_give_no_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(*write_dataset(tmp_path), verify_files=True)
    assert ds.check_image_sizes() == (0, 0)


def test_more_boxes_than_queries_warns_once_with_counts(tmp_path):
    ds = CocoDetection(*write_dataset(tmp_path))  # image 7: 2 training boxes (+1 crowd), image 3: 1
    with pytest.warns(UserWarning, match=r"1 image\(s\) hold more ground-truth boxes than "
                                         r"decoder\.num_queries=1 \(most: 2 in image id 7\); 1 box\(es\) "
                                         r"can never be matched") as record:
        assert count_crowded_images(ds, 1) == (1, 1)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_crowded_images(ds, 2) == (0, 0)


def test_png16_helper_writes_what_pil_reads():
    img = Image.open(io.BytesIO(png16(gradient(2, 3))))
    assert img.mode == "I;16" and np.array_equal(np.asarray(img), gradient(2, 3))
