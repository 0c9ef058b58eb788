"""lors.save / lors.load: exact round trips, shared tensors stored once, clear errors."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn
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
    assert lors.save(model, path) == path
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        stored = sum(f.get_tensor(k).numel() for k in keys)
        layout = json.loads(f.metadata()["lors"])  # the layout lives in the file itself
    assert sorted(k for k in keys if "shared_weight" in k) == [
        "h.lors.attn.qkv.0.shared_weight", "h.lors.mlp.fc1.0.shared_weight"]
    assert stored == count_parameters(model).total
    assert layout["stacks"][0]["target"] in {"attn.qkv", "mlp.fc1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # one file

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
    tensors["h.lors.mlp.fc1.0.A.2"][0, 0, 0] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"tensor 'h.lors.mlp.fc1.0.A.2' has 1 non-finite"):
        lors.load(shared_gpt(), path)


def test_checkpoint_with_other_shapes_is_rejected(tmp_path):
    lors.save(shared_gpt(rank=4), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'h.lors.attn.qkv.0.A.0' has shape \(1, 4, 32\), "
                                         r"the model has \(1, 2, 32\)"):
        lors.load(shared_gpt(rank=2), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="shares 4 layers at 'h', this model has 3"):
        lors.load(GPT(n_layer=3), tmp_path / "m.safetensors")
    smaller = GPT(n_layer=3)
    share_layers(smaller, targets=["attn.qkv", "mlp.fc1"], rank=4)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['h.3.attn.proj.bias'"):
        lors.load(smaller, tmp_path / "m.safetensors")


def test_unreadable_or_missing_checkpoint(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="does not exist"):
        lors.load(shared_gpt(), path)
    lors.save(shared_gpt(), path)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a crash mid-copy
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lors.load(shared_gpt(), path)


def test_two_checkpoints_with_one_stem_keep_their_own_layouts(tmp_path):
    lors.save(shared_gpt(rank=4), tmp_path / "enc.v1")
    lors.save(shared_gpt(rank=2), tmp_path / "enc.v2")  # one stem, two files
    for name, rank in [("enc.v1", 4), ("enc.v2", 2)]:
        plain = GPT(n_layer=4)
        lors.load(plain, tmp_path / name)
        assert plain.h[1].attn.qkv.lors.ranks == [rank] * 4, name


def test_removing_layer_0_keeps_the_shared_tensors_in_the_checkpoint(tmp_path):
    model = shared_gpt()
    del model.h[0]  # layer 0 used to be the only owner of the shared tensors
    path = tmp_path / "m.safetensors"
    lors.save(model, path)
    stored = load_file(str(path))
    assert "h.lors.attn.qkv.0.shared_weight" in stored
    assert sum(t.numel() for t in stored.values()) == count_parameters(model).total
    twin = shared_gpt(seed=1)
    del twin.h[0]
    lors.load(twin, path)
    idx = torch.randint(0, 50, (2, 5))
    assert torch.equal(model(idx), twin(idx))
    with pytest.raises(ValueError, match="removed, sliced or copied after share_layers"):
        lors.load(GPT(n_layer=3), path)  # a plain model cannot be re-shared as layers 1..3 of 4


def test_saving_a_module_without_tensors_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ModuleList holds no parameters or buffers"):
        lors.save(torch.nn.ModuleList(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


V1 = Path(__file__).parent / "data" / "v1"  # written by lors before the stack owned its shared tensors


def _v1_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("name", ["share_layers", "convert_layers"])
@pytest.mark.parametrize("into", ["plain", "shared"])
def test_a_version_1_checkpoint_loads_through_the_key_map(name, into):
    with safe_open(str(V1 / f"{name}.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["lors"])["version"] == 1
        assert any(".0.linear1.lors." in k for k in f.keys())  # the old keys
    model = _v1_encoder()
    if into == "shared":  # the model the run rebuilt before resuming
        if name == "share_layers":
            share_layers(model, rank=2, groups=[1, 1, 2])
        else:
            lors.convert_layers(model, targets=["linear1"], form="lors", rank=3, groups=2)
            lors.convert_layers(model, targets=["linear2"], form="basis", rank=4, groups=[[0], [1, 2]])
    lors.load(model, V1 / f"{name}.safetensors")
    expected = load_file(str(V1 / "outputs.safetensors"))
    with torch.no_grad():
        assert torch.allclose(model(expected["x"]), expected[name], atol=1e-6)
    assert any(k.startswith("layers.lors.linear1.") for k in model.state_dict())


def test_tensor_files_are_written_with_the_modes_the_umask_gives(tmp_path):
    import os
    import stat

    from lors.engine.checkpoint import save_checkpoint
    model = shared_gpt()
    umask = os.umask(0o022)
    try:
        lors.save(model, tmp_path / "m.safetensors")
        ckpt = save_checkpoint(tmp_path / "run", 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "m.safetensors", *ckpt.iterdir()]}
    assert set(modes.values()) == {0o644}, modes  # model, optimizer, state.json alike


@pytest.mark.parametrize("other", [dict(n_layer=3), dict(d=16), dict(vocab=60)])
def test_a_refused_checkpoint_leaves_the_plain_model_unchanged(tmp_path, other):
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    lors.convert_layers(model, targets=["mlp.fc1", "attn.proj"], form="basis", rank=8, groups=2)
    path = lors.save(model, tmp_path / "converted.safetensors")
    plain = GPT(**{"n_layer": 4, **other})
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="it was saved with|model it was saved from"):
        lors.load(plain, path)
    assert not any(isinstance(m, lors.LorsLinear) for m in plain.modules())
    assert type(plain.h) is nn.ModuleList
    after = plain.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    plain(torch.randint(0, 10, (1, 5)))  # still runs
