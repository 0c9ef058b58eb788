"""Parameter accounting that counts every shared tensor once."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from lors.core.adaptive import AdaptiveLors
from lors.core.basis import SharedBasis
from lors.core.static import StaticLors


@dataclass(frozen=True)
class ParamCount:
    """Parameters split into LORS-shared, LORS-private and everything else."""
    shared: int
    private: int
    other: int

    @property
    def total(self) -> int:
        return self.shared + self.private + self.other

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def lors_split(lors: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shared, private) parameters of one StaticLors or AdaptiveLors."""
    if isinstance(lors, StaticLors):
        shared = [lors.shared_weight]
        if lors.bias is not None and lors.shared_bias:
            shared.append(lors.bias)
    elif isinstance(lors, AdaptiveLors):
        shared = [] if lors.generator is None else list(lors.generator.parameters())
    elif isinstance(lors, SharedBasis):
        shared = [lors.basis]
    else:
        raise TypeError(f"{type(lors).__name__} is not a LORS module")
    ids = {id(p) for p in shared}
    return shared, [p for p in lors.parameters() if id(p) not in ids]


def count_parameters(module: nn.Module) -> ParamCount:
    """Count ``module``'s parameters, each tensor once however many layers use it.

    ``shared`` holds W_shared (and a shared bias) of every StaticLors and the generator of
    every AdaptiveLors and the basis of every SharedBasis; ``private`` their per-layer factors,
    coefficients, E-generators and biases;
    ``other`` everything else.
    """
    seen, shared, private = set(), 0, 0
    for m in module.modules():
        if isinstance(m, (StaticLors, AdaptiveLors, SharedBasis)):
            sh, pr = lors_split(m)
            shared += sum(p.numel() for p in sh if id(p) not in seen)
            private += sum(p.numel() for p in pr if id(p) not in seen)
            seen.update(id(p) for p in sh + pr)
    total = sum(p.numel() for p in module.parameters())  # parameters() yields each tensor once
    return ParamCount(shared=shared, private=private, other=total - shared - private)
