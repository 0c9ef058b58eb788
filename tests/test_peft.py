"""Serial LoRA through PEFT (`get_peft_model` ... `PeftModel.from_pretrained`) on tiny random models."""
import copy
import importlib
import sys

import pytest
import torch
import torch.nn as nn

from lors.adapters import serial_lora as sl

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

try:
    from lors.adapters import peft as lp
except ImportError as err:  # a PEFT outside the supported range: say so and skip
    if "supports peft" not in str(err):
        raise
    pytest.skip(str(err), allow_module_level=True)

from test_serial_lora import WIDTH, build  # noqa: E402  the same tiny models as the native tests

KINDS = ["bert", "llama", "gpt2", "vit"]


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if torch.is_tensor(out) else out.last_hidden_state


def wrap(kind: str, **config) -> tuple[nn.Module, torch.Tensor]:
    model, x = build(kind)
    return peft.get_peft_model(model, lp.SerialLoraConfig(r=4, **config)), x


def randomize_adapters(model: nn.Module) -> None:
    """Give B a non-zero value so that the adapter changes the function."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sl.SerialLoraPair):
                m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.1)


def pairs(model: nn.Module) -> list[sl.SerialLoraPair]:
    return list({id(m): m for m in model.modules() if isinstance(m, sl.SerialLoraPair)}.values())


@pytest.mark.parametrize("kind", KINDS)
def test_init_equals_base(kind):
    model, x = build(kind)
    ref = run(model, x)
    wrapped = peft.get_peft_model(model, lp.SerialLoraConfig(r=4))
    assert any(isinstance(m, lp.SerialLoraLayer) for m in wrapped.modules())
    assert torch.equal(run(wrapped, x), ref)  # B = 0: exactly the base model


@pytest.mark.parametrize("kind,adapt_out", [("bert", False), ("bert", True), ("llama", True), ("vit", False),
                                            ("gpt2", True)])
def test_trainable_parameters_equal_native_inject(kind, adapt_out):
    native, _ = build(kind)
    sl.inject(native, rank=4, alpha=8.0, adapt_out=adapt_out)
    wrapped, _ = wrap(kind, adapt_out=adapt_out)
    trainable, _ = wrapped.get_nb_trainable_parameters()
    assert trainable == sl.trainable_parameters(native) > 0
    assert len(pairs(wrapped)) == len(pairs(native))  # one pair per block (and per output projection)


def test_gradients_reach_every_pair_and_no_base_weight():
    wrapped, x = wrap("gpt2", adapt_out=True)
    wrapped.train()
    wrapped(x).last_hidden_state.square().mean().backward()
    assert all(p.B.grad is not None and p.B.grad.abs().sum() > 0 for p in pairs(wrapped))  # A's grad is 0 while B = 0
    assert all(p.grad is None for n, p in wrapped.named_parameters() if "serial_lora" not in n)


def test_default_alpha_is_twice_the_rank():
    wrapped, _ = wrap("bert")
    assert wrapped.peft_config["default"].alpha == 8.0
    assert all(p.scale == 2.0 for p in pairs(wrapped))


def test_input_projections_share_one_pair_owned_once():
    wrapped, _ = wrap("bert")
    block = wrapped.base_model.model.encoder.layer[0].attention.self
    q, k, v = block.query, block.key, block.value
    assert q.pair is k.pair is v.pair
    assert list(q.serial_lora_pair) == ["default"] and not k.serial_lora_pair and not v.serial_lora_pair
    names = [n for n, _ in wrapped.named_parameters() if "serial_lora" in n]
    assert len(names) == 2 * 2 and all(".query.serial_lora_pair.default." in n for n in names)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_equals_unmerged_and_returns_base_class(kind):
    wrapped, x = wrap(kind, adapt_out=True)
    base_cls = type(wrapped.get_base_model())
    randomize_adapters(wrapped)
    unmerged = run(wrapped, x)
    merged_model = wrapped.merge_and_unload()
    merged = run(merged_model, x)
    assert type(merged_model) is base_cls
    assert not any(isinstance(m, (lp.SerialLoraLayer, sl.SerialLoraPair)) for m in merged_model.modules())
    assert set(merged_model.state_dict()) == set(build(kind)[0].state_dict())
    rel = (merged - unmerged).norm() / unmerged.norm()
    assert rel <= 1e-5, rel


def test_merge_adapter_then_unmerge_restores_weights():
    wrapped, x = wrap("llama")
    randomize_adapters(wrapped)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    unmerged = run(wrapped, x)
    wrapped.merge_adapter()
    assert all(m.merged for m in wrapped.modules() if isinstance(m, lp.SerialLoraLayer))
    assert (run(wrapped, x) - unmerged).norm() / unmerged.norm() <= 1e-5
    wrapped.unmerge_adapter()
    after = wrapped.state_dict()
    assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in before.items() if k.endswith("weight"))


def test_safe_merge_refuses_a_non_finite_pair_and_keeps_the_weights():
    wrapped, x = wrap("bert")
    pairs(wrapped)[0].B.data[0, 0] = float("nan")
    before = {k: v.clone() for k, v in wrapped.state_dict().items() if "base_layer" in k}
    with pytest.raises(ValueError, match="NaN/inf"):
        wrapped.merge_adapter(safe_merge=True)
    after = wrapped.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_unload_gives_the_base_model_back():
    model, x = build("bert")
    ref = run(model, x)
    wrapped = peft.get_peft_model(model, lp.SerialLoraConfig(r=4))
    randomize_adapters(wrapped)
    assert not torch.allclose(run(wrapped, x), ref)
    base = wrapped.unload()
    assert type(base) is transformers.BertModel
    assert torch.equal(run(base, x), ref)


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_gives_base_outputs(merged):
    model, x = build("bert")
    ref = run(model, x)
    wrapped = peft.get_peft_model(model, lp.SerialLoraConfig(r=4))
    randomize_adapters(wrapped)
    adapted = run(wrapped, x)
    if merged:
        wrapped.merge_adapter()  # disabling unmerges, as PEFT LoRA does
    with wrapped.disable_adapter():
        assert torch.allclose(run(wrapped, x), ref, atol=1e-6)
    assert torch.allclose(run(wrapped, x), adapted, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_from_pretrained_round_trip(kind, tmp_path):
    wrapped, x = wrap(kind, adapt_out=kind == "bert")
    randomize_adapters(wrapped)
    want = run(wrapped, x)
    wrapped.save_pretrained(tmp_path)
    fresh, _ = build(kind)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    assert isinstance(loaded.peft_config["default"], lp.SerialLoraConfig)
    assert torch.equal(run(loaded, x), want)


def test_adapter_file_holds_each_adapter_tensor_once(tmp_path):
    wrapped, _ = wrap("llama", adapt_out=True)
    wrapped.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    own = {n.replace(".default.", "."): p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert set(saved) == set(own)  # only the pairs: no base weight, no merged flag, nothing twice
    assert sum(v.numel() for v in saved.values()) == wrapped.get_nb_trainable_parameters()[0]
    assert len(saved) == 2 * len(pairs(wrapped))


def test_second_adapter_is_refused_and_the_first_keeps_working():
    wrapped, x = wrap("bert")
    randomize_adapters(wrapped)
    want = run(wrapped, x)
    with pytest.raises(NotImplementedError, match="one adapter per model"):
        wrapped.add_adapter("other", lp.SerialLoraConfig(r=2))
    assert list(wrapped.peft_config) == ["default"]
    assert torch.equal(run(wrapped, x), want)


def test_explicit_target_modules_share_the_block_pair():
    wrapped, _ = wrap("bert", target_modules=["query", "value"])
    block = wrapped.base_model.model.encoder.layer[1].attention.self
    assert block.query.pair is block.value.pair and not isinstance(block.key, lp.SerialLoraLayer)
    assert wrapped.get_nb_trainable_parameters()[0] == 2 * (2 * WIDTH * 4)


@pytest.mark.parametrize("target,message", [(["intermediate.dense"], "not a q/k/v"),
                                            (["attention.output.dense"], "adapt_out=True"),
                                            (["nothing_here"], "matches no module")])
def test_bad_target_modules_name_the_problem(target, message):
    model, _ = build("bert")
    with pytest.raises(ValueError, match=message):
        peft.get_peft_model(model, lp.SerialLoraConfig(r=4, target_modules=target))
    assert not any(isinstance(m, lp.SerialLoraLayer) for m in model.modules())  # refused before any change


def test_float32_adapter_on_bfloat16_model():
    model, x = build("llama", dtype=torch.bfloat16)
    ref = run(model, x)
    wrapped = peft.get_peft_model(model, lp.SerialLoraConfig(r=4))  # PEFT upcasts the adapter to float32
    assert all(p.A.dtype == torch.float32 for p in pairs(wrapped))
    assert torch.equal(run(wrapped, x), ref)


def test_lora_plus_groups_on_the_wrapped_model():
    wrapped, _ = wrap("vit", adapt_out=True)
    slow, fast = lp.lora_plus_param_groups(wrapped, lr=1e-3, ratio=16)
    assert fast["lr"] == 16 * slow["lr"]
    assert {id(p) for p in fast["params"]} == {id(m.B) for m in pairs(wrapped)}
    assert {id(p) for p in slow["params"]} == {id(m.A) for m in pairs(wrapped)}


def test_config_round_trips_through_json(tmp_path):
    config = lp.SerialLoraConfig(r=3, alpha=5.0, adapt_out=True)
    config.save_pretrained(tmp_path)
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, lp.SerialLoraConfig)
    assert (loaded.r, loaded.alpha, loaded.adapt_out, loaded.peft_type) == (3, 5.0, True, lp.PEFT_TYPE)


@pytest.mark.parametrize("version", ["0.17.1", "0.22.0"])
def test_peft_outside_the_supported_range_raises_import_error(version, monkeypatch):
    monkeypatch.setattr(peft, "__version__", version)
    monkeypatch.delitem(sys.modules, "lors.adapters.peft")
    with pytest.raises(ImportError, match=rf"peft>=0\.18,<0\.22 but peft {version} is installed"):
        importlib.import_module("lors.adapters.peft")


def test_reimport_keeps_the_method_registered(monkeypatch):
    monkeypatch.delitem(sys.modules, "lors.adapters.peft")
    try:
        again = importlib.import_module("lors.adapters.peft")
        wrapped = peft.get_peft_model(build("bert")[0], again.SerialLoraConfig(r=4))
        assert isinstance(wrapped.base_model, again.SerialLoraModel)  # PEFT builds the new module's classes
        assert peft.utils.peft_types.PeftType.SERIAL_LORA is again.PEFT_TYPE is lp.PEFT_TYPE
    finally:
        lp._register()  # point PEFT back at the classes the other tests use


def test_peft_type_member_behaves_like_a_builtin_one():
    PeftType = peft.utils.peft_types.PeftType
    assert PeftType("SERIAL_LORA") is PeftType["SERIAL_LORA"] is PeftType.SERIAL_LORA
    assert "SERIAL_LORA" in list(PeftType) and PeftType.SERIAL_LORA == "SERIAL_LORA"
    assert copy.deepcopy(PeftType.SERIAL_LORA) is PeftType.SERIAL_LORA
