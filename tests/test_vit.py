"""The ViT family: LORS keeps <= 40 % of the block parameters, merged equals unmerged, tied
blocks share, a short training run and the four-way comparison on a small fake data set."""
import gzip

import numpy as np
import pytest
import torch

from lors import count_parameters, merge

pytest.importorskip("timm")
from lors.models.vit import build_vit, load_vit_config  # noqa: E402

TINY = ["model.embed_dim=16", "model.depth=3", "model.num_heads=2", "model.patch_size=7", "train.batch_size=8",
        "train.steps=4", "train.warmup_steps=1", "train.checkpoint_every=2", "train.eval_every=2",
        "data.train_images=32", "data.test_images=16"]


def write_fashion(root, n_train=32, n_test=16):
    """A fake Fashion-MNIST in the package's idx format."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write((0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + images.tobytes())
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write((0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
    return root


def block_params(model) -> int:
    return count_parameters(model.blocks).total


def test_lors_keeps_at_most_40_percent_of_the_dense_block_parameters():
    dense, lors = build_vit(load_vit_config("vit_small")), build_vit(load_vit_config("vit_small_lors"))
    assert block_params(lors) <= 0.40 * block_params(dense)


def test_merged_lors_vit_gives_the_same_logits():
    torch.manual_seed(0)
    model = build_vit(load_vit_config("vit_small_lors", TINY)).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 28, 28)
    before = model(x)
    merge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_tied_blocks_share_weights_not_biases():
    model = build_vit(load_vit_config("vit_small_tied", TINY))
    assert model.blocks[2].attn.qkv.weight is model.blocks[0].attn.qkv.weight
    assert model.blocks[2].attn.qkv.bias is not model.blocks[0].attn.qkv.bias


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path):
    from lors.data.fashion import load_fashion_mnist
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_vit_compare_writes_table_and_plots(tmp_path):
    from lors.experiments.vit.compare import compare_vit
    root = write_fashion(tmp_path)
    out = tmp_path / "cmp"
    summary = compare_vit(seeds=[0], out=out, overrides=[*TINY, f"data.root={root}"], jobs=1, quiet=True)
    rows = {r["model"]: r for r in summary["rows"]}
    assert list(rows) == ["dense", "LORS", "tied", "dense-small"]
    assert all(0 <= r["val_acc"] <= 100 and [s for s, _ in r["curve"]] == [2, 4] for r in rows.values())
    assert (out / "val_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("override, message", [
    ("model.num_heads=0", "'model.num_heads' must be >= 1"),   # before the embed_dim % num_heads check
    ("model.patch_size=0", "'model.patch_size' must be >= 1"),
    ("model.patch_size=5", "must be a multiple of model.patch_size"),
    ("train.steps=0", "'train.steps' must be >= 1"),
])
def test_bad_vit_settings_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_vit_config("vit_small", [override])


def test_vit_compare_reuses_finished_runs_and_refuses_to_overwrite_other_settings(tmp_path, capsys):
    from lors.experiments.compare import compare_rows
    from lors.experiments.vit.compare import compare_vit
    root = write_fashion(tmp_path)
    out = tmp_path / "cmp"
    overrides = [*TINY, f"data.root={root}"]
    first = compare_vit(seeds=[0], out=out, overrides=overrides, jobs=1, quiet=True)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/ckpt_*/model.safetensors")}
    capsys.readouterr()
    again = compare_vit(seeds=[0], out=out, overrides=overrides, jobs=1, quiet=True)
    assert capsys.readouterr().out.count("reusing the finished run") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/ckpt_*/model.safetensors")} == stamps  # not retrained
    assert [r["val_acc"] for r in again["rows"]] == [r["val_acc"] for r in first["rows"]]
    with pytest.raises(ValueError, match=r"holds a dense run with other settings \(train.lr .*pass another --out"):
        compare_vit(seeds=[0], out=out, overrides=[*overrides, "train.lr=0.5"], jobs=1, quiet=True)
    zero = compare_rows({"dense": 0.0, "LORS": 10.0, "tied": 5.0, "dense-small": 20.0}, lower_is_better=False)
    assert zero["lors_vs_dense_relative"] is None and zero["lors_vs_dense"] == 10.0  # no ZeroDivisionError
    assert zero["lors_beats_tied"] and not zero["lors_beats_dense_small"]


def test_dense_small_goes_shallower_when_no_width_comes_within_five_percent():
    from lors.experiments.compare import MATCH, non_embedding_params, small_shape
    from lors.experiments.lm.compare import GPT_TASK
    from lors.experiments.vit.compare import VIT_TASK
    for task, dense, lors, full_depth in ((VIT_TASK, "vit_small", "vit_small_lors", False),
                                          (GPT_TASK, "gpt_small", "gpt_small_lors", True)):
        target = non_embedding_params(task, task.load(lors, []))[0]
        shape = small_shape(task, dense, [], target)
        assert abs(non_embedding_params(task, task.load(dense, shape))[0] - target) / target <= MATCH
        assert (not any(s.startswith(task.depth_key) for s in shape)) == full_depth
