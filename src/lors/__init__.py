"""lors: parameter-efficient network stacking with low-rank residuals (LORS).

Core API::

    lors.StaticLors, lors.AdaptiveLors      # the two LORS forms (paper eq. 7-12)
    lors.share_layers(stack, targets, rank, groups)   # fresh, for training from scratch
    lors.convert_layers(stack, targets, form, budget, calibration=...)  # from pretrained weights
    lors.merge(model)                       # plain nn.Linears, outputs unchanged
    lors.count_parameters(model)            # shared tensors counted once
    lors.save(model, path) / lors.load(model, path)
    lors.save_pretrained(model, folder, tokenizer) / lors.from_pretrained(folder)  # HuggingFace folders
    lors.substack(stack, [0, 1])            # some layers of a shared stack, as a stack of their own
"""
from lors.hf import from_pretrained, save_pretrained
from lors.serialization import load, save
from lors.core import (AdaptiveLors, Conversion, LorsLinear, ParamCount, SharedBasis, StaticLors,
                       convert_layers, count_parameters, find_layers, merge, share_layers, substack)

__version__ = "0.1.0"
__all__ = ["AdaptiveLors", "Conversion", "LorsLinear", "ParamCount", "SharedBasis", "StaticLors",
           "convert_layers", "count_parameters", "find_layers", "from_pretrained", "load", "merge", "save",
           "save_pretrained", "share_layers", "substack"]
