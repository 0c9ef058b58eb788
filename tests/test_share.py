"""share_layers and merge on stacks from torch, a GPT-style model, timm and transformers."""
import copy

import pytest
import torch
from torch import nn

from lors import LorsLinear, count_parameters, merge, share_layers, substack


class Block(nn.Module):
    """A GPT-style pre-norm block with a fused qkv projection."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d)})
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x):  # (B, T, d)
        B, T, d = x.shape
        q, k, v = self.attn["qkv"](self.ln1(x)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn["proj"](y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, n_layer=4, d=32, vocab=50):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(Block(d) for _ in range(n_layer))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.head(x)


def perturb(model):
    """Non-zero private factors, so merged/unmerged comparisons test something."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".A." in name or ".B." in name:  # <layers>.lors.<target>.<group>.A.<i>
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_merge(model, inputs, run=lambda m, x: m(x)):
    model.eval()
    perturb(model)
    with torch.no_grad():
        before = run(model, inputs)
        merge(model)
        after = run(model, inputs)
    assert not any(isinstance(m, LorsLinear) for m in model.modules())
    assert rel_err(after, before) <= 1e-6


def test_gpt_stack_all_linears():
    torch.manual_seed(0)
    model = GPT()
    stacks = share_layers(model, rank=4, groups=[1, 1, 2, 2])  # finds model.h
    assert set(stacks) == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert all(isinstance(b.mlp.fc1, LorsLinear) for b in model.h)
    assert model.h[3].mlp.fc1.lors is model.h[0].mlp.fc1.lors
    idx = torch.randint(0, 50, (2, 7))
    model(idx).sum().backward()
    assert model.h[0].mlp.fc1.lors.shared_weight.grad is not None
    check_merge(model, idx)


def test_shared_tensor_is_counted_and_stored_once():
    model = GPT(n_layer=4, d=32)
    share_layers(model.h, targets="mlp.fc1", rank=4)
    keys = [k for k in model.state_dict() if "shared_weight" in k]
    assert keys == ["h.lors.mlp.fc1.0.shared_weight"]
    counts = count_parameters(model)
    assert counts.shared == 128 * 32
    assert counts.private == 4 * (4 * 32 + 128 * 4) + 4 * 128  # factors and per-layer biases
    assert counts.total == sum(p.numel() for p in model.parameters())
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))


def test_torch_transformer_encoder_including_attention_out_proj():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    stacks = share_layers(enc, rank=4)
    assert set(stacks) == {"self_attn.out_proj", "linear1", "linear2"}
    x = torch.randn(2, 5, 32)
    enc(x).sum().backward()  # out_proj is read through .weight/.bias by MultiheadAttention
    assert enc.layers[0].self_attn.out_proj.lors.shared_weight.grad is not None
    check_merge(enc, x)


def test_timm_vit_blocks():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=4, num_classes=5)
    share_layers(vit.blocks, targets=["attn.qkv", "mlp.fc1", "mlp.fc2"], rank=4)
    x = torch.randn(2, 3, 32, 32)
    vit(x).sum().backward()
    check_merge(vit, x)


def test_transformers_bert_layers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=4, intermediate_size=64)
    bert = transformers.BertModel(cfg)
    share_layers(bert, targets=["attention.self.query", "attention.self.value",
                                "intermediate.dense"], rank=4)
    assert isinstance(bert.encoder.layer[2].attention.self.query, LorsLinear)
    ids = torch.randint(0, 64, (2, 6))
    check_merge(bert, ids, run=lambda m, x: m(input_ids=x).last_hidden_state)


def test_transformers_llama_layers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64)
    llama = transformers.LlamaForCausalLM(cfg)
    share_layers(llama.model.layers, rank=4)
    ids = torch.randint(0, 64, (2, 6))
    llama(input_ids=ids).logits.sum().backward()
    check_merge(llama, ids, run=lambda m, x: m(input_ids=x).logits)


def test_deepcopy_keeps_one_shared_stack():
    model = GPT(n_layer=3)
    share_layers(model, targets="mlp.fc2", rank=2)
    twin = copy.deepcopy(model)
    assert twin.h[2].mlp.fc2.lors is twin.h[0].mlp.fc2.lors
    assert twin.h[2].mlp.fc2.lors is not model.h[0].mlp.fc2.lors


