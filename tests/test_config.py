"""Typed configs (lors.config) and the detection presets."""
from dataclasses import dataclass, field

import numpy as np
import pytest

from lors.config import available_configs, check_types, load_config, load_yaml, resolve_config, save_config, to_dict
from lors.models.adamixer.config import DetectorConfig, LorsConfig, load_detector_config

PRESETS = ["adamixer_r50_1x", "adamixer_lors_r50_1x", "adamixer_r50_1x_300q", "adamixer_lors_r50_1x_300q",
           "adamixer_r101_1x", "adamixer_lors_r101_1x", "tiny", "tiny_lors"]


def test_all_presets_exist_and_load():
    assert set(PRESETS) <= set(available_configs("detect"))
    for name in PRESETS:
        assert isinstance(load_detector_config(name), DetectorConfig)


def test_preset_values_and_paper_defaults():
    cfg = load_detector_config("adamixer_lors_r50_1x")
    assert (cfg.decoder.num_groups, cfg.decoder.in_points, cfg.decoder.num_queries) == (2, 64, 100)
    assert cfg.lors.adaptive.enabled and cfg.lors.adaptive.rank == 16
    assert cfg.lors.adaptive.groups == [1, 1, 2, 2, 3, 3]
    assert cfg.lors.static.enabled and (cfg.lors.static.rank, cfg.lors.static.groups) == (8, 1)
    t = cfg.train
    assert (t.lr, t.weight_decay, t.clip_grad, t.epochs, t.lr_steps, t.batch_size) == (2.5e-5, 1e-4, 1.0, 12, [8, 11], 16)
    assert load_detector_config("adamixer_r50_1x_300q").decoder.num_queries == 300


def test_overrides_are_typed_and_dotted():
    cfg = load_detector_config("tiny", ["decoder.num_queries=7", "lors.adaptive.groups=[2, 2]",
                                        "train.lr=1e-4", "backbone.weights=null", "lors.init=paper"])
    assert cfg.decoder.num_queries == 7 and cfg.lors.adaptive.groups == [2, 2]
    assert cfg.train.lr == 1e-4 and cfg.backbone.weights is None and cfg.lors.init == "paper"


@pytest.mark.parametrize("override, named", [("decoder.num_querys=3", "decoder.num_querys"),
                                              ("decodr.num_queries=3", "decodr"),
                                              ("lors.adaptive.rnk=4", "lors.adaptive.rnk")])
def test_unknown_override_key_names_it_and_lists_valid_keys(override, named):
    with pytest.raises(ValueError, match=f"unknown config key '{named}'") as err:
        load_detector_config("tiny", [override])
    assert "valid keys" in str(err.value)


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("decoder:\n  num_queries: 10\n  wrong_key: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'decoder.wrong_key'.*decoder.num_queries"):
        load_detector_config(str(path))


@pytest.mark.parametrize("override", ["decoder.num_queries=many", "decoder.num_queries=2.5",
                                      "lors.adaptive.enabled=1", "train.lr_steps=[8, eleven]",
                                      "lors.init=kaiming", "decoder=3"])
def test_wrong_type_is_a_value_error(override):
    with pytest.raises(ValueError, match="config key"):
        load_detector_config("tiny", [override])


def test_paths_resolve_and_saved_configs_load_back(tmp_path):
    cfg = load_detector_config("tiny_lors", ["decoder.num_stages=2", "lors.adaptive.groups=[1, 2]"])
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    assert resolve_config(str(path), "detect") == path
    assert load_detector_config(str(path)) == cfg


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="no detect config named 'nope'.*adamixer_r50_1x"):
        load_detector_config("nope")


