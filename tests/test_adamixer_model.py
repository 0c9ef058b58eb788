"""The AdaMixer detector: exact parameter counts, forward/backward, LORS at init, sampling."""
import json

import pytest
import torch
import torchvision

from lors import cli
from lors.core import StaticLors
from lors.models.adamixer import build_criterion, build_detector, load_detector_config
from lors.models.adamixer.config import AdaptiveLorsConfig, StaticLorsConfig
from lors.models.adamixer.mixing import LorsMixer, PlainMixer, StageLinears, build_mixing
from lors.models.adamixer.report import count_macs, detect_report
from lors.models.adamixer.sampling import AdaptiveSampling

# (decoder, total): paper Table 2, counted from the official code's modules
EXACT = {
    "adamixer_r50_1x": (110_272_296, 134_790_904),
    "adamixer_lors_r50_1x": (35_348_264, 59_866_872),
    "adamixer_r50_1x_300q": (110_272_296, 134_842_904),
    "adamixer_lors_r50_1x_300q": (35_348_264, 59_918_872),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_parameter_counts_of_the_r50_presets(name):
    report = detect_report(load_detector_config(name))
    assert (report["decoder"], report["total"]) == EXACT[name]
    assert report["backbone"] == 23_508_032 and report["neck"] == 984_576
    assert report["queries"] == load_detector_config(name).decoder.num_queries * (256 + 4)
    assert sum(report["decoder_components"].values()) == report["decoder"]


def test_lors_on_the_4x32_layout_counts_by_the_formula():
    """adamixer_lors_r50_1x_4x32: LORS^A and LORS^T on AdaMixer's own 4 groups x 32 points."""
    report = detect_report(load_detector_config("adamixer_lors_r50_1x_4x32"))
    gen, proj = report["lors"]["mixing_generator"], report["lors"]["mixing_out_proj"]
    G, c, p_in, p_out, r, sum_k = 4, 64, 32, 128, 16, 1 + 1 + 2 + 2 + 3 + 3
    per_group = c * c + p_in * p_out
    assert gen["shared"] == 256 * G * per_group + G * per_group
    e_generators = 256 * 2 * G * r * r + 2 * G * r * r
    factors = G * (c * r + r * c) + G * (p_in * r + r * p_out)
    assert gen["private"] == sum_k * (e_generators + factors)
    assert proj["shared"] == 32_768 * 256 and proj["private"] == 6 * (256 * 8 + 8 * 32_768 + 256)
    vanilla = detect_report(load_detector_config("adamixer_r50_1x"))
    lors_2x64 = detect_report(load_detector_config("adamixer_lors_r50_1x"))
    others = {k: v for k, v in report["decoder_components"].items()
              if k not in ("mixing_generator", "mixing_out_proj")}
    assert others == {k: v for k, v in vanilla["decoder_components"].items() if k in others}  # same layout
    assert report["decoder"] == sum(report["decoder_components"].values()) < lors_2x64["decoder"]


def test_lors_shares_the_generator_and_projection_once():
    report = detect_report(load_detector_config("adamixer_lors_r50_1x"))
    gen, proj = report["lors"]["mixing_generator"], report["lors"]["mixing_out_proj"]
    assert gen["shared"] == 256 * 49_152 + 49_152           # one Linear(d, G((C/G)^2 + P_in P_out))
    G, c, p_in, p_out, r, sum_k = 2, 128, 64, 128, 16, 1 + 1 + 2 + 2 + 3 + 3
    e_generators = 256 * 2 * G * r * r + 2 * G * r * r               # channel and spatial E, per K
    factors = G * (c * r + r * c) + G * (p_in * r + r * p_out)
    assert gen["private"] == sum_k * (e_generators + factors) == 3_330_048
    assert proj["shared"] == 32_768 * 256                   # bias-free shared output projection
    assert proj["private"] == 6 * (256 * 8 + 8 * 32_768 + 256)


def test_cli_json_gives_the_acceptance_figures(capsys):
    for name, (decoder, total) in [("adamixer_r50_1x", EXACT["adamixer_r50_1x"]),
                                   ("adamixer_lors_r50_1x", EXACT["adamixer_lors_r50_1x"])]:
        assert cli.main(["params", "detect", "--config", name, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["decoder"], out["total"]) == (decoder, total)


def test_paper_table4_and_table5_variants_switch_components():
    def count(*overrides):
        return detect_report(load_detector_config("adamixer_lors_r50_1x", list(overrides)))
    plain_gen, plain_proj = 6 * (256 * 49_152 + 49_152), 6 * (32_768 * 256 + 256)
    only_t = count("lors.adaptive.enabled=false")["decoder_components"]
    only_a = count("lors.static.enabled=false")["decoder_components"]
    assert only_t["mixing_generator"] == plain_gen and only_a["mixing_out_proj"] == plain_proj
    shared_only = count("lors.adaptive.use_private=false")["lors"]["mixing_generator"]
    private_only = count("lors.adaptive.use_shared=false")["lors"]["mixing_generator"]
    assert shared_only["total"] == plain_gen // 6 and shared_only["private"] == 0
    assert private_only["shared"] == 0 and private_only["private"] == 3_330_048
    with pytest.raises(ValueError, match="both false"):
        count("lors.adaptive.use_private=false", "lors.adaptive.use_shared=false")
    with pytest.raises(ValueError, match="decoder.num_stages is 3"):
        count("decoder.num_stages=3")  # K=[1,1,2,2,3,3] lists 6 stages


def tiny_batch(model_cfg):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 128, 192)
    images[1, :, 96:] = 0  # the second image is 96 x 160, zero-padded
    images[1, :, :, 160:] = 0
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0], [100.0, 5.0, 180.0, 60.0]]),
                "labels": torch.tensor([1, 3]), "size": torch.tensor([128, 192]), "image_id": 1},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "size": torch.tensor([96, 160]), "image_id": 2}]  # an image with no boxes
    return images, torch.tensor([[128, 192], [96, 160]]), targets


