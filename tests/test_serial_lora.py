"""Serial LoRA on tiny randomly initialised transformers (no weights are downloaded)."""
import copy

import pytest
import torch
import torch.nn as nn

from lors.adapters import serial_lora as sl

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

WIDTH = 32


def build(kind: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    """A tiny model of `kind` in eval mode (the same weights on every call) and an input for it."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 7))
    if kind == "bert":  # separate query/key/value; output projection is a sibling module
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=WIDTH, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64)
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    elif kind == "llama":  # separate q/k/v_proj, grouped k/v heads
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=WIDTH, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
        model = transformers.LlamaModel(cfg)
    elif kind == "gpt2":  # fused c_attn, a transformers Conv1D
        cfg = transformers.GPT2Config(vocab_size=100, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2Model(cfg)
    elif kind == "vit":  # fused qkv nn.Linear
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=WIDTH, depth=2, num_heads=2,
                                  num_classes=5)
        ids = torch.randn(2, 3, 32, 32)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval(), ids.to(dtype) if ids.is_floating_point() else ids


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if torch.is_tensor(out) else out.last_hidden_state


def randomize_adapters(model: nn.Module) -> None:
    """Give B a non-zero value so that the adapter changes the function."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, sl.SerialLoraPair):
            m.B.data.copy_(torch.randn(m.B.shape, generator=g) * 0.1)


KINDS = ["bert", "llama", "gpt2", "vit"]


@pytest.mark.parametrize("kind", KINDS)
def test_init_equals_base(kind):
    model, x = build(kind)
    with torch.no_grad():
        ref = run(model, x)
        blocks = sl.inject(model, rank=4, alpha=8.0)
        assert len(blocks) == 2
        assert torch.equal(run(model, x), ref)  # B = 0: exactly the base model


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    model, x = build(kind)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    sl.inject(model, rank=4, alpha=8.0, adapt_out=True)
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = run(model, x)
        sl.merge_adapter(model)
        merged = run(model, x)
        assert all(layer.merged for layer in sl.serial_layers(model))
        rel = (merged - unmerged).norm() / unmerged.norm()
        assert rel <= 1e-5, rel
        assert (merged - base_out(kind, x)).abs().max() > 1e-3  # the adapter really changed the output
        sl.unmerge_adapter(model)
        assert torch.allclose(run(model, x), unmerged, rtol=1e-5, atol=1e-6)
    for name, layer in model.named_modules():
        if isinstance(layer, sl.SerialLoraLinear):
            key = name + ".weight"
            assert torch.allclose(layer.base_layer.weight, base_weights[key], rtol=0, atol=1e-6), key


def base_out(kind: str, x: torch.Tensor) -> torch.Tensor:
    model, _ = build(kind)
    return run(model, x)


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapters_train_and_get_gradients(kind):
    model, x = build(kind)
    sl.inject(model, rank=4, alpha=8.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(sl.IN_PAIR in n and n.rsplit(".", 1)[1] in ("A", "B") for n in trainable)
    run(model, x).pow(2).mean().backward()  # B = 0, so only B gets a non-zero gradient at init
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith(".B"))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_save_load_round_trip_is_exact_and_adapter_only(kind, tmp_path):
    model, x = build(kind)
    sl.inject(model, rank=4, alpha=8.0, adapt_out=True)
    randomize_adapters(model)
    path = tmp_path / "adapter.safetensors"
    sl.save_adapter(model, path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(sl.adapter_state_dict(model))
    assert len(keys) == 2 * 2 * 2  # 2 blocks x (in, out) pairs x (A, B)
    assert all(".serial_lora_" in k for k in keys)
    fresh, _ = build(kind)  # same seed: same frozen weights; load injects from the file's metadata
    sl.load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(run(fresh, x), run(model, x))
    for k, v in sl.adapter_state_dict(model).items():
        assert torch.equal(sl.adapter_state_dict(fresh)[k], v)


def test_quarter_of_peft_lora_on_qkvo():
    peft = pytest.importorskip("peft")
    r = 4
    model, _ = build("bert")  # q, k, v, o all WIDTH x WIDTH
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=r, lora_alpha=8, target_modules=["query", "key", "value", "attention.output.dense"]))
    n_lora = sl.trainable_parameters(lora)
    sl.inject(model, rank=r, alpha=8.0)
    n_serial = sl.trainable_parameters(model)
    assert n_serial == 2 * 2 * WIDTH * r  # 2 blocks x (A + B)
    assert 4 * n_serial == n_lora


