"""Bad input and faults in the newer commands (lm, vit, convert, PEFT): each gives one line that
names the problem and the fix, and nothing is lost."""
import pytest

from lors.cli import main
from lors.models.gpt import load_lm_config


@pytest.mark.parametrize("override, message", [
    ("train.clip_grad=-1", "'train.clip_grad' must be >= 0 \\(0 disables clipping\\)"),
    ("train.weight_decay=-5", "'train.weight_decay' must be >= 0"),
])
def test_negative_clipping_and_weight_decay_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_lm_config("gpt_small", [override])


def test_a_warm_up_as_long_as_the_run_is_warned_about():
    with pytest.warns(UserWarning, match="train.warmup_steps=50 is not below train.steps=20: the learning rate "
                                         "never reaches"):
        load_lm_config("gpt_small", ["train.steps=20"])


@pytest.mark.parametrize("device, message", [
    ("banana", "--device 'banana' is not a device: use cpu, cuda or cuda:N"),
    ("cuda", "torch sees no CUDA GPU here"),
])
def test_a_bad_device_is_one_line(device, message, tmp_path, capsys):
    import torch
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["lm", "train", "--config", "gpt_small", "--device", device, "--run-dir", str(tmp_path / "r"),
                 "train.steps=1", "train.warmup_steps=0"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_vit_train_extends_a_finished_run_as_its_refusal_says(tmp_path, capsys):
    from test_vit import TINY, write_fashion
    root = write_fashion(tmp_path)
    base = ["vit", "train", "--run-dir", str(tmp_path / "run"), *TINY, f"data.root={root}"]
    assert main(base) == 0
    assert main([*base, "train.steps=6"]) == 2
    assert "pass --extend" in capsys.readouterr().err
    assert main([*base, "train.steps=6", "--extend"]) == 0
    assert "6 steps in" in capsys.readouterr().out


def test_a_nan_loss_is_one_line_whose_hint_a_rerun_can_follow(tmp_path, capsys):
    from test_gpt import TINY, write_corpus
    base = ["lm", "train", "--config", "gpt_small", "--run-dir", str(tmp_path / "run"), *TINY,
            f"data.corpus={write_corpus(tmp_path)}", "train.clip_grad=0"]
    assert main([*base, "train.lr=1e30"]) == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err and "--no-resume" in err and "Traceback" not in err
    assert main([*base, "train.lr=1e-3", "--no-resume"]) == 0  # what the hint says works


def test_an_os_error_is_one_line_and_lors_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import errno

    from lors.engine import loop

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "log.csv"))

    monkeypatch.setattr(loop.RunLog, "__init__", full_disk)  # the log is written before any checkpoint
    from test_gpt import TINY, write_corpus
    argv = ["lm", "train", "--run-dir", str(tmp_path / "run"), *TINY, f"data.corpus={write_corpus(tmp_path)}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "log.csv" in err and "free space" in err
    assert "Traceback" not in err
    monkeypatch.setenv("LORS_DEBUG", "1")
    with pytest.raises(OSError, match="No space left"):
        main(argv)


def test_a_run_read_by_the_wrong_command_names_the_command_it_belongs_to(tmp_path, capsys):
    from test_gpt import TINY as LM_TINY, write_corpus
    from test_vit import TINY, write_fashion
    vit_run, lm_run = tmp_path / "vit", tmp_path / "lm"
    assert main(["vit", "train", "--run-dir", str(vit_run), *TINY, f"data.root={write_fashion(tmp_path)}"]) == 0
    assert main(["lm", "train", "--run-dir", str(lm_run), *LM_TINY, f"data.corpus={write_corpus(tmp_path)}"]) == 0
    capsys.readouterr()
    for argv in (["lm", "eval", "--checkpoint", str(vit_run)], ["lm", "sample", "--checkpoint", str(vit_run)]):
        assert main(argv) == 2
        assert "holds a run of `lors vit train`, not of `lors lm train`" in capsys.readouterr().err
    assert main(["detect", "eval", "--checkpoint", str(lm_run)]) == 2
    assert "holds a run of `lors lm train`, not of `lors detect train`: read it with lors lm eval" in \
        capsys.readouterr().err


# ---- lors convert ----

@pytest.fixture
def tiny_llama(tmp_path):
    from test_convert_cli import TEXT, _llama, _tokenizer
    folder = tmp_path / "tiny"
    _llama(64).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    (tmp_path / "calib.txt").write_text(TEXT)
    return folder


def _convert(model, out, *extra):
    return main(["convert", str(model), "--out", str(out), "--calib-tokens", "64", "--seq-len", "16", *extra])


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "c.bin").write_bytes(b"abc\x00\x01" * 100) and d / "c.bin", "looks binary"),
    (lambda d: (d / "c.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50) and d / "c.txt", "is not UTF-8"),
    (lambda d: (d / "texts").mkdir() or d / "texts", "is a folder, not a text file"),
    (lambda d: d / "missing.txt", "does not exist"),
])
def test_a_bad_calibration_text_is_named(tiny_llama, tmp_path, capsys, make, message):
    assert _convert(tiny_llama, tmp_path / "out", "--calibration", str(make(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "calibration text" in err and message in err


def test_rank_0_is_refused_instead_of_keeping_nothing(tiny_llama, tmp_path, capsys):
    assert _convert(tiny_llama, tmp_path / "out", "--rank", "0") == 2
    assert "keeps nothing of the layers" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_finished_uptrained_conversion_is_not_overwritten_by_another_run(tiny_llama, tmp_path, capsys):
    out, calib = tmp_path / "out", ["--calibration", str(tmp_path / "calib.txt")]
    assert _convert(tiny_llama, out, *calib, "--uptrain-steps", "2", "--uptrain-batch", "2") == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert _convert(tiny_llama, out, *calib) == 2  # the same conversion without the uptraining
    err = capsys.readouterr().err
    assert "holds a finished conversion with other settings (uptraining:" in err and "another --out" in err
    assert (out / "model.safetensors").read_bytes() == before
    assert _convert(tiny_llama, out, *calib, "--uptrain-steps", "2", "--uptrain-batch", "2") == 0  # same run: fine


def test_the_uptraining_refusal_names_convert_flags(tiny_llama, tmp_path, capsys):
    import shutil
    out, calib = tmp_path / "out", ["--calibration", str(tmp_path / "calib.txt")]
    assert _convert(tiny_llama, out, *calib, "--uptrain-steps", "2", "--uptrain-batch", "2") == 0
    (out / "conversion.json").unlink()  # as if it had stopped during the uptraining
    capsys.readouterr()
    assert _convert(tiny_llama, out, *calib, "--uptrain-steps", "2", "--uptrain-batch", "2", "--uptrain-lr", "1e-3") == 2
    err = capsys.readouterr().err
    assert "--uptrain-lr 0.0001 -> 0.001" in err and "another --out" in err and "--run-dir" not in err
    assert _convert(tiny_llama, out, *calib) == 2  # no uptraining: it would leave the unfinished one stale
    assert "holds an unfinished uptraining" in capsys.readouterr().err
    shutil.rmtree(out)


def test_a_malformed_config_json_is_named(tiny_llama, tmp_path, capsys):
    (tiny_llama / "config.json").write_text("{not json")
    assert _convert(tiny_llama, tmp_path / "out") == 2
    assert f"{tiny_llama / 'config.json'} is not valid JSON" in capsys.readouterr().err


def test_a_folder_without_a_tokenizer_converts_without_text_and_says_why_text_needs_one(tiny_llama, tmp_path, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tiny_llama / name).unlink(missing_ok=True)
    assert _convert(tiny_llama, tmp_path / "out") == 2
    assert "has no tokenizer that transformers can load" in capsys.readouterr().err
    assert _convert(tiny_llama, tmp_path / "out", "--calib-tokens", "0") == 0  # weight-space SVD: no text


def test_eval_tokens_on_an_encoder_is_measured_not_ignored(tmp_path, capsys):
    """--eval-tokens on an encoder measures what an encoder is judged by (the cosine of its
    sentence embeddings to the original's), instead of being dropped silently."""
    import json
    from transformers import BertConfig, BertModel
    from test_convert_cli import _tokenizer
    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    assert _convert(folder, tmp_path / "out", "--calib-tokens", "0", "--eval-tokens", "64") == 0
    held = json.loads((tmp_path / "out" / "conversion.json").read_text())["held_out_cosine"]
    assert held["original"] == pytest.approx(1.0) and 0.0 < held["converted"] < 1.0 and held["tokens"] >= 64
    assert "perplexity" not in capsys.readouterr().out


def test_an_image_model_is_refused_with_what_to_do(tmp_path, capsys):
    from transformers import ViTConfig, ViTModel
    folder = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(folder)
    assert _convert(folder, tmp_path / "out", "--calib-tokens", "0") == 2
    err = capsys.readouterr().err
    assert "reads pixel_values" in err and "lors.convert_layers" in err


# ---- ViT data ----

@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(b"not gzip at all"), "is not a readable gzip file"),
    (lambda f: f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2]), "is not a readable gzip file"),
    ("short", "the file is truncated or damaged"),
])
def test_a_damaged_fashion_mnist_file_is_named(tmp_path, damage, message):
    import gzip

    from lors.data.fashion import load_fashion_mnist
    from test_vit import write_fashion
    root = write_fashion(tmp_path)
    f = root / "train-images-idx3-ubyte.gz"
    if damage == "short":  # a valid gzip of a cut idx file
        data = gzip.decompress(f.read_bytes())
        f.write_bytes(gzip.compress(data[:-100]))
    else:
        damage(f)
    with pytest.raises(ValueError, match=f"{f}.*{message}"):
        load_fashion_mnist("train", root)


