"""Parameter accounting that counts every shared tensor once."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from lors.core.adaptive import AdaptiveLors
from lors.core.stack import LayerStack


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
    """(shared, private) parameters of one stack module (StaticLors, SharedBasis) or AdaptiveLors:
    its ``shared_parameters()`` and the rest."""
    if not isinstance(lors, (LayerStack, AdaptiveLors)):
        raise TypeError(f"{type(lors).__name__} is not a LORS module")
    shared = lors.shared_parameters()
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
        if isinstance(m, (LayerStack, AdaptiveLors)):
            sh, pr = lors_split(m)
            shared += sum(p.numel() for p in sh if id(p) not in seen)
            private += sum(p.numel() for p in pr if id(p) not in seen)
            seen.update(id(p) for p in sh + pr)
    total = sum(p.numel() for p in module.parameters())  # parameters() yields each tensor once
    return ParamCount(shared=shared, private=private, other=total - shared - private)
