"""`lors detect compare` / `ablate`: outputs on a tiny benchmark, suite configs, clear errors."""
import csv
import json

import pytest

from lors.cli import main
from lors.experiments.detection.bench import LORS, VANILLA, load_suite, suite_names
from lors.experiments.detection.report import KEYS
from lors.config import to_dict
from lors.engine.checkpoint import find_checkpoint
from lors.experiments.detection.train import train
from lors.models.adamixer import load_detector_config
from lors.models.adamixer.report import detect_report
from shapes_data import write_shapes

TINY_DATA = ["--data-set", "num_train=4", "--data-set", "num_val=2", "--data-set", "image_size=64",
             "--data-set", "max_digit_size=32"]
TINY_MODEL = ["decoder.num_classes=10", "train.batch_size=2", "train.epochs=1", "train.lr_steps=[1]",
              "train.warmup_iters=0", "data.min_size=64", "data.max_size=64", "test.max_detections=10"]


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def suite_variants(name):
    """(label, overrides) of each row of an ablation suite."""
    return [(v.label, list(v.overrides)) for v in load_suite(name).variants]


def test_compare_on_a_tiny_benchmark_writes_summary_table_and_pngs(tmp_path, capsys):
    # two tiny models, 64 px, 4 train / 2 val images, stopped after 1 of 2 steps
    out = tmp_path / "compare"
    rc = main(["detect", "compare", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--quiet", "--no-pretrain",
               "--in-process", "--max-steps", "1", "--vanilla", "tiny", "--lors", "tiny_lors", *TINY_DATA,
               *TINY_MODEL])
    assert rc == 0
    assert "1-seed estimate" in capsys.readouterr().out  # points to the four-seed table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"AdaMixer", "AdaMixer + LORS"}
    for name, row in summary["models"].items():
        assert set(KEYS) <= set(row), name
        assert row["per_seed"][0]["steps"] == 1  # --max-steps 1 of 2, then evaluated there
        assert row["seconds_per_step"] > 0 and row["peak_memory_mb"] > 0
    assert summary["models"]["AdaMixer"]["decoder_params"] == detect_report(
        load_detector_config("tiny", TINY_MODEL))["decoder"]
    for png in ("ap_vs_decoder_params.png", "predictions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| AdaMixer + LORS |" in (out / "table.md").read_text()


def test_table5_variants_differ_from_the_base_only_in_the_shared_private_flags():
    base = _flatten(to_dict(load_detector_config(LORS)))
    flags = {"lors.adaptive.use_shared", "lors.adaptive.use_private"}
    seen = []
    for label, overrides in suite_variants("table5"):
        cfg = _flatten(to_dict(load_detector_config(LORS, overrides)))
        changed = {k for k in base if cfg[k] != base[k]}
        assert changed <= flags, label
        seen.append((cfg["lors.adaptive.use_shared"], cfg["lors.adaptive.use_private"]))
    assert sorted(seen) == [(False, True), (True, False), (True, True)]


@pytest.mark.parametrize("suite", suite_names())
def test_every_suite_variant_builds_a_valid_config(suite):
    spec = load_suite(suite)  # each row on its own config where it names one
    decoders = [detect_report(load_detector_config(v.config or spec.config, v.overrides))["decoder"]
                for v in spec.variants]
    assert len(decoders) == len(spec.variants) and all(d > 0 for d in decoders)


def test_bench_lors_config_keeps_at_most_40_percent_of_the_vanilla_decoder_and_the_same_schedule():
    vanilla, lors = load_detector_config(VANILLA), load_detector_config(LORS)
    assert to_dict(vanilla)["train"] == to_dict(lors)["train"] and vanilla.data == lors.data
    ratio = detect_report(lors)["decoder"] / detect_report(vanilla)["decoder"]
    assert ratio <= 0.40


def test_unknown_suite_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="unknown ablation suite 'table9': choose one of .*table4"):
        suite_variants("table9")
    assert main(["detect", "ablate", "--suite", "table9"]) == 2
    assert "unknown ablation suite" in capsys.readouterr().err


def test_a_fresh_run_in_a_used_run_dir_rewrites_the_log(tmp_path):
    images, ann = write_shapes(tmp_path / "data", num_images=2, size=64)
    cfg = load_detector_config("tiny", [
        f"data.train_images={images}", f"data.train_annotations={ann}", f"data.val_images={images}",
        f"data.val_annotations={ann}", "data.min_size=64", "data.max_size=64", "train.batch_size=2"])
    for _ in range(2):  # the second fresh start used to append a second header, breaking resume
        train(cfg, tmp_path / "run", resume=False, progress=False, evaluate_at_end=False)
    rows = list(csv.reader((tmp_path / "run" / "log.csv").open()))
    assert [r[0] for r in rows] == ["step", "1"]
    # a fresh start drops the old run's checkpoints at once: a crash before its first checkpoint
    # must not leave last.json pointing at the old run for a later resume
    stale = tmp_path / "run" / "ckpt_00000099"
    stale.mkdir()
    (tmp_path / "run" / "last.json").write_text('{"checkpoint": "ckpt_00000099"}')
    train(cfg, tmp_path / "run", resume=False, progress=False, evaluate_at_end=False, stop_after=0)
    assert not stale.exists() and find_checkpoint(tmp_path / "run") is None