def test_layers_that_differ_are_named():
    layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(3)])
    layers[2][0] = nn.Linear(8, 16)
    with pytest.raises(ValueError, match=r"layer 2 of 3 has Linear '0' with parameters weight "
                                         r"\(16, 8\).*layer 0 has weight \(8, 8\)"):
        share_layers(layers)
    layers[2][0] = nn.Conv1d(8, 8, 1)
    with pytest.raises(ValueError, match="layer 2 of 3 has Conv1d '0' where layer 0 has Linear"):
        share_layers(layers)


def test_bad_targets_are_named():
    model = GPT(n_layer=2)
    with pytest.raises(ValueError, match="target 'mlp.fc3' matches nothing.*'mlp.fc1'"):
        share_layers(model, targets="mlp.fc3")
    with pytest.raises(ValueError, match="target 'ln1' is a LayerNorm, not an nn.Linear"):
        share_layers(model, targets="ln1")
    with pytest.raises(ValueError, match=r"target 'attn.proj': rank 32 .*use 1 <= rank < 32"):
        share_layers(model, targets="attn.proj", rank=32)
    with pytest.raises(ValueError, match="rank must be an int or a list of 2 ints"):
        share_layers(model, targets="attn.proj", rank=[2, 2, 2])
    share_layers(model, targets="attn.proj", rank=2)
    with pytest.raises(ValueError, match="target 'attn.proj' is already shared"):
        share_layers(model, targets="attn.proj")


def test_module_without_a_stack_is_rejected():
    with pytest.raises(ValueError, match="a stack needs at least 2 layers"):
        share_layers(nn.ModuleList([nn.Linear(4, 4)]))
    with pytest.raises(ValueError, match="no stack of identical layers found"):
        share_layers(nn.Linear(4, 4))


def unique_numel(module):
    return sum(p.numel() for p in module.parameters())


def test_the_stack_owns_the_shared_tensors_and_deleting_a_layer_keeps_them():
    torch.manual_seed(0)
    stack = GPT(n_layer=4).h
    share_layers(stack, targets="mlp.fc1", rank=4)
    lors0 = stack[0].mlp.fc1.lors
    assert not any(p is lors0.shared_weight for p in stack[0].parameters())  # the layer refers only
    assert [n for n, _ in stack.named_children()] == ["0", "1", "2", "3", "lors"]
    assert len(stack) == 4 and all(isinstance(b, Block) for b in stack)
    del stack[0]
    assert len(stack) == 3 and [n for n, _ in stack.named_children()] == ["0", "1", "2", "lors"]
    params = list(stack.parameters())
    assert any(p is lors0.shared_weight for p in params)
    assert len({id(p) for p in params}) == len(params)
    sd = stack.state_dict()
    assert [k for k in sd if "shared_weight" in k] == ["lors.mlp.fc1.0.shared_weight"]
    assert sum(v.numel() for v in sd.values()) == unique_numel(stack) == count_parameters(stack).total
    x = torch.randn(2, 3, 32)
    stack[0](x).sum().backward()  # the old layer 1, still reading its own factors
    assert lors0.shared_weight.grad is not None and lors0.A[1].grad is not None


@pytest.mark.parametrize("change", ["slice", "deepcopy"])
def test_layers_taken_out_of_the_stack_refer_to_shared_tensors_they_do_not_own(change):
    stack = GPT(n_layer=4).h
    share_layers(stack, targets="mlp.fc1", rank=4)
    kept = stack[1:] if change == "slice" else copy.deepcopy(stack[2])
    assert type(kept) in (nn.ModuleList, Block)
    assert not any("shared_weight" in k for k in kept.state_dict())
    x = torch.randn(2, 3, 32)
    layer = kept[0] if change == "slice" else kept
    layer(x).sum().backward()  # still runs: its LorsLinear refers to a stack module
    same = layer.mlp.fc1.lors is stack[1].mlp.fc1.lors
    assert same == (change == "slice")


