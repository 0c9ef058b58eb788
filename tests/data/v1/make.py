"""How the version-1 checkpoints in this folder were written (lors 0.1.0 as of commit 42e3d9d,
before shared tensors moved to one owner per stack). Kept to document the files; running it
with a later lors writes the current format instead."""
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import lors

HERE = Path(__file__).parent


def encoder() -> nn.Module:
    """The plain model both files belong to: a 3-layer encoder, width 16."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False).eval()


def noisy(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


if __name__ == "__main__":
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    outputs = {"x": x}
    shared = encoder()
    lors.share_layers(shared, rank=2, groups=[1, 1, 2])
    noisy(shared)
    lors.save(shared, HERE / "share_layers.safetensors")
    outputs["share_layers"] = shared(x).detach()
    converted = encoder()
    noisy(converted)
    lors.convert_layers(converted, targets=["linear1"], form="lors", rank=3, groups=2)
    lors.convert_layers(converted, targets=["linear2"], form="basis", rank=4, groups=[[0], [1, 2]])
    lors.save(converted, HERE / "convert_layers.safetensors")
    outputs["convert_layers"] = converted(x).detach()
    save_file(outputs, str(HERE / "outputs.safetensors"))
