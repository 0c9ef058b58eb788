"""benchmarks/bench_detector.py end to end at a toy image size, and its pieces."""
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # importable by name: spawned processes find it too
    try:
        yield importlib.import_module("bench_detector")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_layouts_build_the_papers_models(bench):
    lors = bench.layout_config("lors", "4x32", 100)
    vanilla = bench.layout_config("vanilla", "2x64", 100)
    assert (lors.decoder.num_groups, lors.decoder.in_points) == (4, 32)
    assert lors.lors.adaptive.enabled and lors.lors.static.enabled
    assert (vanilla.decoder.num_groups, vanilla.decoder.in_points) == (2, 64)
    assert not vanilla.lors.adaptive.enabled and not vanilla.lors.static.enabled


def test_bad_arguments_are_named(bench, capsys):
    for argv, words in ((["--layouts", "2by64"], "GROUPSxPOINTS"), (["--size", "800"], "HxW"),
                        (["--repeats", "0"], ">= 1"), (["--device", "banana"], "not a device")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert words in capsys.readouterr().err


def test_a_toy_run_writes_every_ratio(bench, tmp_path, capsys):
    out = tmp_path / "perf.json"
    assert bench.main(["--size", "64x96", "--queries", "4", "--repeats", "1", "--decoder-repeats", "2",
                       "--warmup", "0", "--layouts", "2x64", "--no-memory", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {row["kind"]: row for row in result["rows"]}
    assert set(rows) == {"vanilla", "lors", "merged"}
    assert rows["vanilla"]["train_ratio"] == rows["vanilla"]["decoder_ratio"] == 1.0
    assert rows["lors"]["train_ratio"] > 0 and rows["merged"]["decoder_ratio"] > 0
    assert "train_ratio" not in rows["merged"]  # a merged model is timed for inference only
    assert len(result["raw_seconds"]["decoder"]["2x64"]["merged"]) == 2
    printed = capsys.readouterr().out
    assert "(c) decoder, LORS merged 2x64 / vanilla" in printed


def test_peak_memory_of_a_merged_model_counts_vanilla_parameters(bench):
    merged = bench.peak_memory("merged", "2x64", "infer", 4, 1, (64, 96), "fp32", "cpu")
    vanilla = bench.layout_config("vanilla", "2x64", 4)
    from lors.core.count import count_parameters
    from lors.models.adamixer import build_detector
    assert merged["params"] == count_parameters(build_detector(vanilla, device="meta")).total
    assert merged["infer_peak_mib"] > 0 and "train_peak_mib" not in merged
