"""What a newcomer meets first: an installed wheel finds its presets, `lors --version`, the licence
and changelog, the README's command table and figures, `lors lm train`'s parameter counts,
`lors detect predict --json` and the help of every option."""
import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from torch import nn

import lors
from lors.cli import build_parser, main
from lors.config import available_configs

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _leaves(parser: argparse.ArgumentParser, path: str = "lors"):
    """(`lors a b`, parser) for every command without sub-commands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, f"{path} {name}")


LEAVES = dict(_leaves(build_parser()))


# ---- 1. presets are package data -----------------------------------------------------------------

def test_presets_are_package_data_beside_the_modules():
    from lors.config import packaged_configs
    assert packaged_configs() == Path(lors.__file__).parent / "configs"
    for kind in ("detect", "ablate", "lm", "vit", "finetune"):
        assert available_configs(kind), kind
    assert not (ROOT / "configs").exists()  # one copy: src/lors/configs


def test_a_preset_of_your_own_in_lors_config_dir_may_start_from_a_packaged_one(tmp_path, monkeypatch):
    from lors.models.gpt import load_lm_config
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "mine.yaml").write_text("base: gpt_small\nmodel:\n  n_layer: 2\n")
    monkeypatch.setenv("LORS_CONFIG_DIR", str(tmp_path))
    assert load_lm_config("mine").model.n_layer == 2
    assert load_lm_config("gpt_small").model.n_layer == 6


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools")
def test_a_wheel_installed_outside_the_checkout_finds_its_presets(tmp_path):
    source = tmp_path / "source"  # a copy, so the build writes no build/ or egg-info into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, env=pip_env, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("lors-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lors/configs/detect/adamixer_lors_r50_1x.yaml" in names and "lors/configs/lm/gpt_small.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, env=pip_env, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LORS_CONFIG_DIR"}
    env["PYTHONPATH"] = str(site)  # ahead of the checkout's editable install

    def run(*argv):
        done = subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where, layers = run(sys.executable, "-c", "import lors; from lors.models.gpt import load_lm_config; "
                                              "print(lors.__file__); print(load_lm_config('gpt_small').model.n_layer)"
                        ).split()
    assert Path(where).is_relative_to(site) and layers == "6"
    out = run(str(site / "bin" / "lors"), "params", "detect", "--config", "adamixer_lors_r50_1x")
    assert out.startswith("adamixer_lors_r50_1x:") and "decoder" in out and "total" in out


# ---- 2. version, licence, changelog --------------------------------------------------------------

def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"lors {lors.__version__}\n"


def test_license_file_is_the_apache_2_0_text_that_pyproject_names():
    assert re.search(r'^license = \{ text = "Apache-2.0" \}$', PYPROJECT, flags=re.M)
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_changelog_has_an_unreleased_entry_and_one_for_this_version():
    version = re.search(r'^version = "(.+)"$', PYPROJECT, flags=re.M).group(1)
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert headings[:2] == ["Unreleased", version] and version == lors.__version__


# ---- 3. README -------------------------------------------------------------------------------------

def test_readme_starts_with_make_run_and_make_test():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[0].startswith("make run ") and block[1].startswith("make test ")


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_every_command_is_in_the_readme_command_table(command):
    table = README.split("## Command line", 1)[1].split("```", 2)[1]
    assert f"{command} " in table


def test_readme_gives_the_share_of_the_encoder_that_stays_dense():
    layer = nn.TransformerEncoderLayer(256, 8, dim_feedforward=1024, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
    qkv = sum(l.self_attn.in_proj_weight.numel() + l.self_attn.in_proj_bias.numel() for l in encoder.layers)
    dense = sum(p.numel() for p in encoder.parameters())
    lors.share_layers(encoder, rank=8, groups=[1, 1, 2, 2, 3, 3])
    shared = lors.count_parameters(encoder).total
    assert encoder.layers[0].self_attn.in_proj_weight is not encoder.layers[1].self_attn.in_proj_weight  # dense
    for figure in (f"{qkv:,}", f"{qkv / dense:.1%}".replace("%", " %"), f"{qkv / shared:.1%}".replace("%", " %"),
                   f"{shared:,}"):
        assert figure in README, figure


# ---- 5. lors lm train: parameter counts -------------------------------------------------------------

def test_lm_train_prints_its_parameter_counts_with_tied_weights_once(tmp_path, capsys):
    from lors.experiments.lm.train import load_lm, parameter_counts
    tiny = ["model.n_layer=3", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=4",
            "train.steps=2", "train.warmup_steps=1", "train.checkpoint_every=2", "train.eval_batches=1"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"fortune {i}: the quick brown fox jumps over the lazy dog" for i in range(40)))
    run = tmp_path / "run"
    argv = ["lm", "train", "--config", "gpt_small_tied", "--run-dir", str(run), *tiny, f"data.corpus={corpus}"]
    assert main(argv) == 0
    n, c = 3, 32  # tied: block 0's weights once, biases and norms per layer; wte once (lm_head is it)
    shapes = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]
    non_embedding = sum(i * o + n * o for i, o in shapes) + n * 4 * c + 2 * c
    total = non_embedding + 256 * c + 16 * c
    assert f"parameters: {total:,} ({non_embedding:,} non-embedding" in capsys.readouterr().out
    assert main([*argv, "--json"]) == 0  # the finished run, resumed: its summary again
    assert json.loads(capsys.readouterr().out)["parameters"] == {"total": total, "non_embedding": non_embedding}
    model, cfg, tokenizer_json = load_lm(run)  # as docs/lm.md shows
    assert tokenizer_json is None and not model.training
    assert parameter_counts(cfg) == {"total": total, "non_embedding": non_embedding}


# ---- 6. lors detect predict --json --------------------------------------------------------------------

def test_predict_writes_coco_results_that_pycocotools_loads(tmp_path, capsys):
    from pycocotools.coco import COCO

    from lors.experiments.detection.train import train
    from test_train import tiny_config
    cfg = tiny_config(tmp_path, "tiny")
    run = tmp_path / "run"
    train(cfg, run_dir=run, stop_after=2, progress=False, evaluate_at_end=False)
    ann = cfg.data.val_annotations
    first = json.loads(Path(ann).read_text())["images"][0]
    image = tmp_path / "data" / "images" / first["file_name"]
    dets = tmp_path / "out" / "dets.json"
    assert main(["detect", "predict", "--checkpoint", str(run), "--image", str(image), "--json", str(dets),
                 "--image-id", str(first["id"]), "--score-threshold", "0"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(dets.read_text())
    assert printed.startswith(f"{len(results)} detections") and str(dets) in printed
    assert results and len(results) <= cfg.test.max_detections
    gt = COCO(ann)
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        assert r["image_id"] == first["id"] and r["category_id"] in gt.cats and len(r["bbox"]) == 4
        x, y, w, h = r["bbox"]
        assert w >= 0 and h >= 0 and x + w <= first["width"] + 1e-3 and y + h <= first["height"] + 1e-3
    assert len(gt.loadRes(str(dets)).getAnnIds()) == len(results)


def test_predict_needs_an_output_and_a_json_suffix(tmp_path, capsys):
    assert main(["detect", "predict", "--checkpoint", str(tmp_path), "--image", "x.png"]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["detect", "predict", "--checkpoint", str(tmp_path), "--image", "x.png", "--json", "dets.txt"])
    assert "does not end in .json" in capsys.readouterr().err


# ---- 7. help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", sorted(LEAVES))
def test_every_option_has_help(command):
    missing = [a.option_strings or a.dest for a in LEAVES[command]._actions if a.help is None]
    assert not missing, f"{command}: {missing} have no help"


def test_the_help_that_was_missing():
    assert "GPU" in LEAVES["lors lm eval"].format_help().split("--device", 1)[1]
    assert "cuda" in LEAVES["lors finetune"].format_help().split("--device", 1)[1]
    assert "(default 200)" in " ".join(LEAVES["lors lm sample"].format_help().split())
