"""`lors.experiments.detection.pretrain`: a digit pretraining run of a fixed number of steps writes weights the
ResNet backbone loads, from the benchmark's train digits only; the weights depend on the
settings alone (twice gives the same bits); the cache is keyed by those settings and checked
by checksum; `lors detect compare --pretrain` passes them to both models."""
import json

import pytest
import torch

import lors.experiments.detection.pretrain as pretrain
from lors.cli import main
from lors.data.benchmark import build_or_reuse, digit_split, load_digits
from lors.experiments.detection.pretrain import PretrainConfig, cached_digit_backbone, train_digit_backbone
from lors.models.adamixer.backbone import ResNetBackbone
from test_detect_bench import TINY_DATA, TINY_MODEL

TINY = PretrainConfig(steps=2, batch_size=4, backgrounds=4)


def _spy(monkeypatch) -> list:
    seen = []
    real = pretrain.make_batch

    def spy(alphas, labels, *args, **kwargs):
        seen.append((alphas, labels))
        return real(alphas, labels, *args, **kwargs)

    monkeypatch.setattr(pretrain, "make_batch", spy)
    return seen


def test_tiny_pretraining_writes_a_state_dict_the_backbone_loads(tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    path = cached_digit_backbone(tmp_path, TINY, progress=False)
    assert path.exists() and len(seen) == 2
    state = torch.load(path, weights_only=True)
    assert "conv1.weight" in state and "layer3.1.conv2.weight" in state
    assert not any(k.startswith(("fc.", "layer4.")) for k in state)  # the detector reads C2..C4 only
    backbone = ResNetBackbone(18, weights=str(path), frozen_stages=1, num_levels=3)  # raises if keys do not fit
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    with pytest.raises(ValueError, match="no layer4.*backbone.num_levels=3"):
        ResNetBackbone(18, weights=str(path), num_levels=4)
    # the digits it drew from are exactly the benchmark's train digits: no val digit image
    alphas, labels = load_digits()
    split = digit_split(labels)
    assert set(pretrain.train_digit_indices()) == set(split["train"])
    assert not set(split["train"]) & set(split["val"])
    pool, pool_labels = seen[0]
    assert len(pool) == len(split["train"])
    assert torch.equal(pool, torch.from_numpy(alphas[split["train"]]))
    assert torch.equal(pool_labels, torch.from_numpy(labels[split["train"]]))
    # cached: a second call with the same settings does not train again
    monkeypatch.setattr(pretrain, "make_batch", None)
    assert cached_digit_backbone(tmp_path, TINY, progress=False) == path
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["key"]["steps"] == 2 and meta["key"]["seed"] == 0 and meta["key"]["batch_size"] == 4


def test_pretraining_twice_gives_bit_identical_weights():
    a = train_digit_backbone(TINY, progress=False)
    b = train_digit_backbone(TINY, progress=False)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train_digit_backbone(PretrainConfig(steps=2, batch_size=4, backgrounds=4, seed=1), progress=False)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])  # the seed does matter


@pytest.mark.parametrize("change", [dict(steps=3), dict(seed=1), dict(lr=1e-3), dict(batch_size=2),
                                    dict(backgrounds=2), dict(levels=2)])
def test_a_cache_made_with_other_settings_is_not_reused(tmp_path, monkeypatch, change):
    first = cached_digit_backbone(tmp_path, TINY, progress=False)
    seen = _spy(monkeypatch)
    other = PretrainConfig(**{**TINY.__dict__, **change})
    second = cached_digit_backbone(tmp_path, other, progress=False)
    assert second != first and len(seen) == other.steps  # trained anew, under its own name
    assert first.exists()  # and the other settings' cache is left alone


def test_a_truncated_cache_is_rebuilt_not_reused(tmp_path, monkeypatch, capsys):
    path = cached_digit_backbone(tmp_path, TINY, progress=False)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # an interrupted copy, a full disk
    seen = _spy(monkeypatch)
    assert cached_digit_backbone(tmp_path, TINY, progress=False) == path
    assert len(seen) == TINY.steps and "training it again" in capsys.readouterr().out
    assert path.read_bytes() == good  # deterministic: the rebuild gives the same file


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=-1), dict(image_size=16),
                                 dict(lr=0.0), dict(steps=2.5), dict(levels=5)])
def test_bad_pretraining_settings_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PretrainConfig(**bad)


def test_compare_passes_the_cached_pretrained_backbone_to_both_models(tmp_path):
    data = build_or_reuse(tmp_path / "data", TINY_DATA[1::2], progress=False)
    weights = cached_digit_backbone(data, PretrainConfig(steps=1, levels=4), progress=False)  # tiny reads C2..C5
    out = tmp_path / "compare"
    rc = main(["detect", "compare", "--out", str(out), "--data-dir", str(data), "--quiet", "--in-process",
               "--max-steps", "1", "--pretrain-steps", "1", "--vanilla", "tiny", "--lors", "tiny_lors",
               *TINY_DATA, *TINY_MODEL, "backbone.depth=18"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrained_backbone"] == str(weights)
    assert f"backbone.weights={weights}" in summary["overrides"]


def test_an_interrupted_pretraining_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    cfg = PretrainConfig(steps=4, batch_size=4, backgrounds=4)
    straight = train_digit_backbone(cfg, progress=False)
    monkeypatch.setattr(pretrain, "CHECKPOINT_EVERY", 1)
    real, calls = pretrain.make_batch, []

    def crash_once(*args, **kwargs):  # the machine goes down while drawing step 3's batch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "make_batch", crash_once)
    path = pretrain._cache_path(tmp_path, cfg.key())
    with pytest.raises(KeyboardInterrupt):
        cached_digit_backbone(tmp_path, cfg, progress=False)
    run = pretrain.run_folder(path)
    assert not path.exists() and (run / "ckpt_00000002").is_dir()  # no cache file, two steps checkpointed
    monkeypatch.setattr(pretrain, "make_batch", real)
    trained = []
    monkeypatch.setattr(pretrain.F, "cross_entropy", lambda *a, _ce=pretrain.F.cross_entropy, **k:
                        trained.append(1) or _ce(*a, **k))
    resumed = torch.load(cached_digit_backbone(tmp_path, cfg, progress=False), weights_only=True)
    assert len(trained) == 2  # resumed from step 2, not trained from the start
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not list(run.glob("ckpt_*")) and (run / "log.csv").exists()  # the weights are written: no checkpoints