def test_substack_extracts_layers_with_their_own_factors():
    torch.manual_seed(0)
    stack = GPT(n_layer=4).h
    share_layers(stack, targets=["mlp.fc1", "attn.proj"], rank=[1, 2, 3, 4])
    perturb(stack)
    sub = substack(stack, [1, 3])
    assert len(sub) == 2 and len(stack) == 4
    fc1 = sub[1].mlp.fc1.lors
    assert fc1.num_layers == 2 and fc1.ranks == [2, 4] and fc1 is not stack[3].mlp.fc1.lors
    x = torch.randn(2, 3, 32)
    for j, i in enumerate([1, 3]):
        assert torch.equal(sub[j](x), stack[i](x))
    counts = count_parameters(sub)
    assert counts.total == unique_numel(sub)
    assert counts.shared == 128 * 32 + 32 * 32
    with pytest.raises(ValueError, match="distinct indices 0 <= i < 4"):
        substack(stack, [1, 1])


def test_two_state_dicts_written_into_one_dict_each_hold_the_shared_tensors():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    share_layers(enc, rank=2)
    d = {}
    enc.state_dict(destination=d, prefix="a.")
    enc.state_dict(destination=d, prefix="b.")
    a = {k[2:]: v for k, v in d.items() if k.startswith("a.")}
    b = {k[2:]: v for k, v in d.items() if k.startswith("b.")}
    assert a.keys() == b.keys() == enc.state_dict().keys()
    twin = copy.deepcopy(enc)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    twin.load_state_dict(b)  # strict
    x = torch.randn(2, 4, 16)
    assert torch.equal(twin.eval()(x), enc.eval()(x))


def test_failed_share_layers_leaves_the_stack_untouched():
    stack = nn.ModuleList(nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 4)) for _ in range(3))
    with pytest.raises(ValueError, match="target '1': rank 6 .*use 1 <= rank < 4"):
        share_layers(stack, rank=6)  # fits Linear '0', not Linear '1'
    assert not any(isinstance(m, LorsLinear) for m in stack.modules())


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_a_shared_stack_compiles_without_graph_breaks(kind):
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(n_layer=3)
        share_layers(model, rank=4, groups=[1, 2, 2])
        run = lambda m, x: m(x)  # noqa: E731
    else:
        transformers = pytest.importorskip("transformers")
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64)
        model = transformers.LlamaForCausalLM(cfg)
        share_layers(model.model.layers, rank=4)
        run = lambda m, x: m(input_ids=x).logits  # noqa: E731
    perturb(model)
    idx = torch.randint(0, 50, (2, 7))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break raises
    out = run(compiled, idx)
    out.sum().backward()
    torch.testing.assert_close(out, run(model, idx), rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for n, p in model.named_parameters() if "shared_weight" in n)


def test_saving_a_compiled_model_writes_what_the_plain_model_loads(tmp_path):
    import lors
    torch.manual_seed(0)
    model = GPT(n_layer=3)
    share_layers(model, rank=4)
    perturb(model)
    compiled = torch.compile(model)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = lors.save(compiled, tmp_path / "m.safetensors")
    plain = GPT(n_layer=3)
    lors.load(plain, path)  # strict
    idx = torch.randint(0, 50, (2, 5))
    assert torch.equal(plain(idx), model(idx))
    again = torch.compile(GPT(n_layer=3))
    lors.load(again, path)  # into a compiled model too
    assert torch.equal(again._orig_mod(idx), model(idx))


def test_a_target_whose_folder_has_its_own_name_is_owned_under_its_full_path():
    stack = nn.ModuleList(nn.Sequential() for _ in range(3))
    for layer in stack:
        layer.out = nn.Sequential()
        layer.out.out = nn.Linear(8, 8)
    share_layers(stack, targets="out.out", rank=2)
    assert [k for k in stack.state_dict() if "shared_weight" in k] == ["lors.out.out.0.shared_weight"]
    from lors.core.stack import owned
    assert list(owned(stack)) == ["out.out"]  # one target, not a folder taken for a second one
    stack[2](torch.randn(2, 8)).sum().backward()
