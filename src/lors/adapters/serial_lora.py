"""Serial LoRA: one low-rank pair per attention block, composed in series with the frozen projections.

LoRA gives every projection W of an attention block its own update, W + s B A. Serial LoRA learns
one pair per block, A_s (r, d) and B_s (d, r), and puts it *in front of* the frozen projections
that read the block input x, so each of W_q, W_k, W_v computes

    W (x + s B_s A_s x) = W (I + s B_s A_s) x,         s = alpha / r            (eq. 1)

and the merged weight is W (I + s B_s A_s). With q, k, v, o all d wide, LoRA on q, k, v, o trains
4 * 2 d r numbers per block and Serial LoRA 2 d r: a quarter.

The output projection reads a different tensor (the attention output), so it cannot share the
input pair. `adapt_out=True` gives it a pair of its own (half of LoRA's count); the default is
False because that keeps the quarter budget and the single shared pair that defines the method.

Blocks are found by the names of their projections (see `find_attention_blocks`):
separate q/k/v Linears (HF BERT, Llama, T5) or one fused qkv projection (timm ViT `qkv`,
GPT-2 `c_attn`, a transformers Conv1D). Pairs are owned once by the attention module
(`<block>.serial_lora_in`, `<block>.serial_lora_out`); the wrapped projections only refer to them.
Whether a projection is merged is part of the model's state dict (see `SerialLoraLinear`), and
`load_adapter` refuses a merged model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from lors.core.stack import refer
from lors.serialization import write_tensors

# Child names of the projections that read the block input: separate q, k, v or one fused qkv.
QKV_NAMES: tuple[tuple[str, str, str], ...] = (
    ("query", "key", "value"),  # HF BERT, RoBERTa, MiniLM
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, OPT, ...
    ("q", "k", "v"),  # T5
)
FUSED_NAMES: tuple[str, ...] = ("qkv", "c_attn")  # timm ViT, GPT-2
# Output projection: a child of the block, or (BERT) `output.dense` of the block's parent.
OUT_NAMES: tuple[str, ...] = ("o_proj", "out_proj", "proj", "c_proj", "o")
PARENT_OUT_NAME = "output.dense"

IN_PAIR = "serial_lora_in"
OUT_PAIR = "serial_lora_out"


@dataclass
class AttentionBlock:
    """Where one attention block's projections live, as dotted names relative to the model."""

    name: str  # the module that owns the q/k/v (or qkv) projections
    in_projs: tuple[str, ...]  # e.g. ("...self.query", "...self.key", "...self.value")
    out_proj: str | None  # e.g. "...attention.output.dense"; None when not found


