"""Issue 24's tools: the schedule suite, suites run in parts with rows of their own config,
COCO AP during training and the norms of the LORS private terms in the log."""
import copy
import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lors.cli import main
from lors.config import to_dict
from lors.experiments.detection.bench import LORS, VANILLA, load_suite
from lors.experiments.detection.train import schedule, train
from lors.models.adamixer import build_detector, load_detector_config
from lors.models.adamixer.mixing import lors_norms, merge_mixing
from shapes_data import write_shapes

TINY_DATA = ["--data-set", "num_train=4", "--data-set", "num_val=2", "--data-set", "image_size=64",
             "--data-set", "max_digit_size=32"]
# TINY_MODEL of test_detect_bench without the schedule: the rows set their own train.epochs
TINY_MODEL = ["decoder.num_classes=10", "train.batch_size=2", "data.min_size=64", "data.max_size=64",
              "test.max_detections=10"]
SCHEDULE_KEYS = {"train.epochs", "train.lr_steps", "train.eval_every_epochs", "train.log_private_norms"}


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_schedule_suite_trains_both_bench_configs_at_16_32_48_epochs_with_the_drop_at_the_same_fraction():
    spec = load_suite("schedule")
    bench = load_detector_config(VANILLA).train
    fraction = bench.lr_steps[0] / bench.epochs  # 14 of 16
    seen = set()
    for v in spec.variants:
        base = load_detector_config(v.config)
        cfg = load_detector_config(v.config, v.overrides)
        seen.add((v.config, cfg.train.epochs))
        assert cfg.train.lr_steps == [round(fraction * cfg.train.epochs)], v.label
        steps = schedule(cfg, 200)  # the drop lands at the same share of the steps too
        assert steps.milestones[0] / steps.total_steps == pytest.approx(fraction), v.label
        changed = {k for k, x in _flatten(to_dict(cfg)).items() if _flatten(to_dict(base))[k] != x}
        assert changed <= SCHEDULE_KEYS, v.label  # the schedule only: same data, backbone, model
        assert v.part == str(cfg.train.epochs) and v.seeds == ([0, 1, 2, 3] if cfg.train.epochs == 16 else [0, 1])
    assert seen == {(c, e) for c in (VANILLA, LORS) for e in (16, 32, 48)}
    # the longest runs score AP during training; the 16-epoch rows are the bench configs themselves
    longest = [load_detector_config(v.config, v.overrides).train for v in spec.variants if v.part == "48"]
    assert all(t.eval_every_epochs == 4 for t in longest)
    assert all(v.overrides == [] for v in spec.variants if v.part == "16")


def _tiny_suite(tmp_path):
    path = tmp_path / "tiny_schedule.yaml"
    path.write_text("""\
title: "tiny schedule"
config: tiny_lors
variants:
  - {label: "plain, 1 epoch", config: tiny, part: short, overrides: []}
  - {label: "LORS, 1 epoch", part: short, overrides: []}
  - {label: "LORS, 2 epochs", part: long, seeds: [1], overrides: [train.epochs=2, "train.lr_steps=[2]", train.eval_every_epochs=1]}
""")
    return path


def _ablate(tmp_path, suite, *flags):
    return main(["detect", "ablate", "--suite", str(suite), "--out-dir", str(tmp_path / "out"),
                 "--runs", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--quiet",
                 "--no-pretrain", "--in-process", *flags, *TINY_DATA, *TINY_MODEL])


