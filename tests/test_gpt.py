"""The GPT language model: closed-form parameter counts (dense, LORS, tied), merged LORS equals
unmerged, exact resume, tied weights through a checkpoint, and the corpus errors."""
import csv

import pytest
import torch

from lors import count_parameters, merge
from lors.cli import main
from lors.data.corpus import decode, encode, load_corpus
from lors.experiments.lm.train import load_lm, train
from lors.models.gpt import build_gpt, load_lm_config

TINY = ["model.n_layer=3", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=4",
        "train.steps=6", "train.warmup_steps=2", "train.checkpoint_every=2", "train.eval_batches=2"]


def write_corpus(root, n: int = 60):
    lines = [f"fortune number {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(n)]
    (root / "corpus.txt").write_text("\n\n".join(lines))
    return root / "corpus.txt"


def config(name, tmp_path, *extra):
    return load_lm_config(name, [*TINY, f"data.corpus={write_corpus(tmp_path)}", *extra])


def non_embedding(model) -> int:
    return count_parameters(model).total - model.wte.weight.numel() - (model.wpe.weight.numel() if model.wpe else 0)


@pytest.mark.parametrize("sharing", ["none", "lors", "tied"])
def test_parameter_counts_match_their_closed_form(tmp_path, sharing):
    cfg = config("gpt_small", tmp_path, f"model.sharing={sharing}", "lors.rank=4", "lors.groups=2")
    model = build_gpt(cfg)
    n, c, r, k = cfg.model.n_layer, cfg.model.n_embd, 4, 2
    shapes = {"attn.qkv": (c, 3 * c), "attn.proj": (c, c), "mlp.fc1": (c, 4 * c), "mlp.fc2": (4 * c, c)}
    norms = n * 4 * c + 2 * c  # ln1, ln2 per block (weight + bias), ln_f
    if sharing == "none":
        expected = n * sum(i * o + o for i, o in shapes.values()) + norms
    elif sharing == "lors":  # shared weight once, per layer: K rank-r pairs and a bias
        expected = sum(i * o + n * (k * r * (i + o) + o) for i, o in shapes.values()) + norms
    else:  # tied: weights once, biases per layer
        expected = sum(i * o + n * o for i, o in shapes.values()) + norms
    assert non_embedding(model) == expected
    assert count_parameters(model).total == expected + 256 * c + cfg.model.block_size * c  # tied lm_head


def test_merged_lors_gives_the_same_logits_and_the_same_greedy_text(tmp_path):
    cfg = config("gpt_small_lors", tmp_path, "lors.rank=4")
    torch.manual_seed(0)
    model = build_gpt(cfg).eval()
    for p in model.parameters():  # a trained-looking model: private parts non-zero
        p.data.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 256, (2, 12))
    before = model(idx)
    greedy = model.generate(idx[:, :4], 10)
    merge(model)
    torch.testing.assert_close(model(idx), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(idx[:, :4], 10), greedy)


