"""The fine-tuning comparison on a tiny random BERT and made-up fortune files (no MiniLM, no apt data)."""
import argparse

import pytest
import torch

from lors.commands import finetune as cmd
from lors.data.text import load_fortunes, read_fortune_file
from lors.experiments.finetune import FinetuneConfig, finetune, length_grouped_batches

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

WORDS = ["cpu", "disk", "bug", "bread", "soup", "cake", "judge", "court", "lawyer"]


def write_fortunes(root, per_class: int = 6) -> None:
    for c, words in (("computers", WORDS[:3]), ("food", WORDS[3:6]), ("law", WORDS[6:])):
        entries = [f"{words[i % 3]} {words[(i + 1) % 3]} number {i}\n  second line" for i in range(per_class)]
        entries.append("shared entry")  # in every file: has no single label, must be dropped
        (root / c).write_text("\n%\n".join(entries) + "\n%\n")


def tiny_loader(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "number", "second", "line",
                                *WORDS, *map(str, range(10))]))

    def load():
        torch.manual_seed(0)
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
        cfg = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64)
        return transformers.BertModel(cfg, add_pooling_layer=False), tok
    return load


def test_fortune_split_is_balanced_disjoint_and_drops_shared_entries(tmp_path):
    write_fortunes(tmp_path)
    assert read_fortune_file(tmp_path / "food")[0] == "bread soup number 0 second line"
    train, test = load_fortunes(("computers", "food", "law"), 4, 2, root=tmp_path)
    assert train.labels == [0] * 4 + [1] * 4 + [2] * 4 and test.labels == [0] * 2 + [1] * 2 + [2] * 2
    assert not set(train.texts) & set(test.texts)
    assert "shared entry" not in train.texts + test.texts
    with pytest.raises(ValueError, match="fewer than 5 \\+ 2"):
        load_fortunes(("computers", "food", "law"), 5, 2, root=tmp_path)
    with pytest.raises(ValueError, match="apt-get install fortunes"):
        load_fortunes(("computers",), root=tmp_path / "missing")


def test_length_grouped_batches_cover_each_example_once():
    lengths = torch.randint(1, 64, (50,))
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0), group=2)
    assert sorted(torch.cat(batches).tolist()) == list(range(50))
    assert all(len(b) <= 8 for b in batches)


def test_three_methods_train_and_serial_is_a_quarter_of_lora(tmp_path):
    write_fortunes(tmp_path)
    train, test = load_fortunes(("computers", "food", "law"), 4, 2, root=tmp_path)
    out = {m: finetune(FinetuneConfig(method=m, rank=4, steps=3, batch_size=4, max_len=16), train, test,
                       progress=False, load=tiny_loader(tmp_path))
           for m in ("full", "lora", "serial-lora")}
    assert out["serial-lora"]["adapter_params"] * 4 == out["lora"]["adapter_params"] == 2 * 4 * 2 * 32 * 4
    assert out["full"]["adapter_params"] > out["lora"]["adapter_params"]
    head = 32 * 3 + 3
    assert all(r["trainable_params"] - r["adapter_params"] == head for r in out.values())
    assert all(0.0 <= r["accuracy"] <= 100.0 and r["train_time_s"] > 0 for r in out.values())


def test_report_plot_and_command_line(tmp_path):
    runs = [{"method": m, "rank": r, "seed": s, "adapter_params": p, "trainable_params": p + 10,
             "accuracy": a + s, "train_time_s": 1.0, "peak_mem_mib": 5.0}
            for m, r, p, a in (("full", 8, 1000, 90.0), ("lora", 4, 400, 80.0), ("serial-lora", 4, 100, 79.5))
            for s in (0, 1)]
    meta = {"command": "lors finetune ...", "machine": "CPU, 2 cores", "seeds": [0, 1], "classes": ["a", "b"],
            "train_size": 4, "test_size": 2, "steps": 3, "batch_size": 2, "max_len": 8, "lr": 1e-3, "head_lr": 1e-3,
            "alpha": 8, "lora_plus_ratio": 1.0}
    cmd.write_plot(cmd.summarize(runs), tmp_path / "p.png")
    cmd.write_report(runs, meta, tmp_path / "r.md", tmp_path / "p.png")
    text = (tmp_path / "r.md").read_text()
    assert "| serial-lora | 4 | 100 |" in text and "**80.00**" in text
    assert "0.25 of LoRA's 400" in text and "(-0.50 points" in text and "at most 1 point below" in text
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    ns = argparse.Namespace(method=["lora"], ranks=[4], seeds=[0], alpha=None, steps=10, batch_size=2, max_len=8,
                            lr=None, head_lr=1e-3, lora_plus_ratio=1.0, train_per_class=4, test_per_class=2,
                            device="cpu", threads=None, adapt_out=False, report=None, plot=None, json_path="x.json")
    assert cmd.command_line(ns).startswith("lors finetune --method lora --ranks 4 --seeds 0 --steps 10")
    assert cmd.command_line(ns).endswith("--json x.json")