@pytest.mark.parametrize("override, message", [
    ("model.num_classes=5", "set model.num_classes=10"),
    ("model.in_chans=3", "set model.in_chans=1"),
])
def test_vit_settings_that_do_not_fit_the_data_are_named_before_the_run_starts(tmp_path, capsys, override, message):
    from test_vit import TINY, write_fashion
    run = tmp_path / "run"
    assert main(["vit", "train", "--run-dir", str(run), *TINY, f"data.root={write_fashion(tmp_path)}", override]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()  # no config.yaml, log.csv or tb/ left behind


# ---- Serial LoRA and PEFT ----

def _bert():
    transformers = pytest.importorskip("transformers")
    import torch
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64))


def test_get_peft_model_on_a_model_adapted_by_inject_names_the_cause():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from lors.adapters import serial_lora as sl
    from lors.adapters.peft import SerialLoraConfig
    model = _bert()
    sl.inject(model, rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="already has Serial LoRA adapters .*adapt a fresh base model"):
        get_peft_model(model, SerialLoraConfig(r=4))


def test_inject_on_a_lors_shared_model_names_the_shared_projections():
    import lors
    from lors.adapters import serial_lora as sl
    model = _bert()
    lors.share_layers(model.encoder.layer, targets=["attention.self.query", "attention.self.key",
                                                    "attention.self.value"], rank=4)
    with pytest.raises(ValueError, match="projections are LORS-shared .*LorsLinear.*lors.merge\\(model\\)"):
        sl.inject(model, rank=4, alpha=8.0)


def test_a_saved_peft_adapter_says_what_to_import(tmp_path):
    pytest.importorskip("peft")
    import json

    from peft import get_peft_model

    from lors.adapters.peft import SerialLoraConfig
    get_peft_model(_bert(), SerialLoraConfig(r=4)).save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SERIAL_LORA" and "import lors.adapters.peft" in config["load_with"]


def test_a_binary_config_file_is_named(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"\x00\x01\xff\xfe binary")
    assert main(["lm", "train", "--config", str(bad)]) == 2
    assert f"config {bad} is not a UTF-8 text file" in capsys.readouterr().err