def test_every_preset_passes_validation():
    for name in available_configs("detect"):
        load_detector_config(name).validate()


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=-2", "'train.batch_size' must be >= 1"),
    ("train.epochs=0", "'train.epochs' must be >= 1"),
    ("decoder.num_queries=0", "'decoder.num_queries' must be >= 1"),
    ("decoder.num_heads=3", "'decoder.num_heads' must be a divisor of decoder.query_dim=64"),
    ("train.checkpoint_every=0", "'train.checkpoint_every' must be >= 1"),
    ("train.log_every=0", "'train.log_every' must be >= 1"),
    ("train.amp=fp8", r"'train.amp' must be one of \['auto', 'bf16', 'fp16', 'fp32'\], got 'fp8'"),
    ("data.size_divisor=0", "'data.size_divisor' must be >= 1"),
    ("data.num_workers=-1", "'data.num_workers' must be >= 0"),
    ("train.lr=0", "'train.lr' must be > 0"),
    ("train.lr=.nan", "'train.lr' must be > 0"),
    ("train.lr_steps=[2]", r"'train.lr_steps' is \[2\] but train.epochs=1.*\[1, 1\]"),
    ("train.warmup_iters=-1", "'train.warmup_iters' must be >= 0"),
    ("train.lr_gamma=0", r"'train.lr_gamma' must be in \(0, 1\]"),
    ("decoder.prior_prob=1", r"'decoder.prior_prob' must be in \(0, 1\)"),
    ("decoder.dropout=1.0", r"'decoder.dropout' must be in \[0, 1\)"),
    ("data.flip_prob=1.5", r"'data.flip_prob' must be in \[0, 1\]"),
    ("lors.adaptive.rank=0", "'lors.adaptive.rank' must be >= 1"),
    ("lors.static.groups=[1, 0, 1]", r"'lors.static.groups\[1\]' must be >= 1"),
    ("lors.adaptive.groups=[1, 2]", r"'lors.adaptive.groups' has 2 values \[1, 2\] but decoder.num_stages is 3"),
    ("neck.gn_groups=5", "'neck.gn_groups' must be a divisor of neck.dim=64"),
    ("decoder.num_groups=3", "'decoder.num_groups' must be a divisor of neck.dim=64"),
    ("backbone.depth=20", r"'backbone.depth' must be one of \[18, 34, 50, 101, 152\], got 20"),
    ("backbone.frozen_stages=5", r"'backbone.frozen_stages': frozen_stages 5 exceeds num_levels 4.*use -1..4"),
    ("backbone.frozen_stages=-2", r"'backbone.frozen_stages' must be >= -1"),
    ("backbone.num_levels=0", r"'backbone.num_levels' is 0, but num_levels must be in 1..4"),
    ("loss.focal_alpha=-0.25", r"'loss.focal_alpha' must be in \[0, 1\]"),
    ("test.max_detections=0", "'test.max_detections' must be >= 1"),
])
def test_out_of_range_values_are_refused_at_load_time_naming_key_value_and_range(override, message):
    with pytest.raises(ValueError, match=message) as err:
        load_detector_config("tiny_lors", [override])
    assert "\n" not in str(err.value)  # one line: the CLI prints it as `lors detect: error: ...`


def test_both_lors_terms_off_and_all_loss_weights_zero_are_refused():
    with pytest.raises(ValueError, match="use_shared.*use_private.*set one of them to true"):
        load_detector_config("tiny_lors", ["lors.adaptive.use_shared=false", "lors.adaptive.use_private=false"])
    with pytest.raises(ValueError, match="all 0.*make one > 0"):
        load_detector_config("tiny", ["loss.cls_weight=0", "loss.l1_weight=0", "loss.giou_weight=0"])


def test_ranges_are_checked_after_all_overrides_and_on_every_loader_path(tmp_path):
    # epochs=2 alone leaves the preset's lr_steps [8, 11] past the schedule; the next override fixes it
    with pytest.raises(ValueError, match="train.lr_steps"):
        load_detector_config("adamixer_r50_1x", ["train.epochs=2"])
    assert load_detector_config("adamixer_r50_1x", ["train.epochs=2", "train.lr_steps=[2]"]).train.epochs == 2
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: -2\n")
    with pytest.raises(ValueError, match="'train.batch_size' must be >= 1"):
        load_detector_config(str(path))
    with pytest.raises(ValueError, match="'train.epochs' must be >= 1"):  # a checkpoint's stored config
        load_config(DetectorConfig, {"train": {"epochs": 0}})