def _losses(run):
    with open(run / "log.csv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def test_a_resumed_run_logs_the_uninterrupted_losses(tmp_path):
    cfg = config("gpt_small_lors", tmp_path)
    train(cfg, tmp_path / "whole", progress=False, evaluate_at_end=False)
    train(cfg, tmp_path / "cut", stop_after=3, progress=False, evaluate_at_end=False)
    train(cfg, tmp_path / "cut", progress=False, evaluate_at_end=False)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole") and len(_losses(tmp_path / "whole")) == 6


def test_tied_weights_survive_a_checkpoint_and_stay_tied(tmp_path):
    cfg = config("gpt_small_tied", tmp_path)
    summary = train(cfg, tmp_path / "run", progress=False)
    model, _, _ = load_lm(tmp_path / "run")
    assert model.lm_head.weight is model.wte.weight
    assert model.blocks[2].mlp.fc1.weight is model.blocks[0].mlp.fc1.weight
    assert model.blocks[2].mlp.fc1.bias is not model.blocks[0].mlp.fc1.bias
    assert summary["metrics"]["val_bpb"] > 0


def test_cli_trains_evaluates_and_samples_the_same_text_merged(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    assert main(["lm", "train", "--config", "gpt_small_lors", "--run-dir", str(run), *TINY,
                 f"data.corpus={corpus}"]) == 0
    assert "val bits per byte" in capsys.readouterr().out
    assert main(["lm", "eval", "--checkpoint", str(run)]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["lm", "sample", "--checkpoint", str(run), "--prompt", "the ", "--tokens", "12"]) == 0
    plain = capsys.readouterr().out
    assert main(["lm", "sample", "--checkpoint", str(run), "--prompt", "the ", "--tokens", "12", "--merged"]) == 0
    assert capsys.readouterr().out == plain


def test_bytes_round_trip():
    assert decode(encode("naïve café")) == "naïve café"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nothing_here", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no files"),
    (lambda d: (d / "blank.txt").write_text("\n\n  \n") and d / "blank.txt", "is empty"),
    (lambda d: (d / "short.txt").write_text("tiny") and d / "short.txt", "fewer than one context window"),
    (lambda d: (d / "b.bin").write_bytes(b"\x00\x01\x02" * 50) and d / "b.bin", "looks binary"),
    (lambda d: (d / "late.txt").write_bytes(b"plain text\n\n" * 500 + b"\x00\x01") and d / "late.txt",
     "looks binary"),  # the NUL byte comes after the first 4 KiB
    (lambda d: (d / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50) and d / "latin.txt",
     "is not UTF-8"),
])
def test_every_bad_corpus_gives_its_named_error(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        load_corpus(make(tmp_path), context=16)


def test_a_missing_fortunes_package_says_how_to_install_it(monkeypatch, tmp_path):
    import lors.data.corpus as corpus
    monkeypatch.setattr(corpus, "FORTUNES_DIR", tmp_path / "no_fortunes")
    with pytest.raises(ValueError, match="apt-get install fortunes"):
        load_corpus(None)


def test_compare_writes_the_table_summary_and_both_plots(tmp_path):
    from lors.experiments.lm.compare import compare_lm
    corpus = write_corpus(tmp_path)
    out = tmp_path / "cmp"
    summary = compare_lm(seeds=[0], out=out, overrides=[*TINY, f"data.corpus={corpus}", "train.eval_every=3"],
                      jobs=1, quiet=True)
    rows = {r["model"]: r for r in summary["rows"]}
    assert list(rows) == ["dense", "LORS", "tied", "dense-small"]
    assert rows["tied"]["non_embedding_params"] < rows["LORS"]["non_embedding_params"] < rows["dense"]["non_embedding_params"]
    depth, width = rows["dense-small"]["depth_x_width"].split(" x ")
    assert (int(depth), int(width)) != (3, 32) and int(depth) <= 3 and int(width) <= 32  # narrower or shallower
    assert rows["dense-small"]["sharing"] == "none"
    assert all(r["val_bpb"] > 0 and [s for s, _ in r["curve"]] == [3, 6] for r in rows.values())
    for png in ("metric_vs_params.png", "val_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dense-small |" in (out / "table.md").read_text()


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg, x, y, out):
    import os

    from lors.experiments.lm.train import lm_loss
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_gpt(cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = slice(rank * 2, rank * 2 + 2)
    lm_loss(ddp, x[half], y[half]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    torch.distributed.destroy_process_group()


def test_two_process_ddp_step_equals_one_process_on_the_combined_batch(tmp_path):
    import torch.multiprocessing as mp

    from lors.experiments.lm.train import lm_loss, step_batch
    cfg = config("gpt_small_lors", tmp_path)
    x, y = step_batch(load_corpus(cfg.data.corpus, context=16).train, cfg, step=0)  # 4 windows
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, x, y, out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = build_gpt(cfg)
    lm_loss(model, x, y).backward()
    ddp_grads = torch.load(out)
    assert len(ddp_grads) == sum(p.grad is not None for p in model.parameters()) > 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lors_shared_weights_start_as_the_dense_gpt_linears_do():
    import math
    cfg = load_lm_config("gpt_small_lors")
    model = build_gpt(cfg)
    n = cfg.model.n_layer
    qkv, proj = model.blocks[0].attn.qkv.lors, model.blocks[0].attn.proj.lors
    assert abs(qkv.shared_weight.std().item() - 0.02) < 0.002
    assert abs(proj.shared_weight.std().item() - 0.02 / math.sqrt(2 * n)) < 0.001  # a residual projection
    assert qkv.bias.abs().max() == 0 and all(a.abs().max() == 0 for a in qkv.A)  # layers start equal


def test_a_bpe_run_trains_evaluates_in_bits_per_byte_and_samples_text(tmp_path):
    pytest.importorskip("tokenizers")
    from lors.experiments.lm.train import evaluate_run, load_tokens, sample
    cfg = config("gpt_small", tmp_path, "data.tokenizer=bpe", "model.vocab_size=300")
    tokens = load_tokens(cfg)
    assert tokens.vocab_size == 300 and tokens.bytes_per_token > 1.5  # merges: fewer tokens than bytes
    assert tokens.decode(tokens.encode("the quick brown fox")) == "the quick brown fox"
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["metrics"] == pytest.approx(evaluate_run(tmp_path / "run"))  # the stored BPE is reused
    text = sample(tmp_path / "run", "the ", 8)
    assert isinstance(text, str) and text == sample(tmp_path / "run", "the ", 8, merged=True)


def test_byte_tokens_need_vocab_256_and_a_bpe_needs_more():
    with pytest.raises(ValueError, match="byte tokens need 256"):
        load_lm_config("gpt_small", ["model.vocab_size=300"])
    with pytest.raises(ValueError, match="BPE needs model.vocab_size > 256"):
        load_lm_config("gpt_small", ["data.tokenizer=bpe"])


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_the_gpt_is_causal_with_either_position_encoding(tmp_path, positions):
    cfg = config("gpt_small_lors", tmp_path, f"model.positions={positions}")
    torch.manual_seed(0)
    model = build_gpt(cfg).eval()
    idx = torch.randint(0, 256, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :8], model(idx)[:, :8])  # the future is not seen
        assert not torch.allclose(model(changed)[:, 8:], model(idx)[:, 8:])
    assert (model.wpe is None) == (positions == "rotary")


def test_a_run_refuses_to_resume_on_a_corpus_that_changed_under_its_path(tmp_path):
    cfg = config("gpt_small", tmp_path, "train.steps=4")
    train(cfg, tmp_path / "run", stop_after=2, progress=False, evaluate_at_end=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus.read_text().replace("lazy dog", "sleepy cat"))
    with pytest.raises(ValueError, match="is not the one the run in .* was trained on.*--no-resume"):
        train(cfg, tmp_path / "run", progress=False, evaluate_at_end=False)
    train(cfg, tmp_path / "run", resume=False, progress=False, evaluate_at_end=False)  # afresh: fine


def test_sweep_puts_lors_ranks_against_the_dense_front(tmp_path):
    from lors.experiments.lm.compare import sweep_lm
    corpus = write_corpus(tmp_path)
    out = tmp_path / "sweep"
    summary = sweep_lm(seeds=[0], out=out, widths=[16, 32], ranks=[2, 4], alloc=None,
                       overrides=[*TINY, f"data.corpus={corpus}", "train.eval_every=3"], jobs=1, quiet=True)
    rows = {r["model"]: r for r in summary["rows"]}
    assert list(rows) == ["dense-16", "dense-32", "LORS-r2", "LORS-r4"] and summary["base"] == "dense-32"
    assert rows["LORS-r2"]["non_embedding_params"] < rows["LORS-r4"]["non_embedding_params"] < \
        rows["dense-32"]["non_embedding_params"]
    # LORS computes what the dense model of its width computes, and a little more
    assert rows["dense-16"]["train_flops_per_unit"] < rows["dense-32"]["train_flops_per_unit"] < \
        rows["LORS-r2"]["train_flops_per_unit"] < rows["LORS-r4"]["train_flops_per_unit"]
    front = [(rows[d]["non_embedding_params"], rows[d]["val_bpb"]) for d in ("dense-16", "dense-32")]
    for name in ("LORS-r2", "LORS-r4"):
        v, r = summary["verdicts"][name], rows[name]
        assert min(y for _, y in front) <= v["dense_front"] <= max(y for _, y in front)
        assert v["beats_front"] == (r["val_bpb"] < v["dense_front"])
        assert v["vs_dense"] == pytest.approx(r["val_bpb"] - rows["dense-32"]["val_bpb"])
    for png in ("metric_vs_params.png", "metric_vs_flops.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| LORS-r4 |" in (out / "table.md").read_text()


def test_the_dense_front_is_interpolated_in_log_parameters_and_not_extrapolated():
    from lors.experiments.sweep import front_at
    points = [(1000, 3.0), (10, 1.0)]
    assert front_at(points, 100) == pytest.approx(2.0)
    assert front_at(points, 10) == 1.0 and front_at(points, 1000) == 3.0
    assert front_at(points, 5) is None and front_at(points, 2000) is None


@pytest.mark.parametrize("widths, ranks, message", [
    ([16], [2], "must include the LORS model's width"),
    ([32, 32], [2], "distinct positive integers"),
    ([32], [], "at least one"),
])
def test_a_sweep_with_bad_widths_or_ranks_is_refused_before_training(tmp_path, widths, ranks, message):
    from lors.experiments.lm.compare import sweep_lm
    with pytest.raises(ValueError, match=message):
        sweep_lm(seeds=[0], out=tmp_path / "sweep", widths=widths, ranks=ranks, alloc=None,
                 overrides=[*TINY, f"data.corpus={write_corpus(tmp_path)}"], jobs=1, quiet=True)
    assert not (tmp_path / "sweep").exists()


def test_val_curves_keep_one_row_per_step_and_average_over_the_steps_all_seeds_have(tmp_path):
    from lors.experiments.compare import mean_curve, val_curve
    (tmp_path / "val.csv").write_text("step,val_bpb\n3,5.0\n6,4.0\n6,4.5\n")  # step 6 evaluated twice
    assert val_curve(tmp_path, "val_bpb") == [(3, 5.0), (6, 4.5)]
    assert mean_curve([[(3, 5.0), (6, 4.5)], [(3, 3.0), (6, 2.5), (9, 1.0)]]) == [(3, 4.0), (6, 3.5)]
