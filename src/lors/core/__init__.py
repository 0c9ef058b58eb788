"""LORS maths: static and adaptive low-rank residual sharing. Depends on torch alone."""
from lors.core.adaptive import AdaptiveLors
from lors.core.basis import SharedBasis
from lors.core.convert import Conversion, InputMoments, convert_layers, input_moments
from lors.core.count import ParamCount, count_parameters
from lors.core.share import LorsLinear, find_layers, merge, share_layers
from lors.core.stack import LayerStack, substack
from lors.core.static import StaticLors

__all__ = ["AdaptiveLors", "Conversion", "InputMoments", "LayerStack", "LorsLinear", "ParamCount", "SharedBasis", "StaticLors",
           "convert_layers", "count_parameters", "find_layers", "input_moments", "merge", "share_layers",
           "substack"]