# ---- base: presets inherit ------------------------------------------------------------------------


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_bench_lors_preset_is_its_base_plus_a_lors_section():
    lors, vanilla = _flatten(to_dict(load_detector_config("bench_adamixer_lors"))), \
        _flatten(to_dict(load_detector_config("bench_adamixer")))
    assert load_yaml(resolve_config("bench_adamixer_lors", "detect"))["base"] == "bench_adamixer"
    changed = {k for k in lors if lors[k] != vanilla[k]}
    assert changed and all(k.startswith("lors.") for k in changed), changed


def test_every_preset_resolves_to_the_authors_init():
    # the core's default is "paper"; the presets reproduce the authors' code and say so
    assert LorsConfig().init == "paper"
    assert {load_detector_config(n).lors.init for n in available_configs("detect")} == {"official"}


def test_base_chain_merges_mappings_key_by_key_and_replaces_lists(tmp_path):
    (tmp_path / "a.yaml").write_text("decoder: {num_queries: 7, num_stages: 3}\n"
                                     "lors: {adaptive: {enabled: true, rank: 4, groups: [1, 2, 3]}}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ndecoder: {num_queries: 9}\nlors: {adaptive: {groups: [2]}}\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nlors: {adaptive: {groups: [3, 3, 3]}, static: {rank: 2}}\n")
    cfg = load_detector_config(str(tmp_path / "c.yaml"))
    assert (cfg.decoder.num_queries, cfg.decoder.num_stages) == (9, 3)  # b over a, key by key
    assert (cfg.lors.adaptive.enabled, cfg.lors.adaptive.rank) == (True, 4)  # from a, two files up
    assert cfg.lors.adaptive.groups == [3, 3, 3] and cfg.lors.static.rank == 2  # lists replace
    assert load_detector_config(str(tmp_path / "c.yaml"), ["lors.adaptive.groups=[1, 1, 1]"]).lors.adaptive.groups \
        == [1, 1, 1]


def test_base_may_be_a_preset_name_or_a_path_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "parent.yaml").write_text("base: tiny\ndecoder: {num_queries: 5}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../parent.yaml\ntest: {max_detections: 5}\n")
    monkeypatch.chdir(tmp_path / "sub")  # relative to the file's folder, wherever we run from
    cfg = load_detector_config(str(tmp_path / "sub" / "child.yaml"))
    expected = load_detector_config("tiny", ["decoder.num_queries=5", "test.max_detections=5"])
    assert cfg == expected


def test_a_base_cycle_is_refused_naming_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: ./a.yaml\n")
    with pytest.raises(ValueError, match=r"cycle \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)") as err:
        load_detector_config(str(tmp_path / "a.yaml"))
    assert "remove one of these 'base' keys" in str(err.value)
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_detector_config(str(tmp_path / "self.yaml"))


@pytest.mark.parametrize("files, named, message", [
    ({"c.yaml": "base: p.yaml\n", "p.yaml": "decoder: {num_querys: 3}\n"}, "p.yaml",
     "unknown config key 'decoder.num_querys'"),
    ({"c.yaml": "base: p.yaml\n", "p.yaml": "decoder: {num_queries: many}\n"}, "p.yaml",
     "'decoder.num_queries' must be an integer"),
    ({"c.yaml": "base: nope\n"}, "c.yaml", "base 'nope': no detect config named 'nope'"),
    ({"c.yaml": "base: missing.yaml\n"}, "c.yaml", "missing.yaml does not exist"),
    ({"c.yaml": "base: [tiny]\n"}, "c.yaml", "'base' must be a preset name or a YAML path"),
])
def test_errors_in_a_base_chain_name_the_file_that_holds_them(tmp_path, files, named, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"{named}: .*{message}"):
        load_detector_config(str(tmp_path / "c.yaml"))