@pytest.mark.parametrize("name", ["tiny", "tiny_lors"])
def test_forward_backward_without_nan(name):
    cfg = load_detector_config(name)
    torch.manual_seed(0)
    model, criterion = build_detector(cfg), build_criterion(cfg)
    images, sizes, targets = tiny_batch(cfg)
    outputs = model(images, sizes)
    B, N, S = 2, cfg.decoder.num_queries, cfg.decoder.num_stages
    assert outputs["pred_logits"].shape == (B, N, cfg.decoder.num_classes)
    assert outputs["pred_boxes"].shape == (B, N, 4) and len(outputs["stages"]) == S
    # the first boxes cover each image exactly (the box regressor starts at zero)
    first = outputs["stages"][0]["pred_boxes"]
    assert torch.allclose(first[1], torch.tensor([0.0, 0.0, 160.0, 96.0]).expand(N, 4), atol=1e-3)
    losses = criterion(outputs, targets)
    assert len(losses) == 3 * S and all(torch.isfinite(v) for v in losses.values())
    criterion.total(losses).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for n, g in grads.items() if not n.startswith("queries.boxes"))
    # With the private parts at zero (E = 0 in LORS^A, B = 0 in LORS^T), the first gradient
    # reaches every plain weight, the shared weights, the E-generators and LORS^T's B, so the
    # private parts leave zero at the first step.
    mixing = {n: g.abs().sum().item() for n, g in grads.items() if n.startswith("decoder.mixing")}
    frozen_at_init = (".A.", ".B.") if name == "tiny_lors" else ()
    learning = {n: v for n, v in mixing.items()
                if not (n.startswith("decoder.mixing.generator") and any(f in n for f in frozen_at_init))
                and not n.startswith("decoder.mixing.out_proj.A")}
    assert learning and all(v > 0 for v in learning.values()), learning


@pytest.mark.parametrize("init", ["official", "paper"])
def test_lors_private_parts_start_at_zero(init):
    cfg = load_detector_config("tiny_lors", [f"lors.init={init}"])
    mixing = build_detector(cfg).decoder.mixing
    q = torch.randn(2, 5, cfg.decoder.query_dim)
    assert isinstance(mixing.generator, LorsMixer)
    for i in range(cfg.decoder.num_stages):
        for lors in (mixing.generator.channel, mixing.generator.spatial):
            assert lors.delta(q, i).abs().max() == 0
            assert torch.equal(lors.weight(q, i), lors.generator(q).view_as(lors.weight(q, i)))
        assert mixing.out_proj.delta(i).abs().max() == 0
    plain = build_detector(load_detector_config("tiny")).decoder.mixing.generator
    assert isinstance(plain, PlainMixer)


def test_build_mixing_reads_the_typed_lors_sections_and_keeps_checkpoint_names():
    dims = dict(num_stages=3, query_dim=64, feat_dim=64, num_groups=2, in_points=8, out_points=16)
    off = build_mixing(**dims, adaptive=AdaptiveLorsConfig(rank=4), static=StaticLorsConfig())  # enabled: false
    assert isinstance(off.generator, PlainMixer) and isinstance(off.out_proj, StageLinears)
    on = build_mixing(**dims, adaptive=AdaptiveLorsConfig(enabled=True, rank=4, groups=[1, 1, 2]),
                      static=StaticLorsConfig(enabled=True, rank=2))
    assert isinstance(on.generator, LorsMixer) and isinstance(on.out_proj, StaticLors)
    assert on.generator.channel.groups == [1, 1, 2] and on.out_proj.ranks == [2, 2, 2]
    assert {k.split(".")[0] for k in on.state_dict()} == {"generator", "out_proj"}  # as before the renames
    with pytest.raises(ValueError, match=r"'lors.adaptive.groups' has 2 values \[1, 2\] but decoder.num_stages is 3"):
        build_mixing(**dims, adaptive=AdaptiveLorsConfig(enabled=True, groups=[1, 2]))


