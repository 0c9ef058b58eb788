"""convert_layers: pretrained stacks (HF Llama and BERT, timm ViT, the project's GPT) into the
LORS and basis forms, initialised from their own weights."""
import copy

import pytest
import torch
from torch import nn

import lors
from lors import convert_layers, count_parameters, merge
from lors.models.gpt.model import GPT


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval(), lambda m, x: m(input_ids=x).logits, torch.randint(0, 64, (3, 12))


def _bert():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=32)
    return BertModel(cfg).eval(), lambda m, x: m(input_ids=x).last_hidden_state, torch.randint(0, 64, (3, 12))


def _vit():
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    return model.eval(), lambda m, x: m(x), torch.randn(2, 3, 16, 16)


def _gpt():
    model = GPT(vocab_size=50, block_size=16, n_layer=4, n_head=4, n_embd=32)
    return model.eval(), lambda m, x: m(x), torch.randint(0, 50, (3, 16))


MODELS = {"llama": _llama, "bert": _bert, "vit": _vit, "gpt": _gpt}
MIXED = {"attn.proj": "out", "mlp.fc2": "out"}  # writers of the residual stream: an output basis
FORMS = [("lors", "in"), ("basis", "in"), ("basis", "out")]


def _trained_like(model):
    """Give every Linear weight its own random values (an untrained HF model starts them all
    from one small normal, whose layers differ too little to test sharing)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
    return model


def _build(name):
    torch.manual_seed(0)
    model, run, x = MODELS[name]()
    return _trained_like(model), run, x


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("form,side", FORMS)
def test_full_rank_reproduces_the_outputs(name, form, side):
    model, run, x = _build(name)
    with torch.no_grad():
        ref = run(model, x)
    conv = convert_layers(model, form=form, side=side, rank="full", calibration=lambda: run(model, x))
    assert any(isinstance(m, lors.LorsLinear) for m in model.modules())
    with torch.no_grad():
        out = run(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert max(max(e) for e in conv.errors.values()) < 1e-6


@pytest.mark.parametrize("form,side", FORMS)
def test_error_falls_as_rank_grows(form, side):
    model, run, x = _build("gpt")
    with torch.no_grad():
        ref = run(model, x)
    errors, weight_errors = [], []
    for r in (2, 8, 16, 32):
        m = copy.deepcopy(model)
        conv = convert_layers(m, targets=["attn.proj", "mlp.fc1"], form=form, side=side, rank=r,
                              groups=None if form == "lors" else 2)
        with torch.no_grad():
            errors.append(float((run(m, x) - ref).norm() / ref.norm()))
        weight_errors.append(sum(sum(e) for e in conv.errors.values()))
    assert all(a > b for a, b in zip(weight_errors, weight_errors[1:])), weight_errors
    assert errors[-1] < errors[0], errors


def test_identical_layers_leave_a_zero_residual():
    model, run, x = _build("gpt")
    for block in model.blocks[1:]:
        block.load_state_dict(model.blocks[0].state_dict())
    with torch.no_grad():
        ref = run(model, x)
    conv = convert_layers(model, form="lors", budget=0.5)
    for t, stacks in conv.stacks.items():
        for lors_ in stacks:
            for i in range(lors_.num_layers):
                torch.testing.assert_close(lors_.weight(i), lors_.shared_weight, rtol=0, atol=1e-6)
    assert all(r == 0 for ranks in conv.ranks.values() for r in ranks)  # no rank spent on nothing
    with torch.no_grad():
        torch.testing.assert_close(run(model, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form,side", FORMS)
@pytest.mark.parametrize("allocation", ["greedy", "uniform"])
@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_budget_is_met_to_one_rank_step(form, side, allocation, budget):
    model, run, x = _build("llama")
    stack = model.model.layers
    conv = convert_layers(model, form=form, side=side, budget=budget, allocation=allocation,
                          groups=2 if form == "basis" else None, calibration=lambda: run(model, x))
    original = sum(sum(p.numel() for p in layer.parameters() if p.ndim == 2) for layer in _build("llama")[0].model.layers)
    assert conv.params_before == original  # Llama's Linears have no bias
    counted = count_parameters(stack)
    assert conv.params_after == counted.shared + counted.private
    # one rank step: (out + in) for a layer's residual, (in + g * out) or (out + g * in) for a basis
    steps = {}
    for t, mods in conv.stacks.items():
        out, inp = mods[0].out_features, mods[0].in_features
        steps[t] = [out + inp] * len(stack) if form == "lors" else [
            (inp + len(m.members) * out) if side == "in" else (out + len(m.members) * inp) for m in mods]
    # greedy: less than the dearest single step is left; uniform: less than one step of every
    # unit of each target
    slack = max(max(s) for s in steps.values()) if allocation == "greedy" else sum(sum(s) for s in steps.values())
    assert conv.params_after <= budget * conv.params_before
    assert budget * conv.params_before - conv.params_after < slack


def test_activation_aware_conversion_has_lower_output_error_on_the_calibration_data():
    model, run, x = _build("llama")
    with torch.no_grad():
        ref = run(model, x)
    out = {}
    for aware in (False, True):
        for form in ("lors", "basis"):
            m = copy.deepcopy(model)
            convert_layers(m, form=form, budget=0.5, calibration=(lambda: run(m, x)) if aware else None)
            with torch.no_grad():
                out[form, aware] = float((run(m, x) - ref).norm() / ref.norm())
    for form in ("lors", "basis"):
        assert out[form, True] < out[form, False], out


def test_activations_given_as_a_dict_equal_a_recording_run():
    model, run, x = _build("gpt")
    acts = {"mlp.fc1": [], "attn.proj": []}
    hooks = [b.get_submodule(t).register_forward_pre_hook(lambda _m, a, t=t: acts[t].append(a[0].detach()))
             for b in model.blocks for t in acts]
    with torch.no_grad():
        run(model, x)
    for h in hooks:
        h.remove()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ca = convert_layers(a, targets=list(acts), budget=0.4, calibration=acts)
    cb = convert_layers(b, targets=list(acts), budget=0.4, calibration=lambda: run(b, x))
    assert ca.ranks == cb.ranks
    with torch.no_grad():
        torch.testing.assert_close(run(a, x), run(b, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form,side,groups", [(f, s, [[0, 1], [2, 3]]) for f, s in FORMS] + [
    ("basis", {"self_attn.o_proj": "out", "mlp.down_proj": "out"}, [[0, 1], [2, 3]]),
    ("lors", "in", None)])  # one group of every layer, as share_layers would lay it out
def test_save_load_merge_equals_the_converted_model(tmp_path, form, side, groups):
    model, run, x = _build("llama")
    convert_layers(model, form=form, side=side, budget=0.5, groups=groups,
                   calibration=lambda: run(model, x))
    with torch.no_grad():
        converted = run(model, x)
    path = lors.save(model, tmp_path / "m.safetensors")
    fresh, _, _ = _build("llama")
    lors.load(fresh, path)  # a plain model: the layout re-creates the converted layers
    assert count_parameters(fresh) == count_parameters(model)
    merge(fresh)
    assert not any(isinstance(m, lors.LorsLinear) for m in fresh.modules())
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, x), converted, rtol=1e-5, atol=1e-5)


def test_side_per_target_puts_each_basis_where_asked():
    model, run, x = _build("gpt")
    with torch.no_grad():
        ref = run(model, x)
    conv = convert_layers(model, form="basis", groups=2, side=MIXED, rank="full", calibration=lambda: run(model, x))
    assert {t: {m.side for m in ms} for t, ms in conv.stacks.items()} == {
        "attn.qkv": {"in"}, "attn.proj": {"out"}, "mlp.fc1": {"in"}, "mlp.fc2": {"out"}}
    with torch.no_grad():
        torch.testing.assert_close(run(model, x), ref, rtol=1e-5, atol=1e-5)


def test_a_shared_tensor_is_stored_once(tmp_path):
    from safetensors.torch import load_file
    model, run, x = _build("gpt")
    convert_layers(model, targets="mlp.fc1", form="basis", rank=8)
    stored = load_file(str(lors.save(model, tmp_path / "m.safetensors")))
    assert [k for k in stored if k.endswith(".basis")] == ["blocks.lors.mlp.fc1.0.basis"]


def test_the_report_names_every_layer_and_target():
    model, run, x = _build("gpt")
    conv = convert_layers(model, targets=["attn.proj", "mlp.fc2"], budget=0.5, calibration=lambda: run(model, x))
    table = conv.table().splitlines()
    assert "attn.proj" in table[1] and "mlp.fc2" in table[1] and len(table) == 2 + len(model.blocks)
    summary = conv.summary()
    assert summary["params_after"] <= 0.5 * summary["params_before"] and len(summary["errors"]["mlp.fc2"]) == 4


class _Mixed(nn.Module):
    def __init__(self, widths):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(w, w), nn.ReLU()) for w in widths)


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0.0), r"0 < budget < 1, got 0.0"),
    (dict(budget=1.0), r"0 < budget < 1, got 1.0"),
    (dict(budget=-0.5), r"0 < budget < 1"),
    (dict(budget=0.5, rank=4), "not both"),
    (dict(), "not neither"),
    (dict(rank=4, targets="ln1"), r"target 'ln1' is a LayerNorm, not an nn.Linear"),
    (dict(rank=4, targets="attn.nope"), r"target 'attn.nope' matches nothing"),
    (dict(rank=4, form="svd"), r"form must be one of \('lors', 'basis'\)"),
    (dict(rank=4, groups=[[0, 1], [1, 2, 3]]), r"every layer 0..3 exactly once"),
    (dict(rank=10_000), r"rank 10000 for layer 0 of target '.*' is out of range; use 0 <= rank <= "),
    (dict(rank=4, targets="mlp.fc1", calibration={"mlp.fc1": [torch.randn(5, 7)] * 4}),
     r"calibration for target 'mlp.fc1' layer 0 has shape \(5, 7\); the Linear reads inputs of width 32"),
    (dict(rank=4, targets="mlp.fc1", calibration={"mlp.fc2": []}), "no activations for target 'mlp.fc1'"),
    (dict(budget=0.01, form="lors", groups=1), r"the shared weights and biases alone take"),
    (dict(rank=4, form="basis", side={"mlp.fc3": "out"}), r"side names targets \['mlp.fc3'\] that are not converted"),
    (dict(rank=4, form="basis", side="up"), r"side must be one of \('in', 'out'\)"),
])
def test_bad_input_is_a_named_error_and_leaves_the_model_alone(kwargs, match):
    model, run, x = _build("gpt")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        convert_layers(model, **kwargs)
    assert not any(isinstance(m, lors.LorsLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layers_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match=r"layer 1 of 3 has Linear '0' with parameters .*convert_layers needs identical"):
        convert_layers(_Mixed([8, 16, 8]), rank=2)


def test_gpt2_conv1d_gets_a_clear_message():
    from transformers import GPT2Config, GPT2Model
    model = GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match=r"Conv1D .*GPT-2's transposed Linear"):
        convert_layers(model, rank=4)


def test_recorded_moments_passed_as_a_plain_dict_are_refused_not_read_as_activations():
    from lors.core import input_moments
    from lors.core.share import find_layers
    model, run, x = _build("gpt")
    layers = list(find_layers(model)[1])
    moments = input_moments(layers, ["mlp.fc1"], lambda: run(model, x))
    with pytest.raises(TypeError, match="not iterable"):
        dict(moments)  # a type of its own, not a dict subclass
    with pytest.raises(ValueError, match="an input moment rather than activations: pass the InputMoments"):
        convert_layers(model, targets="mlp.fc1", rank=4, calibration=dict(moments.by_target))
    assert not any(isinstance(m, lors.LorsLinear) for m in model.modules())
    convert_layers(model, targets="mlp.fc1", rank=4, calibration=moments)  # the object itself works