def test_a_suite_in_parts_trains_only_the_parts_rows_with_their_own_config_and_then_tables_them_all(tmp_path):
    suite = _tiny_suite(tmp_path)
    assert _ablate(tmp_path, suite, "--part", "short") == 0
    rows = json.loads((tmp_path / "out" / "ablation_tiny_schedule.json").read_text())
    assert list(rows) == ["plain, 1 epoch", "LORS, 1 epoch"]  # the long part is not trained
    assert len(list((tmp_path / "runs").iterdir())) == 2
    saved = {label: load_detector_config(str(tmp_path / "runs" / row["per_seed"][0]["run_dir"].split("/")[-1]
                                             / "config.yaml")) for label, row in rows.items()}
    assert not saved["plain, 1 epoch"].lors.adaptive.enabled  # the row's own config, tiny
    assert saved["LORS, 1 epoch"].lors.adaptive.enabled      # the suite's, tiny_lors
    assert rows["plain, 1 epoch"]["config"] == "tiny" and rows["LORS, 1 epoch"]["config"] == "tiny_lors"
    md = (tmp_path / "out" / "ablation_tiny_schedule.md").read_text()
    assert "- LORS, 2 epochs: not run yet" in md and "--part long" in md
    finished = {d: (d / "result.json").stat().st_mtime_ns for d in (tmp_path / "runs").iterdir()}

    assert _ablate(tmp_path, suite, "--part", "long") == 0
    rows = json.loads((tmp_path / "out" / "ablation_tiny_schedule.json").read_text())
    assert list(rows) == ["plain, 1 epoch", "LORS, 1 epoch", "LORS, 2 epochs"]  # every finished row
    assert {d: (d / "result.json").stat().st_mtime_ns for d in finished} == finished  # not trained again
    assert len(list((tmp_path / "runs").iterdir())) == 3
    long = rows["LORS, 2 epochs"]
    assert long["seeds"] == [1] and long["per_seed"][0]["steps"] == 4 and long["epochs"] == 2
    assert [p["epoch"] for p in long["curve"]] == [1, 2]  # AP after each epoch, from val.csv
    assert "not run yet" not in (tmp_path / "out" / "ablation_tiny_schedule.md").read_text()
    assert (tmp_path / "out" / "ablation_tiny_schedule_epochs.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_parts_and_a_config_for_rows_with_their_own_are_named(tmp_path, capsys):
    suite = _tiny_suite(tmp_path)
    assert _ablate(tmp_path, suite, "--part", "medium") == 2
    assert "has no part 'medium': its parts are short, long" in capsys.readouterr().err
    assert _ablate(tmp_path, "table5", "--part", "short") == 2
    assert "it has none (no row names a part): drop --part" in capsys.readouterr().err
    assert _ablate(tmp_path, suite, "--config", "tiny") == 2
    assert "names the config of rows ['plain, 1 epoch']" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before anything was built


def _config(tmp_path, name, *extra):
    images, ann = write_shapes(tmp_path / "data", num_images=4, size=64)
    return load_detector_config(name, [
        f"data.train_images={images}", f"data.train_annotations={ann}", f"data.val_images={images}",
        f"data.val_annotations={ann}", "data.min_size=64", "data.max_size=64", "train.batch_size=2",
        "train.epochs=2", "train.lr_steps=[2]", "train.lr=1e-3", *extra])


def _log(run_dir):
    with open(run_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def _weights(run_dir):
    return load_file(run_dir / "ckpt_00000004" / "model.safetensors")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """tiny_lors for 2 epochs of 2 steps, evaluated at the end only, no norms."""
    tmp = tmp_path_factory.mktemp("plain")
    train(_config(tmp, "tiny_lors"), tmp / "run", progress=False)
    return tmp / "run"


def test_periodic_evaluation_writes_a_val_row_after_each_epoch_and_changes_no_weight(tmp_path, plain_run):
    summary = train(_config(tmp_path, "tiny_lors", "train.eval_every_epochs=1"), tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "val.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]  # after epochs 1 and 2 (2 steps each)
    assert float(rows[-1]["AP"]) == pytest.approx(summary["metrics"]["AP"], abs=1e-6)
    plain, evaluated = _weights(plain_run), _weights(tmp_path / "run")
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)


def test_private_norms_are_logged_finite_from_zero_and_change_neither_losses_nor_weights(tmp_path, plain_run):
    train(_config(tmp_path, "tiny_lors", "train.log_private_norms=true"), tmp_path / "run", progress=False)
    log = _log(tmp_path / "run")
    names = [k for k in log[0] if k.startswith(("private_", "shared_"))]
    assert names == ["shared_a", "private_a0", "private_a1", "private_a2",  # tiny_lors has 3 stages
                     "shared_t", "private_t0", "private_t1", "private_t2"]
    assert all(math.isfinite(float(r[k])) for r in log for k in names)  # tiny logs every step
    assert all(float(log[0][k]) == 0.0 for k in names if k.startswith("private_"))  # E and B start at 0
    assert all(float(log[-1][k]) > 0.0 for k in names)  # and have learnt by the end
    assert [r["loss"] for r in log] == [r["loss"] for r in _log(plain_run)]
    plain, logged = _weights(plain_run), _weights(tmp_path / "run")
    assert all(torch.equal(plain[k], logged[k]) for k in plain)


def test_private_norms_are_measured_only_on_logged_steps(tmp_path):
    train(_config(tmp_path, "tiny_lors", "train.log_private_norms=true", "train.log_every=2", "train.epochs=1",
                  "train.lr_steps=[1]"), tmp_path / "run", progress=False, evaluate_at_end=False)
    log = _log(tmp_path / "run")
    assert [math.isnan(float(r["private_a0"])) for r in log] == [True, False]  # row 2 of 2 is logged



def test_the_norms_plot_reads_the_logged_steps_as_epochs_relative_to_the_shared_term(tmp_path):
    from lors.experiments.detection.report import plot_lors_norms, read_norms
    train(_config(tmp_path, "tiny_lors", "train.log_private_norms=true", "train.log_every=2", "train.epochs=2",
                  "train.lr_steps=[2]"), tmp_path / "run", progress=False, evaluate_at_end=False)
    log = _log(tmp_path / "run")
    norms = read_norms(tmp_path / "run", steps_per_epoch=2)
    assert [e for e, _ in norms["private_a1"]] == [1.0, 2.0]  # steps 2 and 4 of 2 per epoch: no nan rows
    assert norms["shared_t"][-1] == (2.0, float(log[-1]["shared_t"]))
    assert plot_lors_norms(norms, tmp_path / "norms.png", "tiny").read_bytes()[:4] == b"\x89PNG"
    assert read_norms(tmp_path / "nowhere", 2) == {}
    with pytest.raises(ValueError, match="train.log_private_norms=true"):
        plot_lors_norms({}, tmp_path / "none.png", "tiny")

def test_private_norms_are_the_norms_of_the_merged_generators_private_part():
    torch.manual_seed(0)
    cfg = load_detector_config("tiny_lors", ["backbone.weights=null"])
    mixing = build_detector(cfg).decoder.mixing
    with torch.no_grad():
        for p in mixing.parameters():
            p.add_(0.1 * torch.randn_like(p))  # private parts away from their zero init
    norms = lors_norms(mixing)
    shared_only = copy.deepcopy(mixing)
    with torch.no_grad():  # the shared part alone: zero E-generators and zero B of LORS^T
        for module in (shared_only.generator.channel, shared_only.generator.spatial):
            for e in module.E:
                e.weight.zero_(), e.bias.zero_()
        for b in shared_only.out_proj.B:
            b.zero_()
    full, shared = merge_mixing(mixing), merge_mixing(shared_only)
    for i, (f, s) in enumerate(zip(full.generator.weights.layers, shared.generator.weights.layers)):
        private = torch.cat([f.weight - s.weight, (f.bias - s.bias)[:, None]], dim=1)
        assert norms[f"private_a{i}"] == pytest.approx(torch.linalg.matrix_norm(private).item(), rel=1e-4)
        private_t = full.out_proj.layers[i].weight - mixing.out_proj.shared_weight
        assert norms[f"private_t{i}"] == pytest.approx(torch.linalg.matrix_norm(private_t).item(), rel=1e-4)


def test_norms_and_evaluation_settings_that_cannot_work_are_named(tmp_path):
    with pytest.raises(ValueError, match="no LORS private term to measure"):
        load_detector_config("tiny", ["train.log_private_norms=true"])
    cfg = _config(tmp_path, "tiny_lors", "train.eval_every_epochs=1")
    with pytest.raises(ValueError, match="evaluation is off"):
        train(cfg, tmp_path / "run", progress=False, evaluate_at_end=False)
    train(_config(tmp_path, "tiny_lors", "train.epochs=1", "train.lr_steps=[1]"), tmp_path / "run",
          stop_after=1, progress=False, evaluate_at_end=False)
    with pytest.raises(ValueError, match="started with train.log_private_norms=false"):
        train(_config(tmp_path, "tiny_lors", "train.epochs=1", "train.lr_steps=[1]", "train.log_private_norms=true"),
              tmp_path / "run", progress=False, evaluate_at_end=False)