def _io_features(layer: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D, else None."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if hasattr(layer, "nx") and hasattr(layer, "nf") and getattr(layer, "weight", None) is not None:
        return int(layer.nx), int(layer.nf)  # Conv1D stores weight as (in, out)
    return None


def find_attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Attention blocks of `model`, in module order, found by projection names (QKV_NAMES, ...)."""
    modules = dict(model.named_modules())
    blocks = []
    for name, module in modules.items():
        if isinstance(module, SerialLoraLinear):
            continue
        children = dict(module.named_children())
        prefix = f"{name}." if name else ""
        in_projs: tuple[str, ...] = ()
        for names in QKV_NAMES:
            if all(n in children and _io_features(children[n]) for n in names):
                in_projs = names
                break
        else:
            fused = [n for n in FUSED_NAMES if n in children and _io_features(children[n])]
            in_projs = tuple(fused[:1])
        if not in_projs:
            continue
        out = next((prefix + n for n in OUT_NAMES if n in children and _io_features(children[n])), None)
        parent_out = f"{name.rpartition('.')[0]}.{PARENT_OUT_NAME}".lstrip(".")
        if out is None and parent_out in modules and _io_features(modules[parent_out]):
            out = parent_out
        blocks.append(AttentionBlock(name, tuple(prefix + n for n in in_projs), out))
    return blocks


def no_blocks_error(model: nn.Module) -> ValueError:
    """Why ``find_attention_blocks`` found nothing in ``model``, as the ValueError to raise."""
    kind = type(model).__name__
    names = {n for group in QKV_NAMES for n in group} | set(FUSED_NAMES)
    if any(isinstance(m, SerialLoraLinear) for m in model.modules()):
        return ValueError(f"{kind} already has Serial LoRA adapters (its q/k/v projections are SerialLoraLinear, "
                          "from lors.adapters.serial_lora.inject or a PEFT model): adapt a fresh base model, or "
                          "load_adapter into one")
    shared = [n for n, m in model.named_modules() if n.rpartition(".")[2] in names and type(m).__name__ == "LorsLinear"]
    if shared:
        return ValueError(f"{kind}'s attention projections are LORS-shared ('{shared[0]}' is a LorsLinear, from "
                          "lors.share_layers or convert_layers): Serial LoRA adapts plain frozen projections; "
                          "call lors.merge(model) first to make them nn.Linears again")
    return ValueError(f"no attention block found in {kind}: Serial LoRA needs a module with separate q/k/v "
                      f"projections named {QKV_NAMES} or a fused one named {FUSED_NAMES} (nn.Linear or Conv1D)")


class SerialLoraPair(nn.Module):
    """The map x -> x + s B A x that is put in front of frozen projections (eq. 1).

    Args:
        features: d, the width of the input x.
        rank: r, the rank of B A; 1 <= r <= d.
        alpha: scale numerator, s = alpha / r.
    """

    def __init__(self, features: int, rank: int, alpha: float):
        super().__init__()
        if not 1 <= rank <= features:
            raise ValueError(f"rank {rank} is not in [1, {features}] for an input of width {features}: "
                             f"pick a rank between 1 and the projection's in_features")
        self.features, self.rank, self.alpha = features, rank, float(alpha)
        self.scale = self.alpha / rank
        self.A = nn.Parameter(torch.empty(rank, features))  # (r, d), Kaiming-uniform as in LoRA
        self.B = nn.Parameter(torch.zeros(features, rank))  # (d, r), zero: identity at init
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d) -> (..., d). The update is computed in the pair's dtype and added in x's, so a
        float32 pair (PEFT's default on a bfloat16 model) works in front of a bfloat16 projection."""
        return x + (self.scale * F.linear(F.linear(x.to(self.A.dtype), self.A), self.B)).to(x.dtype)  # x + s B (A x)

    def extra_repr(self) -> str:
        return f"features={self.features}, rank={self.rank}, alpha={self.alpha}"


class SerialLoraLinear(nn.Module):
    """A frozen projection (nn.Linear or Conv1D) whose input first goes through a shared pair.

    Args:
        base_layer: the original projection, kept unchanged as `base_layer`.
        pair: the SerialLoraPair; owned by the attention block, only referred to here.

    `merged` (whether `base_layer.weight` already holds the pair) travels with the model's
    state dict as this layer's `_extra_state`, a bool tensor: a state dict taken after `merge_adapter`
    makes the model it is loaded into merged too, so the pair is never applied twice.
    """

    def __init__(self, base_layer: nn.Module, pair: SerialLoraPair):
        super().__init__()
        self.base_layer = base_layer
        refer(self, "_pair", pair)  # the block (or PEFT's first tuner layer) owns the pair
        self.merged = False

    @property
    def pair(self) -> SerialLoraPair:
        return self._pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out)."""
        if self.merged:
            return self.base_layer(x)
        return self.base_layer(self.pair(x))  # W (x + s B A x)

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.merged)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.merged = bool(state)

    def _weight(self) -> torch.Tensor:
        """The weight as a Linear's (d_out, d_in), in float64."""
        w = self.base_layer.weight.detach().double()
        return w if isinstance(self.base_layer, nn.Linear) else w.T

    def _set_weight(self, w: torch.Tensor) -> None:
        w = w if isinstance(self.base_layer, nn.Linear) else w.T
        self.base_layer.weight.data.copy_(w.to(self.base_layer.weight.dtype))

    def merge(self) -> None:
        """W <- W (I + s B A) = W + s (W B) A; forward then skips the pair."""
        if self.merged:
            return
        p, w = self.pair, self._weight()
        a, b = p.A.detach().double(), p.B.detach().double()
        self._set_weight(w + p.scale * (w @ b) @ a)
        self.merged = True

    def unmerge(self) -> None:
        """W <- W' (I + s B A)^-1, by Woodbury: W' - s W' B (I_r + s A B)^-1 A (an r x r solve)."""
        if not self.merged:
            return
        p, w = self.pair, self._weight()
        a, b = p.A.detach().double(), p.B.detach().double()
        small = torch.eye(p.rank, dtype=w.dtype, device=w.device) + p.scale * a @ b  # (r, r)
        self._set_weight(w - p.scale * (w @ b) @ torch.linalg.solve(small, a))
        self.merged = False


