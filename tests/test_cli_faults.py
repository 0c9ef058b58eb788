"""Bad command lines get one clear line and exit code 2; `--json` output is JSON alone."""
import json

import pytest

from lors.cli import build_parser, main


def refused(capsys, argv) -> str:
    """The one-line error of a command line that argparse refuses (exit code 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [[], ["detect"], ["detect", "train"], ["detect", "eval"], ["detect", "predict"],
                                  ["detect", "compare"], ["detect", "ablate"], ["detect", "data"], ["params"],
                                  ["params", "table1"], ["params", "detect"], ["finetune"]])
def test_every_command_still_prints_its_help(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lors {' '.join(argv)}".rstrip())


def test_overrides_may_come_before_between_and_after_flags():
    args = build_parser().parse_args(["detect", "train", "--config", "tiny", "a=1", "--no-eval", "b=2"])
    assert args.overrides == ["a=1", "b=2"] and args.no_eval and args.config == "tiny"
    args = build_parser().parse_args(["detect", "compare", "a=1", "--quiet", "b=2", "--seeds", "0", "1"])
    assert args.overrides == ["a=1", "b=2"] and args.quiet and args.seeds == [0, 1]
    args = build_parser().parse_args(["params", "detect", "a=1", "--config", "tiny", "b=2", "--json"])
    assert args.overrides == ["a=1", "b=2"] and args.json


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("device", ["banana", "cuda:x", "gpu"])
def test_unknown_device_is_refused(capsys, command, device):
    where = ["--config", "tiny"] if command == "train" else ["--checkpoint", "run"]
    line = refused(capsys, ["detect", command, *where, "--device", device])
    assert f"argument --device: unknown device {device!r}: use cpu, cuda, cuda:N" in line


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps"])
def test_valid_devices_parse(device):
    assert build_parser().parse_args(["detect", "train", "--config", "tiny", "--device", device]).device == device


@pytest.mark.parametrize("command", ["compare", "ablate"])
@pytest.mark.parametrize("flag, value", [("--max-steps", "0"), ("--jobs", "0"), ("--jobs", "-1")])
def test_bench_counts_must_be_positive(capsys, monkeypatch, command, flag, value):
    monkeypatch.setattr(f"lors.experiments.detection.bench.{command}", lambda *a, **k: pytest.fail("must not run"))
    suite = ["--suite", "table4"] if command == "ablate" else []
    line = refused(capsys, ["detect", command, *suite, flag, value])
    assert f"argument {flag}: expected a positive integer, got '{value}'" in line


@pytest.mark.parametrize("out, message", [("result", "'result' has no extension"),
                                          ("result.gif", "'result.gif' ends in '.gif'")])
def test_predict_out_needs_an_image_extension(capsys, monkeypatch, tmp_path, out, message):
    monkeypatch.setattr("lors.experiments.detection.predict.predict_image", lambda *a: pytest.fail("must not run"))
    line = refused(capsys, ["detect", "predict", "--checkpoint", str(tmp_path), "--image", "x.png",
                            "--out", str(tmp_path / out)])
    assert message.replace("'", "") in line.replace("'", "").replace(str(tmp_path) + "/", "")
    assert f"e.g. {tmp_path / 'result.png'}" in line
    assert list(tmp_path.iterdir()) == []


def test_bad_config_values_stop_train_before_it_starts(capsys, monkeypatch):
    monkeypatch.setattr("lors.experiments.detection.train.train", lambda *a, **k: pytest.fail("train must not start"))
    for override, message in [("train.batch_size=-2", "config key 'train.batch_size' must be >= 1"),
                              ("train.epochs=0", "config key 'train.epochs' must be >= 1")]:
        assert main(["detect", "train", "--config", "tiny", override]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lors detect: error: {message}") and err.count("\n") == 1


def test_train_json_prints_only_json_on_stdout(capsys, monkeypatch):
    def fake_train(cfg, **kwargs):
        print("Average Precision  (AP) @[ IoU=0.50:0.95 ] = 0.5")  # as COCOeval's summarize does
        return {"steps": 2, "metrics": {"AP": 0.5}}

    monkeypatch.setattr("lors.experiments.detection.train.train", fake_train)
    assert main(["detect", "train", "--config", "tiny", "--json", "--no-eval"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"steps": 2, "metrics": {"AP": 0.5}}
    assert "Average Precision" in captured.err
    assert main(["detect", "train", "--config", "tiny", "--no-eval"]) == 0  # without --json: stdout
    assert "Average Precision" in capsys.readouterr().out


def test_eval_json_prints_only_json_on_stdout(capsys, monkeypatch):
    from lors.models.adamixer import load_detector_config

    def fake_evaluate(ckpt, cfg, dev, verbose=True, **kwargs):
        print("Average Precision  (AP) @[ IoU=0.50:0.95 ] = 0.5")
        return {"AP": 0.5}

    monkeypatch.setattr("lors.experiments.detection.evaluate.run_config", lambda path, ov: (path, load_detector_config("tiny"), {}))
    monkeypatch.setattr("lors.experiments.detection.evaluate.evaluate_checkpoint", fake_evaluate)
    assert main(["detect", "eval", "--checkpoint", "run", "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"AP": 0.5} and "Average Precision" in captured.err
