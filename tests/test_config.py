"""Typed configs (lors.config) and the detection presets."""
import pytest

from lors.config import available_configs, resolve_config, save_config
from lors.models.adamixer.config import DetectorConfig, load_detector_config

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