def test_ablate_runs_two_child_processes_at_a_time_and_keeps_each_row_its_own(tmp_path, capsys):
    # table5's three variants of a tiny LORS model, two at a time in child processes
    rc = main(["detect", "ablate", "--suite", "table5", "--config", "tiny_lors", "--out-dir", str(tmp_path / "out"),
               "--runs", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--quiet", "--no-pretrain",
               "--jobs", "2", "--max-steps", "1", *TINY_DATA, *TINY_MODEL])
    assert rc == 0
    rows = json.loads((tmp_path / "out" / "ablation_table5.json").read_text())
    assert list(rows) == [label for label, _ in suite_variants("table5")]
    for label, row in rows.items():
        (result,) = row["per_seed"]
        assert result["steps"] == 1
        saved = load_detector_config(str(tmp_path / "runs" / result["run_dir"].split("/")[-1] / "config.yaml"))
        assert saved.lors.adaptive.use_shared == (label != "W^private only")
        assert saved.lors.adaptive.use_private == (label != "W^shared only")
    # the private-only row has no shared generator, so fewer decoder parameters than the full one
    assert rows["W^private only"]["decoder_params"] < rows["W^shared + W^private"]["decoder_params"]
    # table4's "LORS^A + LORS^T" row is table5's base row: a second suite reuses that finished run
    capsys.readouterr()
    assert main(["detect", "ablate", "--suite", "table4", "--config", "tiny_lors", "--out-dir", str(tmp_path / "out"),
                 "--runs", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--quiet", "--no-pretrain",
                 "--max-steps", "1", *TINY_DATA, *TINY_MODEL]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 1
    capsys.readouterr()
    assert main(["detect", "ablate", "--suite", "table5", "--in-process", "--jobs", "2", "--quiet",
                 "--no-pretrain", "--data-dir", str(tmp_path / "data"), *TINY_DATA]) == 2
    assert "--in-process trains one run at a time" in capsys.readouterr().err


def _child_peak(queue) -> None:
    from lors.engine.memory import PeakMemory
    with PeakMemory("cpu") as memory:
        pass
    queue.put(memory.peak_mib)


def test_a_child_run_reports_its_own_peak_memory_not_its_parents():
    """compare/ablate train in spawned children; ru_maxrss would carry the parent's peak into
    each child (fork + exec keeps it), so every run would report the parent's memory."""
    import multiprocessing

    import numpy as np

    from lors.engine.memory import PeakMemory
    with PeakMemory("cpu") as parent:
        big = np.ones(2_000_000_000 // 8)  # 2 GB touched in the parent
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_peak, args=(queue,))
    child.start()
    child_peak = queue.get(timeout=120)
    child.join()
    parent_peak = parent.peak_mib
    assert parent_peak > 2000 and child_peak < parent_peak - 1000, (parent_peak, child_peak)
    del big


def test_ablate_writes_under_runs_by_default_and_records_every_flag_that_changes_the_figures():
    from lors.cli import build_parser
    from lors.experiments.detection.bench import SweepOptions, sweep_flags
    args = build_parser().parse_args(["detect", "ablate", "--suite", "table5"])
    assert args.out_dir == "runs/ablate"  # never the committed docs/results
    opts = SweepOptions(seeds=[0, 1], data_dir="d", data_set=["num_train=4"], overrides=["train.epochs=2"],
                        max_steps=2, pretrain=False)
    assert " ".join(sweep_flags(opts)) == ("--data-dir d --data-set num_train=4 --no-pretrain --max-steps 2 "
                                          "train.epochs=2 --seeds 0 1")
    assert sweep_flags(SweepOptions(pretrain_steps=5)) == ["--pretrain-steps", "5", "--seeds", "0"]


def test_the_val_curve_keeps_one_row_per_step_the_last(tmp_path):
    """A finished run rerun appended its final evaluation again: the curve has each step once."""
    from lors.experiments.detection.report import val_curve
    assert val_curve(tmp_path) == []
    (tmp_path / "val.csv").write_text("step,AP,AP50\n10,0.1,0.2\n20,0.2,0.3\n20,0.25,0.35\n")
    assert val_curve(tmp_path) == [(10, 0.1), (20, 0.25)]