def inject(model: nn.Module, rank: int, alpha: float, *, adapt_out: bool = False,
           freeze_base: bool = True) -> list[AttentionBlock]:
    """Add Serial LoRA to every attention block of `model`, in place.

    Args:
        model: any nn.Module whose attention blocks match `find_attention_blocks`.
        rank: r of each pair, 1 <= r <= the block's input width.
        alpha: s = alpha / r.
        adapt_out: also give the output projection a pair of its own (default False: the paper's
            single shared pair, a quarter of LoRA's parameters on q, k, v, o).
        freeze_base: set requires_grad=False on every parameter that is not an adapter.
    Returns:
        the blocks that were adapted.
    """
    if any(isinstance(m, SerialLoraPair) for m in model.modules()):
        raise ValueError("model already has Serial LoRA adapters: inject once per model "
                         "(load_adapter into a fresh base model instead)")
    blocks = find_attention_blocks(model)
    if not blocks:
        raise no_blocks_error(model)
    if adapt_out and any(b.out_proj is None for b in blocks):
        missing = next(b.name for b in blocks if b.out_proj is None)
        raise ValueError(f"attention block '{missing}' has no output projection named {OUT_NAMES} "
                         f"or '{PARENT_OUT_NAME}' in its parent: use adapt_out=False")
    widths = []  # validate everything before touching the model
    for block in blocks:
        w = {_io_features(model.get_submodule(n))[0] for n in block.in_projs}
        if len(w) != 1:
            raise ValueError(f"block '{block.name}' has q/k/v projections with input widths {sorted(w)}: "
                             f"the shared pair needs one input width")
        widths.append(w.pop())
        if adapt_out:
            w.add(_io_features(model.get_submodule(block.out_proj))[0])
        if not 1 <= rank <= min(w | {widths[-1]}):
            raise ValueError(f"rank {rank} does not fit block '{block.name}' of width {min(w | {widths[-1]})}: "
                             f"pick a rank between 1 and {min(w | {widths[-1]})}")
    if freeze_base:
        model.requires_grad_(False)
    for block, width in zip(blocks, widths):
        owner = model.get_submodule(block.name)
        pair = SerialLoraPair(width, rank, alpha)
        owner.add_module(IN_PAIR, pair)
        targets = [(n, pair) for n in block.in_projs]
        if adapt_out:
            width = _io_features(model.get_submodule(block.out_proj))[0]
            out_pair = SerialLoraPair(width, rank, alpha)
            owner.add_module(OUT_PAIR, out_pair)
            targets.append((block.out_proj, out_pair))
        for target, p in targets:
            parent_name, _, child = target.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            p.to(device=base.weight.device, dtype=base.weight.dtype)
            setattr(parent, child, SerialLoraLinear(base, p))
    return blocks


def serial_layers(model: nn.Module) -> Iterator[SerialLoraLinear]:
    return (m for m in model.modules() if isinstance(m, SerialLoraLinear))


