"""Initialisation, one tensor family per test, against the formula that defines it.

``init="official"`` must equal the authors' code (li-jl16/LORS,
``factorized_adaptive_mixing_operator.py`` and the stage's ``init_weights``): there every factor
gets ``nn.init.kaiming_uniform_`` at its defaults, whose bound comes from the fan-in of the
tensor *as that code shapes it*. The expected bounds below are computed with torch's own fan-in
and gain functions on those shapes. Each uniform family is checked on both sides: no value
beyond the bound, and the largest within 10 % of it (so a bound that changes fails).
"""
import inspect
import math

import pytest
import torch
from torch import nn

from lors.core import AdaptiveLors, StaticLors, share_layers
from lors.core.static import DEFAULT_INIT
from lors.models.adamixer.config import AdaptiveLorsConfig, LorsConfig, StaticLorsConfig
from lors.models.adamixer.mixing import LorsMixer, build_mixing
from lors.models.adamixer.stage import DecoderStage

G, C, P_IN, P_OUT, D, R, K = 2, 64, 16, 32, 64, 4, [1, 1, 2, 3]  # the bench LORS config's sizes
c = C // G


def kaiming_default_bound(official_shape) -> float:
    """The bound of ``nn.init.kaiming_uniform_(torch.empty(official_shape))`` (a=0)."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(torch.empty(official_shape))
    return math.sqrt(3.0) * nn.init.calculate_gain("leaky_relu", 0) / math.sqrt(fan_in)


def linear_default_bound(fan_in: int) -> float:
    """The bound of nn.Linear's default weight and bias init (kaiming_uniform_(a=sqrt(5)))."""
    return math.sqrt(3.0) * nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in)


def assert_uniform(t: torch.Tensor, bound: float, what: str) -> None:
    top = t.detach().abs().max().item()
    assert top <= bound * (1 + 1e-6), f"{what}: {top:.4g} exceeds the bound {bound:.4g}"
    assert top >= 0.9 * bound, f"{what}: largest {top:.4g} is far below the bound {bound:.4g}"


def assert_zero(t: torch.Tensor, what: str) -> None:
    assert not t.detach().any(), f"{what} should start at zero"


@pytest.fixture
def mixing():
    torch.manual_seed(0)
    return build_mixing(num_stages=4, query_dim=D, feat_dim=C, num_groups=G, in_points=P_IN,
                        out_points=P_OUT, adaptive=AdaptiveLorsConfig(enabled=True, rank=R, groups=K),
                        static=StaticLorsConfig(enabled=True, rank=R, groups=1), init="official")


def test_official_shared_generators_have_zero_weight_and_linear_default_bias(mixing):
    for part in (mixing.generator.channel, mixing.generator.spatial):
        assert_zero(part.generator.weight, "shared generator weight")
        assert_uniform(part.generator.bias, linear_default_bound(D), "shared generator bias")


def test_official_e_generators_are_zero(mixing):
    for part in (mixing.generator.channel, mixing.generator.spatial):
        for e in part.E:
            assert_zero(e.weight, "E-generator weight")
            assert_zero(e.bias, "E-generator bias")


def test_official_channel_factors_match_the_authors_shapes(mixing):
    # authors: ml (G K, c, r) left of E, mr (G K, r, c) right of it; here B (G, K, c, r), A (G, K, r, c)
    for i, k in enumerate(K):
        assert_uniform(mixing.generator.channel.B[i], kaiming_default_bound((G * k, c, R)), f"channel B[{i}]")
        assert_uniform(mixing.generator.channel.A[i], kaiming_default_bound((G * k, R, c)), f"channel A[{i}]")


def test_official_spatial_factors_match_the_authors_shapes(mixing):
    # authors: S = sl E sr with sl (G K, P_out, r), sr (G K, r, P_in), applied as S x; here the
    # transpose, x^T B E A with B (G, K, P_in, r) = sr^T and A (G, K, r, P_out) = sl^T
    for i, k in enumerate(K):
        assert_uniform(mixing.generator.spatial.B[i], kaiming_default_bound((G * k, R, P_IN)), f"spatial B[{i}]")
        assert_uniform(mixing.generator.spatial.A[i], kaiming_default_bound((G * k, P_OUT, R)), f"spatial A[{i}]")


def test_official_static_output_projection(mixing):
    proj, fan_in = mixing.out_proj, c * P_OUT * G
    assert_uniform(proj.shared_weight, linear_default_bound(fan_in), "shared weight (bias-free nn.Linear)")
    for i in range(4):
        assert_uniform(proj.A[i], kaiming_default_bound((R, fan_in)), f"static A[{i}]")  # authors: (r, in)
        assert_zero(proj.B[i], f"static B[{i}]")
    assert_zero(proj.bias, "per-stage output bias")


def test_official_stage_linears_have_default_biases_and_xavier_weights():
    torch.manual_seed(0)
    stage = DecoderStage(query_dim=256, num_heads=8, ffn_dim=512, num_classes=10, num_groups=2, in_points=16)
    att = stage.attention
    assert_uniform(att.out_proj.bias, linear_default_bound(256), "attention output-projection bias")
    assert_zero(att.in_proj_bias, "attention q/k/v bias")
    assert_uniform(att.in_proj_weight, math.sqrt(6 / (256 + 3 * 256)), "attention q/k/v weight (Xavier, packed)")
    for name, lin in (("ffn.0", stage.ffn[0]), ("ffn.3", stage.ffn[3]), ("cls_branch.0", stage.cls_branch[0]),
                      ("attention.out_proj", att.out_proj)):
        assert_uniform(lin.weight, math.sqrt(6 / (lin.in_features + lin.out_features)), f"{name} weight (Xavier)")
        assert_uniform(lin.bias, linear_default_bound(lin.in_features), f"{name} bias")
    assert_zero(stage.fc_reg.weight, "box regressor weight")
    assert torch.allclose(stage.fc_cls.bias, torch.full_like(stage.fc_cls.bias, -math.log(99)))


def test_paper_init_follows_section_4_1():
    torch.manual_seed(0)
    static = StaticLors(4, 256, 128, rank=R, init="paper")
    assert_uniform(static.shared_weight, 1 / math.sqrt(256), "W_shared")
    for i in range(4):
        assert_zero(static.A[i], "static A (paper: zero)")
        assert_uniform(static.B[i], 1 / math.sqrt(R), "static B (paper: Kaiming)")
    assert_uniform(static.bias, 1 / math.sqrt(256), "static bias")
    adaptive = AdaptiveLors(4, D, (G, c, c), rank=R, groups=K, init="paper")
    assert_uniform(adaptive.generator.weight, 1 / math.sqrt(D), "generator weight (paper: Kaiming)")
    for i in range(4):
        assert_uniform(adaptive.B[i], 1 / math.sqrt(R), "adaptive B")
        assert_uniform(adaptive.A[i], 1 / math.sqrt(c), "adaptive A")
        assert_zero(adaptive.E[i].weight, "E-generator weight")


def test_one_default_init_for_the_core_and_the_detector():
    builders = (StaticLors, AdaptiveLors, share_layers, LorsMixer, build_mixing)
    assert [inspect.signature(b).parameters["init"].default for b in builders] == [DEFAULT_INIT] * len(builders)
    assert LorsConfig().init == DEFAULT_INIT == "paper"
