"""One FSDP2 step against one process, on this machine's CPU (gloo, 2 processes).

For the project's GPT preset (gpt_small_lors at a toy size) and an HF Llama from a config, both
LORS-shared, one step under `lors.engine.distributed.shard` (each layer, then the root) on two
halves of a batch is compared with one process on the whole batch: the largest relative
gradient difference and the largest weight difference after one AdamW step. Prints one line
per model; the figures in docs/core.md come from it.

    .venv/bin/python benchmarks/fsdp_step.py
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

import lors
from lors.engine import distributed
from lors.engine.loop import adamw

LLAMA = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64)
GPT = ["model.n_layer=3", "model.n_embd=32", "model.n_head=2", "model.block_size=16"]


def build(kind: str, corpus: str):
    torch.manual_seed(0)
    if kind == "llama":
        import transformers
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
        lors.share_layers(model.model.layers, rank=4)
        with torch.no_grad():  # non-zero private factors
            for name, p in model.named_parameters():
                if ".lors." in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
        return model, lambda m, x: m(input_ids=x, labels=x).loss
    from lors.experiments.lm.train import lm_loss
    from lors.models.gpt import build_gpt, load_lm_config
    model = build_gpt(load_lm_config("gpt_small_lors", [*GPT, f"data.corpus={corpus}"]))
    return model, lambda m, x: lm_loss(m, x[:, :-1], x[:, 1:])


def batch() -> torch.Tensor:
    return torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))


def worker(rank: int, port: int, kind: str, corpus: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model, loss_fn = build(kind, corpus)
    opt = adamw(model, 1e-3, 0.1)
    distributed.shard(model, opt)
    loss_fn(model, batch()[rank * 2:rank * 2 + 2]).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    opt.step()
    state, _ = distributed.full_state(model, opt)
    if rank == 0:
        torch.save({"grads": grads, "state": state}, out)
    torch.distributed.barrier()  # neither process tears the group down while the other still uses it
    torch.distributed.destroy_process_group()


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(60)))
    for kind in ("gpt", "llama"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp / f"{kind}.pt"
        mp.spawn(worker, args=(port, kind, str(corpus), str(out)), nprocs=2, join=True)
        got = torch.load(out)
        model, loss_fn = build(kind, str(corpus))
        opt = adamw(model, 1e-3, 0.1)
        loss_fn(model, batch()).backward()
        grad = max(((got["grads"][n] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
                   for n, p in model.named_parameters())
        opt.step()
        weight = max((got["state"][k] - v).abs().max().item() for k, v in model.state_dict().items())
        print(f"{kind}: {lors.count_parameters(model).total:,} parameters; FSDP (2 processes) vs one process: "
              f"largest relative gradient difference {grad:.1e}, largest weight difference after one AdamW "
              f"step {weight:.1e}")


if __name__ == "__main__":
    main()
