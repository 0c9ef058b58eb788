"""ResNet backbone from torchvision, returning the C2..C5 feature maps (strides 4 to 32), or the
first ``num_levels`` of them."""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}
STRIDES = (4, 8, 16, 32)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its pooling and classifier.

    Args:
        depth: 18, 34, 50, 101 or 152.
        weights: ``None`` for random init (the default: nothing is downloaded), a path to a
            local state dict (``.pth``/``.pt``, a torchvision ResNet's keys, ``fc.*`` ignored), or
            a torchvision weights name such as ``"ResNet50_Weights.IMAGENET1K_V1"`` (downloads).
        frozen_stages: freeze the stem and the first ``frozen_stages`` residual stages
            (AdaMixer and mmdetection use 1; -1 freezes nothing, 0 only the stem).
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) while
            training, as detectors trained with 2 images per GPU do.
        num_levels: return C2..C(1+num_levels); 4 (the default) is AdaMixer's C2..C5. Fewer
            levels drop the deepest stages altogether (for small images, where C5 is a few
            cells), so they are neither computed nor counted.

    Batch norms stay ``nn.BatchNorm2d`` (not frozen copies) so that the parameter count is
    torchvision's: ResNet-50 without ``fc`` has 23,508,032 parameters.
    """

    def __init__(self, depth: int = 50, weights: str | None = None, frozen_stages: int = 1,
                 norm_eval: bool = True, num_levels: int = 4):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"backbone depth {depth} is not a torchvision ResNet; use one of {sorted(DEPTHS)}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        if not 1 <= num_levels <= 4:
            raise ValueError(f"num_levels must be in 1..4 (C2 up to C2..C5), got {num_levels}")
        if frozen_stages > num_levels:
            raise ValueError(f"frozen_stages {frozen_stages} exceeds num_levels {num_levels}: "
                             f"only {num_levels} residual stages are built")
        net = getattr(torchvision.models, DEPTHS[depth])(weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        for k in range(1, num_levels + 1):  # torchvision's names, so its state dicts load as they are
            setattr(self, f"layer{k}", getattr(net, f"layer{k}"))
        self.num_levels = num_levels
        width = 64 if depth < 50 else 256  # BasicBlock vs Bottleneck expansion
        self.out_channels = [width, 2 * width, 4 * width, 8 * width][:num_levels]
        self.strides = list(STRIDES[:num_levels])
        self.depth, self.frozen_stages, self.norm_eval = depth, frozen_stages, norm_eval
        if weights:
            self.load_weights(weights)
        self._freeze()
        self.train()  # puts frozen stages and (with norm_eval) batch norms in eval mode

    def load_weights(self, weights: str) -> None:
        """Load a local state dict or a torchvision weights name (see the class docstring)."""
        if self.stem[0].weight.is_meta:
            return  # building on the meta device for counting: nothing to load
        path = Path(weights).expanduser()
        if path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                raise ValueError(f"cannot read backbone weights {path}: {err}") from err
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        elif "Weights." in weights or weights.isupper() or weights == "DEFAULT":
            name = weights if "." in weights else f"ResNet{self.depth}_Weights.{weights}"
            try:
                state = torchvision.models.get_weight(name).get_state_dict(progress=True)
            except Exception as err:
                raise ValueError(
                    f"cannot get torchvision weights {name!r}: {err}; download them where you have "
                    f"internet and pass the file's path as backbone.weights") from err
        else:
            raise ValueError(
                f"backbone.weights {weights!r} is neither an existing file nor a torchvision weights "
                f"name like 'ResNet{self.depth}_Weights.IMAGENET1K_V1'")
        renamed = {}
        for key, value in state.items():
            if key.startswith("fc."):
                continue
            for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
                if key.startswith(old):
                    key = new + key[len(old):]
            if key.startswith("layer") and int(key[5]) > self.num_levels:
                continue  # a stage this backbone does not build (num_levels < 4)
            renamed[key] = value
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        absent = sorted({k.split(".")[0] for k in missing if k.startswith("layer")})
        if missing and not unexpected and absent and all(k.startswith(tuple(absent)) for k in missing):
            raise ValueError(f"backbone weights {weights!r} hold no {', '.join(absent)} (saved for fewer "
                             f"levels): set backbone.num_levels={int(absent[0][5]) - 1}, or use weights "
                             f"with every stage")
        if missing or unexpected:
            raise ValueError(f"backbone weights {weights!r} do not fit ResNet-{self.depth}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    def stages(self) -> list[nn.Module]:
        """The residual stages that are built: layer1 .. layer<num_levels>."""
        return [getattr(self, f"layer{k}") for k in range(1, self.num_levels + 1)]

    def _frozen_modules(self) -> list[nn.Module]:
        stages = [self.stem, *self.stages()]
        return stages[: self.frozen_stages + 1] if self.frozen_stages >= 0 else []

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> [C2 (B, c, H/4, W/4), C3 (B, 2c, H/8, W/8), C4, C5 (B, 8c, H/32, W/32)],
        c = 256 for ResNet-50 and deeper, 64 for ResNet-18/34 (sizes rounded up); the first
        ``num_levels`` of them."""
        x = self.stem(images)
        features = []
        for layer in self.stages():
            x = layer(x)
            features.append(x)
        return features