def test_adapt_out_finds_bert_sibling_output_and_doubles_count():
    model, _ = build("bert")
    blocks = sl.inject(model, rank=4, alpha=8.0, adapt_out=True)
    assert blocks[0].out_proj == "encoder.layer.0.attention.output.dense"
    assert isinstance(model.encoder.layer[0].attention.output.dense, sl.SerialLoraLinear)
    assert sl.trainable_parameters(model) == 2 * 2 * (2 * WIDTH * 4)


def test_shared_pair_is_owned_once():
    model, _ = build("bert")
    sl.inject(model, rank=4, alpha=8.0)
    attn = model.encoder.layer[0].attention.self
    assert attn.query.pair is attn.key.pair is attn.value.pair is getattr(attn, sl.IN_PAIR)
    assert sum(sl.IN_PAIR in k for k in model.state_dict()) == 2 * 2  # 2 blocks x (A, B), no copies


def test_no_attention_block_raises():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="no attention block found in Sequential"):
        sl.inject(mlp, rank=2, alpha=2.0)


def test_rank_larger_than_width_raises_and_leaves_model_untouched():
    model, _ = build("bert")
    with pytest.raises(ValueError, match=f"rank {WIDTH + 1} does not fit.*between 1 and {WIDTH}"):
        sl.inject(model, rank=WIDTH + 1, alpha=8.0)
    assert not any(isinstance(m, sl.SerialLoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_double_inject_raises():
    model, _ = build("vit")
    sl.inject(model, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="already has Serial LoRA"):
        sl.inject(model, rank=2, alpha=2.0)


def test_lora_plus_groups_give_b_the_higher_rate():
    model, _ = build("vit")
    sl.inject(model, rank=2, alpha=2.0)
    model.head.requires_grad_(True)
    groups = sl.lora_plus_param_groups(model, lr=1e-3, ratio=16.0)
    bs = {id(m.B) for m in model.modules() if isinstance(m, sl.SerialLoraPair)}
    assert {id(p) for p in groups[1]["params"]} == bs and groups[1]["lr"] == pytest.approx(16e-3)
    assert {id(model.head.weight), id(model.head.bias)} <= {id(p) for p in groups[0]["params"]}
    assert groups[0]["lr"] == 1e-3
    torch.optim.AdamW(groups)  # a valid optimizer spec


def test_state_dict_of_a_merged_model_loads_as_merged():
    model, x = build("bert")
    sl.inject(model, rank=4, alpha=8.0)
    randomize_adapters(model)
    with torch.no_grad():
        expected = run(model, x)
        sl.merge_adapter(model)
        sd = model.state_dict()
        fresh, _ = build("bert")
        sl.inject(fresh, rank=4, alpha=8.0)  # unmerged: used to apply the adapter a second time
        fresh.load_state_dict(sd)
        assert torch.allclose(run(fresh, x), expected, rtol=1e-5, atol=1e-6)
        assert all(layer.merged for layer in sl.serial_layers(fresh))
        sl.unmerge_adapter(fresh)
        assert torch.allclose(run(fresh, x), expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(fresh.encoder.layer[0].attention.self.query.base_layer.weight,
                              build("bert")[0].encoder.layer[0].attention.self.query.weight, atol=1e-6)


def test_state_dict_records_the_merged_state():
    model, _ = build("vit")
    sl.inject(model, rank=2, alpha=2.0)
    key = "blocks.0.attn.qkv._extra_state"
    assert model.state_dict()[key].item() is False
    sl.merge_adapter(model)
    assert model.state_dict()[key].item() is True


def test_load_adapter_into_a_merged_model_is_refused(tmp_path):
    model, x = build("bert")
    sl.inject(model, rank=4, alpha=8.0)
    randomize_adapters(model)
    other, _ = build("bert")
    sl.inject(other, rank=4, alpha=8.0)
    sl.save_adapter(other, tmp_path / "other.safetensors")  # B = 0: a different adapter
    sl.merge_adapter(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="merged.*call unmerge_adapter\\(model\\) first"):
        sl.load_adapter(model, tmp_path / "other.safetensors")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    sl.unmerge_adapter(model)  # the documented fix: unmerge, load, and the base weights are intact
    sl.load_adapter(model, tmp_path / "other.safetensors")
    with torch.no_grad():
        assert torch.allclose(run(model, x), base_out("bert", x), rtol=1e-5, atol=1e-5)
