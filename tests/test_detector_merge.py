"""Merged detector inference: LORS^A and LORS^T folded into plain AdaMixer layers give the same
detections, and `lors detect merge` writes a run that `lors detect eval` scores the same."""
import json

import pytest
import torch

from lors.core import AdaptiveLors, StaticLors
from lors.models.adamixer import build_detector, load_detector_config, merge_detector, merged_config

from test_adamixer_model import tiny_batch
from test_train import tiny_config


def _randomised(model):
    """Every LORS tensor non-zero (a fresh model starts its private parts at zero, which would
    make the merge trivially right), and the layer norms' biases too (queries straight out of a
    fresh LayerNorm sum to zero, which would hide a wrong generator bias)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (AdaptiveLors, StaticLors)):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif isinstance(m, torch.nn.LayerNorm) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("overrides", [
    [],  # tiny_lors: r=4, K=[1,1,2] for LORS^A, r=4 for LORS^T
    ["lors.adaptive.rank=[2,3,5]", "lors.adaptive.groups=[3,1,2]", "lors.static.rank=[1,4,2]",
     "lors.static.groups=[2,1,3]", "decoder.num_groups=2"],
    ["lors.adaptive.use_private=false", "lors.static.enabled=false"],  # Table 5's shared-only generator
    ["lors.adaptive.use_shared=false"],  # private only
])
def test_merged_detector_gives_the_same_outputs(overrides):
    cfg = load_detector_config("tiny_lors", overrides)
    torch.manual_seed(0)
    model = _randomised(build_detector(cfg)).eval()
    images, sizes, _ = tiny_batch(cfg)
    with torch.no_grad():
        ref = model(images, sizes)
    merge_detector(model)
    assert not any(isinstance(m, (AdaptiveLors, StaticLors)) for m in model.modules())
    plain = build_detector(merged_config(cfg))  # the vanilla layout: same names, shapes and count
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(images, sizes)
    for key in ("pred_logits", "pred_boxes"):
        err = (out[key] - ref[key]).norm() / ref[key].norm()
        assert err < 1e-5, (key, float(err))


def test_lors_detect_merge_writes_a_run_that_evaluates_the_same(tmp_path, capsys):
    from lors.cli import main
    from lors.experiments.detection.train import train
    cfg = tiny_config(tmp_path, "tiny_lors", "train.lr=1e-3")
    run = tmp_path / "run"
    train(cfg, run_dir=run, stop_after=4, progress=False, evaluate_at_end=False)
    assert main(["detect", "eval", "--checkpoint", str(run), "--json"]) == 0
    lors_ap = json.loads(capsys.readouterr().out)
    assert main(["detect", "merge", "--checkpoint", str(run), "--out", str(tmp_path / "merged"), "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["params_after"] > done["params_before"]  # vanilla's count: LORS saved parameters
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "merged"), "--json"]) == 0
    merged_ap = json.loads(capsys.readouterr().out)
    assert merged_ap == pytest.approx(lors_ap, abs=1e-6)
    assert main(["detect", "merge", "--checkpoint", str(tmp_path / "merged"), "--out", str(tmp_path / "again")]) == 2
    assert "nothing to merge" in capsys.readouterr().err
