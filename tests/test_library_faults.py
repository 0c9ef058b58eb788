"""Library misuse gives one ValueError that names the problem and the fix (issue 11)."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lors
from lors.adapters import serial_lora as sl
from test_share import GPT


class Attention(nn.Module):
    """The smallest module Serial LoRA recognises: q/k/v projections (no transformers needed)."""

    def __init__(self, d=8):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):  # (B, T, d)
        return nn.functional.scaled_dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x))


def tiny_attention(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(Attention(), Attention())


def test_share_layers_non_int_rank():
    with pytest.raises(ValueError, match=r"rank must be an int or a list of 4 ints \(one per layer\), "
                                         r"got 2.5; use rank=2"):
        lors.share_layers(GPT(n_layer=4), rank=2.5)
    with pytest.raises(ValueError, match="groups must be an int or a list of 4 ints"):
        lors.share_layers(GPT(n_layer=4), groups="2")


def test_share_layers_python_list():
    layers = [nn.Linear(4, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="Python list of 3 layers.*pass nn.ModuleList"):
        lors.share_layers(layers, rank=2)


def test_share_layers_twice():
    model = GPT(n_layer=2)
    lors.share_layers(model, rank=2)
    with pytest.raises(ValueError, match=r"every Linear of Block is already shared \(attn.qkv, .*\): "
                                         r"call lors.merge"):
        lors.share_layers(model, rank=2)


def test_save_to_a_directory_or_an_unwritable_path(tmp_path):
    model = GPT(n_layer=2)
    with pytest.raises(ValueError, match="is a directory; pass a file name such as"):
        lors.save(model, tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write checkpoint .*writable directory"):
        lors.save(model, blocker / "m.safetensors")  # a parent that is a file: unwritable as root too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_load_a_file_without_layout(tmp_path):
    model = GPT(n_layer=2)
    path = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), str(path))
    with pytest.raises(ValueError, match="has no LORS layout.*model.load_state_dict"):
        lors.load(GPT(n_layer=2), path)
    with pytest.raises(ValueError, match="is a directory"):
        lors.load(model, tmp_path)


def test_load_a_file_with_a_broken_layout(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(GPT(n_layer=2).state_dict(), str(path), metadata={"lors": '{"format": "lors"}'})
    with pytest.raises(ValueError, match="is not a lors layout \\(no list of 'stacks'"):
        lors.load(GPT(n_layer=2), path)


def test_load_adapter_with_nan(tmp_path):
    model = tiny_attention()
    sl.inject(model, rank=2, alpha=4.0)
    path = tmp_path / "a.safetensors"
    sl.save_adapter(model, path)
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta)
    fresh = tiny_attention()
    with pytest.raises(ValueError, match=f"adapter tensor '{key}' .* has 1 non-finite"):
        sl.load_adapter(fresh, path)
    assert not any(isinstance(m, sl.SerialLoraLinear) for m in fresh.modules())  # untouched


def test_load_adapter_missing_or_unreadable(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        sl.load_adapter(tiny_attention(), tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sl.load_adapter(tiny_attention(), bad)


def test_save_adapter_to_a_directory(tmp_path):
    model = tiny_attention()
    sl.inject(model, rank=2, alpha=4.0)
    with pytest.raises(ValueError, match="is a directory"):
        sl.save_adapter(model, tmp_path)


def test_a_full_disk_is_a_value_error_and_an_os_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import lors.serialization as ckpt

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.SaveError, match="cannot write checkpoint") as info:
        lors.save(GPT(n_layer=2), tmp_path / "m.safetensors")
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    assert info.value.errno == 28 and info.value.strerror == "No space left on device"
    assert list(tmp_path.iterdir()) == []  # the partial temporary file is gone
