"""lors.save / lors.load: exact round trips, shared tensors stored once, clear errors."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lors
from lors import count_parameters, share_layers
from test_share import GPT, perturb


def shared_gpt(seed=0, rank=4):
    torch.manual_seed(seed)
    model = GPT(n_layer=4)
    share_layers(model, targets=["attn.qkv", "mlp.fc1"], rank=rank, groups=[1, 1, 2, 2])
    perturb(model)
    return model


def test_save_load_is_exact_and_stores_each_shared_tensor_once(tmp_path):
    model = shared_gpt()
    path = tmp_path / "model.safetensors"
    side = lors.save(model, path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        stored = sum(f.get_tensor(k).numel() for k in keys)
    assert sorted(k for k in keys if "shared_weight" in k) == [
        "h.0.attn.qkv.lors.shared_weight", "h.0.mlp.fc1.lors.shared_weight"]
    assert stored == count_parameters(model).total
    assert json.loads(side.read_text())["stacks"][0]["target"] in {"attn.qkv", "mlp.fc1"}

    twin = shared_gpt(seed=1)  # same layout, different values
    lors.load(twin, path)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    idx = torch.randint(0, 50, (2, 5))
    assert torch.equal(model(idx), twin(idx))


def test_load_into_the_plain_model_reapplies_the_layout(tmp_path):
    model = shared_gpt()
    lors.save(model, tmp_path / "m.safetensors")
    torch.manual_seed(3)
    plain = GPT(n_layer=4)
    lors.load(plain, tmp_path / "m.safetensors")
    assert isinstance(plain.h[3].mlp.fc1, lors.LorsLinear)
    assert plain.h[3].mlp.fc1.lors.groups == [1, 1, 2, 2]
    idx = torch.randint(0, 50, (2, 5))
    assert torch.equal(model(idx), plain(idx))


def test_state_dict_round_trip():
    model, twin = shared_gpt(), shared_gpt(seed=2)
    twin.load_state_dict(model.state_dict())
    idx = torch.randint(0, 50, (1, 4))
    assert torch.equal(model(idx), twin(idx))


def test_non_finite_checkpoint_is_rejected(tmp_path):
    model = shared_gpt()
    path = tmp_path / "m.safetensors"
    lors.save(model, path)
    tensors = load_file(str(path))
    tensors["h.0.mlp.fc1.lors.A.2"][0, 0, 0] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"tensor 'h.0.mlp.fc1.lors.A.2' has 1 non-finite"):
        lors.load(shared_gpt(), path)


def test_checkpoint_with_other_shapes_is_rejected(tmp_path):
    lors.save(shared_gpt(rank=4), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'h.0.attn.qkv.lors.A.0' has shape \(1, 4, 32\), "
                                         r"the model has \(1, 2, 32\)"):
        lors.load(shared_gpt(rank=2), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="shares 4 layers at 'h', this model has 3"):
        lors.load(GPT(n_layer=3), tmp_path / "m.safetensors")
    smaller = GPT(n_layer=3)
    share_layers(smaller, targets=["attn.qkv", "mlp.fc1"], rank=4)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['h.0.attn.qkv.lors.A.3'"):
        lors.load(smaller, tmp_path / "m.safetensors")


def test_unreadable_or_missing_checkpoint(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="does not exist"):
        lors.load(shared_gpt(), path)
    lors.save(shared_gpt(), path)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a crash mid-copy
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lors.load(shared_gpt(), path)
