"""StaticLors and AdaptiveLors: equivalences, gradients, parameter counts, bad input."""
import pytest
import torch
import torch.nn.functional as F

from lors import AdaptiveLors, StaticLors, count_parameters

K_PAPER = [1, 1, 2, 2, 3, 3]


def randomize_private(lors):
    """Give every private factor non-zero values so the private part matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in list(lors.A) + list(lors.B):
            p.normal_(0, 0.1)
        for e in getattr(lors, "E", []):
            e.weight.normal_(0, 0.1)


@pytest.mark.parametrize("rows", [3, 4096])  # the low-rank path and the materialised path
@pytest.mark.parametrize("init", ["paper", "official"])
def test_static_zero_private_part_is_the_shared_layer(rows, init):
    lors = StaticLors(6, 48, 32, rank=4, groups=K_PAPER, init=init)
    x = torch.randn(rows, 48)
    for i in range(6):
        assert torch.count_nonzero(lors.delta(i)) == 0
        assert torch.equal(lors(x, i), F.linear(x, lors.shared_weight, lors.bias[i]))


@pytest.mark.parametrize("rows", [3, 4096])
def test_static_forward_equals_its_weight(rows):
    lors = StaticLors(4, 48, 32, rank=[2, 3, 4, 5], groups=[1, 2, 3, 1])
    randomize_private(lors)
    x = torch.randn(rows, 48)
    for i in range(4):
        # eq. 7-8 written out group by group
        w = lors.shared_weight + sum(lors.B[i][k] @ lors.A[i][k] for k in range(lors.groups[i]))
        torch.testing.assert_close(lors(x, i), x @ w.T + lors.bias[i], rtol=1e-5, atol=1e-5)


def test_static_gradients_reach_every_tensor():
    lors = StaticLors(6, 24, 16, rank=4, groups=K_PAPER)
    x = torch.randn(5, 24)
    sum(lors(x, i).square().sum() for i in range(6)).backward()
    assert lors.shared_weight.grad.abs().sum() > 0
    for i in range(6):
        # at init B is Kaiming and A is zero: A gets a gradient, so learning starts
        assert lors.A[i].grad.abs().sum() > 0
        assert lors.B[i].grad is not None
    randomize_private(lors)
    lors.zero_grad()
    sum(lors(x, i).square().sum() for i in range(6)).backward()
    for p in lors.parameters():
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [True, False])
def test_static_factored_path_gradients_equal_autograd(bias):
    torch.manual_seed(0)
    lors = StaticLors(2, 64, 40, rank=3, groups=[1, 2], bias=bias).double()
    randomize_private(lors)
    for i in range(2):
        x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)  # 6 rows: factored
        g = torch.randn(2, 3, 40, dtype=torch.float64)
        params = [x] + list(lors.parameters())
        ours = torch.autograd.grad(lors(x, i), params, g, allow_unused=True)
        b, a = lors.factors(i)
        ref_y = x @ lors.shared_weight.T + (x @ a.T) @ b.T
        if bias:
            ref_y = ref_y + lors.bias[i]
        ref = torch.autograd.grad(ref_y, params, g, allow_unused=True)
        for o, r in zip(ours, ref):
            assert (o is None) == (r is None)
            if o is not None:
                torch.testing.assert_close(o, r)


def test_static_factored_path_gradients_have_the_parameters_layout():
    """The factored backward hands its weight gradients back transposed; what lands in .grad
    (one stage, or several accumulated) is laid out as the (contiguous) parameters are."""
    lors = StaticLors(3, 512, 16, rank=2, groups=[1, 2, 1])
    for stages in ([0], [0, 1, 2]):
        lors.zero_grad(set_to_none=True)
        sum(lors(torch.randn(4, 512), i).sum() for i in stages).backward()
        for p in lors.parameters():
            if p.grad is not None:
                assert p.is_contiguous() and p.grad.is_contiguous()


def test_static_shared_bias_is_one_vector():
    lors = StaticLors(3, 8, 6, rank=2, shared_bias=True)
    assert lors.bias.shape == (1, 6)
    assert all(lors.layer_bias(i) is not None for i in range(3))
    assert torch.equal(lors.layer_bias(0), lors.layer_bias(2))


@pytest.mark.parametrize("N,d,h,r,K", [(6, 64, 128, 16, 2), (6, 32768 // 64, 256, 8, 1),
                                       (3, 40, 24, 5, [1, 2, 3]), (4, 16, 16, [1, 2, 3, 4], 2)])
def test_static_count_matches_closed_form(N, d, h, r, K):
    ranks = r if isinstance(r, list) else [r] * N
    groups = K if isinstance(K, list) else [K] * N
    lors = StaticLors(N, d, h, rank=r, groups=K, bias=False)
    # section 3.4: d*h shared once, K*(d*r + r*h) private per layer
    private = sum(k * (d * ri + ri * h) for ri, k in zip(ranks, groups))
    counts = count_parameters(lors)
    assert (counts.shared, counts.private, counts.other) == (d * h, private, 0)


@pytest.mark.parametrize("N,dq,shape,r,K", [(6, 256, (64, 128), 16, K_PAPER), (6, 32, (3, 8, 12), 4, 2),
                                            (2, 16, (2, 10, 6), [2, 5], [3, 1])])
def test_adaptive_count_matches_closed_form(N, dq, shape, r, K):
    ranks = r if isinstance(r, list) else [r] * N
    groups = K if isinstance(K, list) else [K] * N
    G = shape[0] if len(shape) == 3 else 1
    d, h = shape[-2:]
    lors = AdaptiveLors(N, dq, shape, rank=r, groups=K, bias=False)
    # section 3.4: d_q*d*h shared once, K*(d_q*r^2 + d*r + r*h) private per layer (per head)
    private = sum(G * k * (dq * ri * ri + d * ri + ri * h) for ri, k in zip(ranks, groups))
    counts = count_parameters(lors)
    assert (counts.shared, counts.private, counts.other) == (G * dq * d * h, private, 0)


@pytest.mark.parametrize("init", ["paper", "official"])
def test_adaptive_zero_private_part_is_the_generated_weight(init):
    lors = AdaptiveLors(6, 32, (2, 8, 12), rank=4, groups=K_PAPER, init=init)
    q = torch.randn(5, 32)
    x = torch.randn(5, 2, 7, 8)
    shared = lors.generator(q).view(5, 2, 8, 12)
    for i in range(6):
        assert torch.equal(lors.weight(q, i), shared)
        assert torch.equal(lors.mix(x, q, i), x @ shared)


@pytest.mark.parametrize("points", [2, 300])  # the factored path and the materialised path
def test_adaptive_mix_equals_paper_pseudocode(points):
    lors = AdaptiveLors(3, 32, (2, 16, 24), rank=4, groups=[1, 2, 3])
    randomize_private(lors)
    q = torch.randn(3, 5, 32)
    x = torch.randn(3, 5, 2, points, 16)
    for i in range(3):
        K, r = lors.groups[i], lors.ranks[i]
        # Figure 3: shared weight plus the K products B E A, stacked and summed
        shared = lors.generator(q).view(3, 5, 2, 1, 16, 24)
        e = lors.E[i](q).view(3, 5, 2, K, r, r)
        w = torch.cat([shared, lors.B[i] @ e @ lors.A[i]], dim=-3).sum(-3)
        torch.testing.assert_close(lors.weight(q, i), w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lors.mix(x, q, i), x @ w, rtol=1e-5, atol=1e-4)


def test_adaptive_without_shared_term_is_the_private_part():
    lors = AdaptiveLors(3, 16, (2, 6, 5), rank=2, groups=[1, 2, 1], shared=False)
    randomize_private(lors)
    q, x = torch.randn(4, 16), torch.randn(4, 2, 3, 6)
    assert lors.generator is None
    assert count_parameters(lors).shared == 0
    for i in range(3):
        torch.testing.assert_close(lors.weight(q, i), lors.delta(q, i))
        torch.testing.assert_close(lors.mix(x, q, i), x @ lors.delta(q, i), rtol=1e-5, atol=1e-6)


def test_adaptive_two_dim_shape_has_no_head_axis():
    lors = AdaptiveLors(2, 8, (6, 5), rank=2)
    q, x = torch.randn(4, 8), torch.randn(4, 3, 6)
    assert lors.weight(q, 1).shape == (4, 6, 5)
    assert lors.mix(x, q, 1).shape == (4, 3, 5)


def test_adaptive_gradients_reach_generator_factors_and_e_generators():
    lors = AdaptiveLors(6, 16, (2, 8, 8), rank=2, groups=K_PAPER)
    q, x = torch.randn(4, 16), torch.randn(4, 2, 5, 8)
    sum(lors.mix(x, q, i).square().sum() for i in range(6)).backward()
    assert lors.generator.weight.grad.abs().sum() > 0
    for i in range(6):
        assert lors.E[i].weight.grad.abs().sum() > 0  # E starts at zero, B and A do not
    randomize_private(lors)
    lors.zero_grad()
    sum(lors.mix(x, q, i).square().sum() for i in range(6)).backward()
    for name, p in lors.named_parameters():
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank 0 for layer 0 is out of range"),
    (dict(rank=16), r"use 1 <= rank < 16"),
    (dict(rank=[2, 2]), "one per layer"),
    (dict(groups=[1, 1, 1, 1]), "one per layer"),
    (dict(groups=0), "groups 0 for layer 0"),
    (dict(init="xavier"), "init must be one of"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    args = dict(rank=2, groups=1) | kwargs
    with pytest.raises(ValueError, match=match):
        StaticLors(3, 16, 32, **args)
    with pytest.raises(ValueError, match=match):
        AdaptiveLors(3, 8, (16, 32), **args)


def test_adaptive_rejects_input_of_wrong_shape():
    lors = AdaptiveLors(2, 8, (2, 6, 5), rank=2)
    with pytest.raises(ValueError, match="does not fit weights of shape"):
        lors.mix(torch.randn(4, 3, 3, 6), torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match="query has width 7"):
        lors.weight(torch.randn(4, 7), 0)


def test_every_stack_module_implements_the_layer_stack_interface():
    """Counting and serialization read a stack module through `LayerStack` alone (its kind and
    shared parameters), so each kind implements every method and is found again by its kind."""
    import inspect
    from lors.core.stack import LayerStack
    assert set(LayerStack.kinds()) == {"static", "basis"}
    for kind in LayerStack.kinds():
        cls = LayerStack.of_kind(kind)
        assert cls.kind == kind
        for name in ("weight", "layer_bias", "forward", "config", "layer_repr", "select", "shared_parameters"):
            assert getattr(cls, name) is not getattr(LayerStack, name), (cls.__name__, name)
            assert not inspect.isabstract(cls)
    with pytest.raises(ValueError, match="unknown LORS stack kind 'dense'.*static, basis"):
        LayerStack.of_kind("dense")
    with pytest.raises(TypeError, match="kind 'static' is taken by StaticLors"):
        type("Again", (LayerStack,), {}, kind="static")