def test_a_preset_is_built_and_validated_once_on_the_final_values(tmp_path):
    # alone, epochs 2 leaves the base's lr_steps [8, 11] past the schedule; the child or an
    # override that fixes it makes a valid config
    (tmp_path / "short.yaml").write_text("base: adamixer_r50_1x\ntrain: {epochs: 2}\n")
    with pytest.raises(ValueError, match="train.lr_steps"):
        load_detector_config(str(tmp_path / "short.yaml"))
    assert load_detector_config(str(tmp_path / "short.yaml"), ["train.lr_steps=[2]"]).train.epochs == 2
    (tmp_path / "fixed.yaml").write_text("base: short.yaml\ntrain: {lr_steps: [1]}\n")
    assert load_detector_config(str(tmp_path / "fixed.yaml")).train.lr_steps == [1]


def test_save_config_writes_the_resolved_values_without_base(tmp_path):
    cfg = load_detector_config("tiny_lors", ["decoder.num_queries=3"])
    save_config(cfg, tmp_path / "cfg.yaml")
    saved = load_yaml(tmp_path / "cfg.yaml")
    assert "base" not in saved and saved == to_dict(cfg)
    assert load_detector_config(str(tmp_path / "cfg.yaml")) == cfg


# ---- check_types: configs built in Python --------------------------------------------------------


@dataclass(frozen=True)
class Toy:
    steps: int = 10
    lr: float = 0.5
    sizes: list[int] = field(default_factory=lambda: [1, 2])

    def __post_init__(self):
        check_types(self)


def test_check_types_converts_like_the_loader_and_names_class_field_and_fix():
    toy = Toy(steps=np.int64(3), lr=1, sizes=(4, 5))
    assert (type(toy.steps), type(toy.lr), toy.sizes) == (int, float, [4, 5])
    with pytest.raises(ValueError, match=r"Toy.steps must be an integer, got 2.5 \(float\): pass e.g. steps=10"):
        Toy(steps=2.5)
    with pytest.raises(ValueError, match=r"Toy.sizes\[1\] must be an integer, got 'x'"):
        Toy(sizes=[1, "x"])
    with pytest.raises(ValueError, match="Toy.lr must be a number, got True"):
        Toy(lr=True)


def test_a_sequence_field_is_checked_like_a_list():
    from dataclasses import dataclass, field
    from typing import Sequence

    from lors.config import load_config

    @dataclass
    class Section:
        sizes: Sequence[int] = field(default_factory=lambda: [1])

    @dataclass
    class Cfg:
        s: Section = field(default_factory=Section)

    assert load_config(Cfg, {"s": {"sizes": [2, 3]}}).s.sizes == [2, 3]
    with pytest.raises(ValueError, match=r"'s.sizes\[1\]' must be an integer"):
        load_config(Cfg, {"s": {"sizes": [2, "x"]}})


# ---- one validation vocabulary ------------------------------------------------------------------

RANGE_HELPERS = ("require", "at_least", "positive", "within", "multiple_of")


def _shape(func) -> str:
    """A function's body (no docstring) with every name and attribute blanked: a copy of a helper
    under other names has the same shape."""
    import ast
    body = func.body[1:] if func.body and isinstance(func.body[0], ast.Expr) and isinstance(
        getattr(func.body[0], "value", None), ast.Constant) else func.body
    module = ast.Module(body=body, type_ignores=[])
    for node in ast.walk(module):
        if isinstance(node, ast.Name):
            node.id = "_"
        elif isinstance(node, ast.Attribute):
            node.attr = "_"
        elif isinstance(node, ast.arg):
            node.arg = "_"
    return ast.dump(module)