def test_sampling_reads_the_feature_at_each_point():
    """On maps whose value is the pixel x-coordinate of each cell centre, a sampled feature is
    the sampling point's x, whatever level the point's scale selects."""
    sampling = AdaptiveSampling(query_dim=8, num_groups=2, in_points=4)
    strides = [4, 8]
    maps = []
    for s in strides:
        x = (torch.arange(64 // s) + 0.5) * s
        maps.append(x.expand(1, 2, 48 // s, 64 // s).clone())  # (1, C=2, H, W)
    xyzr = torch.tensor([[[30.0, 20.0, 3.0, 0.0]]])            # an 8 x 8 box well inside the image
    query = torch.zeros(1, 1, 8)
    sampled = sampling(query, xyzr, maps, strides)              # (1, 1, G, P, C/G)
    points = sampling.points(query, xyzr)                       # (1, 1, G, P, 3)
    assert torch.allclose(sampled[..., 0], points[..., 0], atol=1e-4)


def test_backbone_loads_a_local_state_dict(tmp_path):
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    model = build_detector(load_detector_config("tiny", [f"backbone.weights={path}"]))
    assert torch.equal(model.backbone.layer3[0].conv1.weight, net.layer3[0].conv1.weight)
    assert torch.equal(model.backbone.stem[0].weight, net.conv1.weight)
    with pytest.raises(ValueError, match="neither an existing file"):
        build_detector(load_detector_config("tiny", ["backbone.weights=no_such_file.pth"]))


def test_decoder_macs_match_the_papers_gflops_column():
    """Paper Table 2 lists decoder GFLOPs 12 (AdaMixer) and 18 (with LORS) for 100 queries."""
    plain = count_macs(build_detector(load_detector_config("adamixer_r50_1x"), device="meta"))
    lors = count_macs(build_detector(load_detector_config("adamixer_lors_r50_1x"), device="meta"))
    assert round(plain["decoder"] / 1e9) == 12 and round(lors["decoder"] / 1e9) == 18
    assert plain["backbone_neck"] == lors["backbone_neck"]


def test_fewer_levels_drop_the_deepest_stages(tmp_path):
    """num_levels=3 builds C2..C4 only: layer4 is neither built, counted nor loaded, and the
    detector trains on three maps (strides 4, 8, 16)."""
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)  # a full ResNet-18, layer4 and fc included
    cfg = load_detector_config("tiny", [f"backbone.weights={path}", "backbone.num_levels=3"])
    model = build_detector(cfg)
    backbone = model.backbone
    assert not hasattr(backbone, "layer4") and backbone.strides == [4, 8, 16]
    assert torch.equal(backbone.layer3[1].conv2.weight, net.layer3[1].conv2.weight)
    layer4 = sum(p.numel() for p in net.layer4.parameters())
    full = build_detector(load_detector_config("tiny"))
    assert detect_report(cfg)["backbone"] == detect_report(load_detector_config("tiny"))["backbone"] - layer4
    maps = backbone(torch.zeros(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4]
    images, sizes, targets = tiny_batch(cfg)
    criterion = build_criterion(cfg)
    losses = criterion(model(images, sizes), targets)
    assert all(torch.isfinite(v) for v in losses.values())
    criterion.total(losses).backward()
    assert backbone.layer3[0].conv1.weight.grad is not None
    assert len(full.neck.convs) == 4 and len(model.neck.convs) == 3
    with pytest.raises(ValueError, match="frozen_stages 4 exceeds num_levels 3"):
        build_detector(load_detector_config("tiny", ["backbone.num_levels=3", "backbone.frozen_stages=4"]))
    with pytest.raises(ValueError, match="num_levels must be in 1..4"):
        build_detector(load_detector_config("tiny", ["backbone.num_levels=5"]))


@pytest.mark.parametrize("init", ["official", "paper"])
def test_private_only_mixing_starts_off_the_zero_saddle(init):
    """Table 5's "private only" row: with no shared generator, a mixing weight that started at
    zero would feed a zero into the spatial mixing and no gradient would ever leave that point
    (AP 0 after a full schedule). The E-generators' biases start non-zero instead."""
    cfg = load_detector_config("tiny_lors", ["lors.adaptive.use_shared=false", f"lors.init={init}"])
    torch.manual_seed(0)
    model, criterion = build_detector(cfg), build_criterion(cfg)
    images, sizes, targets = tiny_batch(cfg)
    criterion.total(criterion(model(images, sizes), targets)).backward()
    e_grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("decoder.mixing.generator") and ".E." in n}
    assert e_grads and all(g is not None and g.abs().sum() > 0 for g in e_grads.values()), \
        [n for n, g in e_grads.items() if g is None or g.abs().sum() == 0]


def test_count_macs_leaves_the_model_in_the_mode_it_had():
    """It counts in eval mode, then gives the model its mode back (the backbone's frozen parts
    stay in eval mode through its own train())."""
    model = build_detector(load_detector_config("adamixer_r50_1x"), device="meta")
    for mode in (True, False):
        model.train(mode)
        before = {name: m.training for name, m in model.named_modules()}
        count_macs(model)
        assert {name: m.training for name, m in model.named_modules()} == before