def merge_adapter(model: nn.Module) -> None:
    """Fold every pair into its frozen projections, in place and undoably (`unmerge_adapter`):
    W <- W (I + s B A). Outputs are unchanged. (PEFT's name for the same; `lors.merge` instead
    replaces LORS layers by plain Linears for good.)"""
    for layer in serial_layers(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undo `merge_adapter`, restoring the frozen weights (up to float rounding; computed in float64)."""
    for layer in serial_layers(model):
        layer.unmerge()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Serial LoRA tensors of `model` only, keyed as in model.state_dict()."""
    names = {f"{prefix}.{pname}".lstrip(".") for prefix, m in model.named_modules()
             if isinstance(m, SerialLoraPair) for pname, _ in m.named_parameters()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def trainable_parameters(model: nn.Module) -> int:
    """Number of scalars with requires_grad=True, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _config(model: nn.Module) -> dict[str, str]:
    pairs = [m for m in model.modules() if isinstance(m, SerialLoraPair)]
    if not pairs:
        raise ValueError("model has no Serial LoRA adapters: call inject(model, rank, alpha) first")
    adapt_out = any(name.endswith(OUT_PAIR) for name, m in model.named_modules() if isinstance(m, SerialLoraPair))
    return {"method": "serial_lora", "rank": str(pairs[0].rank), "alpha": str(pairs[0].alpha),
            "adapt_out": str(adapt_out)}


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write only the adapter tensors (and rank, alpha, adapt_out as metadata) to a safetensors file.

    The pair is the same whether or not the model is merged, so the file is too. Raises ValueError
    when `path` cannot be written (a directory, a read-only place, a full disk).
    """
    path = Path(path)
    meta = _config(model)
    if path.is_dir():
        raise ValueError(f"cannot save the adapter to {path}: it is a directory; pass a file name such "
                         f"as {path / 'adapter.safetensors'}")
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    try:
        write_tensors(state, path, meta)
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot write adapter file {path} ({err}): pass a path in an existing, "
                         "writable directory on a disk with free space") from None


def _read_adapter(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a save_adapter file; ValueError for anything else."""
    if not path.is_file():
        raise ValueError(f"adapter file {path} does not exist: pass a file written by save_adapter")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"adapter file {path} is not a readable safetensors file ({err}); it may be "
                         "truncated: save the adapter again") from None
    if meta.get("method") != "serial_lora" or not {"rank", "alpha", "adapt_out"} <= set(meta):
        raise ValueError(f"{path} is not a Serial LoRA adapter file (metadata {meta}): write it with save_adapter")
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"adapter tensor '{k}' in {path} has {int((~torch.isfinite(v)).sum())} "
                             "non-finite values (NaN/inf); training diverged before it was saved: use an "
                             "earlier adapter file")
    return meta, state


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a `save_adapter` file into `model`; a model without adapters is injected first.

    The file's keys must match the model's adapter keys exactly. A merged model is refused:
    its weights hold the current pair, and replacing the pair would make `unmerge_adapter` subtract
    the wrong one. Every problem is a ValueError; a missing, unreadable or non-finite file and
    a merged model are refused before the model is touched.
    """
    path = Path(path)
    meta, state = _read_adapter(path)
    merged = sum(layer.merged for layer in serial_layers(model))
    if merged:
        raise ValueError(f"{merged} projection(s) of this model are merged, so their weights already hold the "
                         "current adapter and loading another would make unmerge restore wrong weights: call "
                         "unmerge_adapter(model) first, then load_adapter (and merge_adapter again if wanted), or load into "
                         "a fresh base model")
    if not any(isinstance(m, SerialLoraPair) for m in model.modules()):
        inject(model, int(meta["rank"]), float(meta["alpha"]), adapt_out=meta["adapt_out"] == "True")
    own = adapter_state_dict(model)
    if set(state) != set(own):
        extra, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
        raise ValueError(f"adapter file {path} does not fit this model: unexpected keys {extra[:3]}, missing "
                         f"keys {missing[:3]}: load it into the architecture it was saved from")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"adapter tensor '{k}' has shape {tuple(v.shape)} in {path} but "
                             f"{tuple(own[k].shape)} in the model: the ranks differ")
    for k, v in state.items():
        own[k].copy_(v)
    return model


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                           weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups for LoRA+: every B matrix learns `ratio` times faster than the rest.

    B matrices are SerialLoraPair.B and PEFT LoRA's `lora_B`; all other trainable parameters
    (A matrices, a classifier head) use `lr`. Pass the result to torch.optim.AdamW.
    """
    if ratio <= 0:
        raise ValueError(f"LoRA+ ratio must be positive, got {ratio}: use e.g. 16 (ratio 1 is plain LoRA)")
    b_ids = {id(m.B) for m in model.modules() if isinstance(m, SerialLoraPair)}
    b_ids |= {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    fast, slow = [], []
    for p in model.parameters():
        if p.requires_grad:
            (fast if id(p) in b_ids else slow).append(p)
    if not fast:
        raise ValueError("no trainable B matrix found: inject Serial LoRA (or PEFT LoRA) before building LoRA+ groups")
    return [{"params": slow, "lr": lr, "weight_decay": weight_decay},
            {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay}]
