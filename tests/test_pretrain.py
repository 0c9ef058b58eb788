"""`lors.data.pretrain`: a tiny digit pretraining run writes weights the ResNet backbone loads,
from the benchmark's train digits only; `lors detect compare --pretrain` passes them to both models."""
import json

import torch

import lors.data.pretrain as pretrain
from lors.cli import main
from lors.commands.detect_bench import build_data
from lors.data.benchmark import digit_split, load_digits
from lors.models.adamixer.backbone import ResNetBackbone
from test_detect_bench import TINY_DATA, TINY_MODEL


def test_tiny_pretraining_writes_a_state_dict_the_backbone_loads(tmp_path, monkeypatch):
    seen = []
    real = pretrain.make_batch

    def spy(alphas, labels, *args, **kwargs):
        seen.append((alphas, labels))
        return real(alphas, labels, *args, **kwargs)

    monkeypatch.setattr(pretrain, "make_batch", spy)
    path = pretrain.pretrain_digit_backbone(tmp_path / "r18.pth", steps=2, batch_size=4, progress=False)
    assert path.exists() and len(seen) == 2
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith("fc.") for k in state) and "conv1.weight" in state
    backbone = ResNetBackbone(18, weights=str(path), frozen_stages=1)  # raises if keys do not fit
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    # the digits it drew from are exactly the benchmark's train digits: no val digit image
    alphas, labels = load_digits()
    split = digit_split(labels)
    assert set(pretrain.train_digit_indices()) == set(split["train"])
    assert not set(split["train"]) & set(split["val"])
    pool, pool_labels = seen[0]
    assert len(pool) == len(split["train"])
    assert torch.equal(pool, torch.from_numpy(alphas[split["train"]]))
    assert torch.equal(pool_labels, torch.from_numpy(labels[split["train"]]))
    # cached: a second call does not train again
    monkeypatch.setattr(pretrain, "make_batch", None)
    assert pretrain.pretrain_digit_backbone(path, steps=2, progress=False) == path


def test_compare_passes_the_cached_pretrained_backbone_to_both_models(tmp_path):
    data = build_data(tmp_path / "data", TINY_DATA[1::2], progress=False)
    weights = pretrain.pretrain_digit_backbone(data / "resnet18_digits.pth", steps=1, batch_size=2,
                                               progress=False)
    out = tmp_path / "compare"
    rc = main(["detect", "compare", "--out", str(out), "--data-dir", str(data), "--quiet", "--in-process",
               "--max-steps", "1", "--vanilla", "tiny", "--lors", "tiny_lors", *TINY_DATA,
               *TINY_MODEL, "backbone.depth=18"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrained_backbone"] == str(weights)
    assert f"backbone.weights={weights}" in summary["overrides"]