def test_no_module_defines_its_own_range_helpers_besides_lors_config():
    import ast
    from pathlib import Path

    import lors
    import lors.config
    package = Path(lors.__file__).parent
    config = Path(lors.config.__file__).resolve()
    own = {n.name: _shape(n) for n in ast.walk(ast.parse(config.read_text()))
           if isinstance(n, ast.FunctionDef) and n.name in RANGE_HELPERS}
    assert set(own) == set(RANGE_HELPERS)
    names = set(RANGE_HELPERS) | {f"_{n}" for n in RANGE_HELPERS if n != "require"}  # data.coco's _require checks files
    copies = set(own.values())
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.resolve() == config:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name in names or _shape(node) in copies:
                    found.append(f"{path.relative_to(package)}:{node.lineno} {node.name}")
    assert not found, f"range helpers defined outside lors.config (import them from there): {found}"


def test_check_rule_names_the_keys_then_what_is_wrong():
    from lors.config import check_rule
    check_rule(True, "a.b", "is never said")
    with pytest.raises(ValueError, match=r"^config key 'a.b' is 3, but a.c is 2: fix it$"):
        check_rule(False, "a.b", "is 3, but a.c is 2: fix it")
    with pytest.raises(ValueError, match=r"^config key 'a.b': 3 exceeds 2$"):
        check_rule(False, "a.b", ": 3 exceeds 2")
    with pytest.raises(ValueError, match=r"^config keys 'a', 'b' and 'c' are all 0$"):
        check_rule(False, ["a", "b", "c"], "are all 0")


def test_a_sections_config_defaults_its_sections_and_validates_them_with_the_layer_count():
    from lors.config import Sections

    @dataclass
    class Model:
        depth: int = 3

        def validate(self):
            if self.depth < 1:
                raise ValueError("depth")

    @dataclass
    class Lors:
        rank: int = 2

        def validate(self, layers):
            seen.append(layers)

    class Cfg(Sections, lors_layers="model.depth"):
        model: Model
        lors: Lors

    seen = []
    cfg = load_config(Cfg, {"model": {"depth": 5}})
    assert (cfg.model.depth, cfg.lors.rank, seen) == (5, 2, [5])
    assert Cfg().model is not Cfg().model and Cfg() == Cfg()  # a dataclass; each instance its own sections
    with pytest.raises(ValueError, match="depth"):
        load_config(Cfg, {"model": {"depth": 0}})


def test_every_lors_section_shares_rank_and_groups_and_their_check():
    from lors.models.adamixer.config import AdaptiveLorsConfig, StaticLorsConfig
    from lors.models.gpt.config import LMConfig
    from lors.models.sharing import LorsLayers, LorsSection
    from lors.models.vit.model import VitConfig

    for section in (LorsSection, AdaptiveLorsConfig, StaticLorsConfig):
        assert issubclass(section, LorsLayers) and section.check_per_layer is LorsLayers.check_per_layer
    assert all(isinstance(getattr(LorsConfig(), k), LorsLayers) for k in ("adaptive", "static"))  # the detector nests two
    assert all(isinstance(cfg().lors, LorsSection) for cfg in (LMConfig, VitConfig))
    # defaults as before
    assert (AdaptiveLorsConfig().rank, AdaptiveLorsConfig().groups) == (16, [1, 1, 2, 2, 3, 3])
    assert (StaticLorsConfig().rank, StaticLorsConfig().groups) == (LorsSection().rank, LorsSection().groups) == (8, 1)


def test_a_per_layer_list_of_the_wrong_length_names_the_key_of_the_depth_of_its_model():
    from lors.models.gpt import load_lm_config
    from lors.models.vit import load_vit_config
    with pytest.raises(ValueError, match=r"'lors.rank' has 2 values \[1, 2\] but model.depth is 6"):
        load_vit_config("vit_small_lors", ["lors.rank=[1,2]"])
    with pytest.raises(ValueError, match=r"'lors.rank' has 2 values \[1, 2\] but model.n_layer is 6"):
        load_lm_config("gpt_small_lors", ["lors.rank=[1,2]"])
