"""HuggingFace folders for LORS models: ``save_pretrained`` / ``from_pretrained``.

``save_pretrained(model, "out")`` writes a standard transformers folder::

    out/config.json             the model's config, plus the refusal marker (below)
    out/lors.safetensors        every tensor once and the LORS layout (``lors.save``)
    out/generation_config.json  when the model generates
    out/tokenizer.json ...      when a tokenizer is given

``from_pretrained("out")`` builds the architecture from config.json, re-creates the
``share_layers``/``convert_layers`` stacks from the layout and loads the tensors.

A plain ``AutoModelForCausalLM.from_pretrained("out")`` must not return a model with random
weights where the shared ones were (transformers only reports unexpected and missing keys).
So config.json names, as ``transformers_weights`` (the file transformers reads the weights
from), a sentence that is no safetensors file name: transformers raises "The transformers file
in the config seems to be incorrect ...: <the sentence>", and the sentence says to use
``lors.from_pretrained``. A transformers that ignores ``transformers_weights`` looks for
``model.safetensors``, which the folder does not have, and fails as well.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
from pathlib import Path

from torch import nn

from lors.serialization import SaveError, describe, load, read_layout, save, unwrap

WEIGHTS_NAME = "lors.safetensors"
CONFIG_NAME = "config.json"
MARKER_KEY = "transformers_weights"  # config.json: the file transformers loads the weights from
MARKER = ("this folder holds a LORS model (its shared weights are in lors.safetensors): load it "
          "with lors.from_pretrained(folder)")


def _transformers(caller: str):
    try:
        import transformers
    except ImportError:
        raise ValueError(f"lors.{caller} needs HuggingFace transformers, which is not installed: "
                         "pip install -e '.[convert]' (or pip install transformers)") from None
    return transformers


def _check_model(model: nn.Module, transformers) -> None:
    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(f"lors.save_pretrained needs a transformers PreTrainedModel (it writes "
                         f"the model's config.json), got {type(model).__name__}: save any other "
                         "module with lors.save(model, 'model.safetensors')")
    stacks = describe(model)["stacks"]
    if not stacks:
        raise ValueError(f"{type(model).__name__} holds no LORS layers: save it with "
                         "model.save_pretrained(directory), or share its layers first "
                         "(lors.share_layers / lors.convert_layers)")
    for entry in stacks:
        if "target" not in entry:
            raise ValueError(f"the {entry['kind']} stack module at '{entry['path']}' is not where "
                             "share_layers/convert_layers wired it (layers were removed, sliced or "
                             "moved, or it is used directly), so from_pretrained could not re-create "
                             "it on a model built from config.json: save it with lors.save and load "
                             "it into a model changed the same way")


def _write_config(model: nn.Module, directory: Path) -> None:
    config = copy.deepcopy(model.config)  # the model's own config is left as it is
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).removeprefix("torch.")
    setattr(config, MARKER_KEY, MARKER)
    # not config.save_pretrained: it drops transformers_weights, the marker
    config.to_json_file(str(directory / CONFIG_NAME), use_diff=True)


def save_pretrained(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write ``model`` (a transformers model whose layers ``share_layers`` or ``convert_layers``
    made LORS) as a HuggingFace folder that ``from_pretrained`` loads; returns ``directory``.

    The folder holds config.json, lors.safetensors (each shared tensor once, with the LORS
    layout), generation_config.json when the model generates, and ``tokenizer``'s files when
    one is given (``AutoTokenizer.from_pretrained(directory)`` then loads it). Every file is
    written in a temporary folder beside ``directory`` and moved into place, config.json last,
    so an interrupted save leaves no half-written file.

    Raises ValueError when transformers is missing, ``model`` is no transformers model or holds
    no re-creatable LORS layers, ``directory`` is an existing file, or ``tokenizer`` cannot be
    saved; ``lors.serialization.SaveError`` (a ValueError and an OSError) when the folder
    cannot be written.
    """
    transformers = _transformers("save_pretrained")
    model = unwrap(model)  # a torch.compile'd model saves what the plain one loads
    _check_model(model, transformers)
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ValueError(f"tokenizer is a {type(tokenizer).__name__}, which has no save_pretrained: "
                         "pass a transformers tokenizer (AutoTokenizer.from_pretrained(...)) or None")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save to {directory}: it is an existing file; pass a folder "
                         "(it is created if missing)")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.parent / f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()  # not tempfile.mkdtemp: its mode 0700 would become the folder's
    except OSError as err:
        raise SaveError.wrap(err, f"cannot create {directory} ({err}): pass a folder in a "
                             "writable place") from None
    try:
        save(model, staging / WEIGHTS_NAME)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        _write_config(model, staging)
        _move_into(staging, directory)
    except OSError as err:
        if isinstance(err, SaveError):
            raise
        raise SaveError.wrap(err, f"cannot write {directory} ({err}): pass a folder in a writable "
                             "place on a disk with free space") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    return directory


def _move_into(staging: Path, directory: Path) -> None:
    """A new ``directory`` is ``staging`` renamed; into an existing one each file is renamed in
    (each replace is atomic), config.json last."""
    if not directory.exists():
        with contextlib.suppress(OSError):
            staging.rename(directory)
            return
    directory.mkdir(exist_ok=True)
    files = sorted(staging.rglob("*"), key=lambda p: p.name == CONFIG_NAME)
    for src in files:
        if src.is_file():
            dst = directory / src.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)


def _model_class(config, model_class, transformers):
    if model_class is not None:
        if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
            raise ValueError(f"model_class must be a transformers PreTrainedModel class, got "
                             f"{model_class!r}")
        return model_class
    for name in config.architectures or []:  # what the folder was saved from
        found = getattr(transformers, name, None)
        if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
            return found
    return None


def from_pretrained(directory: str | Path, model_class=None, **kw) -> nn.Module:
    """Load a folder written by ``save_pretrained``: the model, in eval mode, with the LORS
    layers it was saved with and its tensors, so its outputs equal the saved model's.

    Args:
        directory: the folder. Its tokenizer, when one was saved, loads with
            ``transformers.AutoTokenizer.from_pretrained(directory)``.
        model_class: the transformers class to build (``LlamaForCausalLM``); default: the class
            named in config.json's ``architectures``, else ``AutoModel``.
        **kw: passed to the class's ``_from_config`` (``dtype=torch.bfloat16``,
            ``attn_implementation="eager"``).

    Raises ValueError naming the problem when transformers is missing, the folder does not
    exist or has no readable config.json, has no lors.safetensors or its layout (a plain
    transformers folder, a Trainer checkpoint), or its tensors do not fit the model.
    """
    transformers = _transformers("from_pretrained")
    directory = Path(directory)
    if not directory.exists():
        raise ValueError(f"{directory} does not exist: pass the folder lors.save_pretrained wrote")
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file: pass the folder lors.save_pretrained wrote")
    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"{directory} has no {CONFIG_NAME}, so lors.save_pretrained did not write "
                         "it: pass the folder lors.save_pretrained wrote")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        plain = any(directory.glob("model*.safetensors")) or (directory / "pytorch_model.bin").exists()
        hint = ("it holds a plain transformers checkpoint (model.safetensors): load it with "
                "transformers' from_pretrained, or, if it is a Trainer checkpoint of a LORS model, "
                "resume it with Trainer(resume_from_checkpoint=...) and export the model with "
                "lors.save_pretrained") if plain else "pass the folder lors.save_pretrained wrote"
        raise ValueError(f"{directory} has no {WEIGHTS_NAME}: {hint}")
    if read_layout(weights) is None:  # also a ValueError for a damaged file
        raise ValueError(f"{weights} has no LORS layout ('lors' metadata), so lors.save_pretrained "
                         "did not write it: write the folder with lors.save_pretrained(model, "
                         "directory)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{directory / CONFIG_NAME} is not a transformers config ({err}): write "
                         "the folder again with lors.save_pretrained") from None
    if hasattr(config, MARKER_KEY):
        delattr(config, MARKER_KEY)  # the marker is for plain from_pretrained, not the model
    cls = _model_class(config, model_class, transformers)
    try:
        model = (cls._from_config(config, **kw) if cls is not None
                 else transformers.AutoModel.from_config(config, **kw))
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot build the model of {directory / CONFIG_NAME} "
                         f"({type(err).__name__}: {err}): check model_class and the keyword "
                         "arguments") from None
    try:
        load(model, weights)
    except ValueError as err:  # lors.load names the file; apply_layout's messages do not
        raise ValueError(str(err) if str(weights) in str(err) else f"{weights}: {err}") from None
    if model.can_generate() and (directory / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(directory))
    model.config.name_or_path = str(directory)
    return model.eval()


def checkpoint_callback():
    """A ``transformers.TrainerCallback`` for training a LORS model with ``Trainer``: after each
    checkpoint is saved it adds the refusal marker to the checkpoint's ``config.json``, so a
    plain ``from_pretrained`` of the checkpoint folder fails naming ``lors.from_pretrained``
    instead of returning random weights where the shared ones were. Resuming
    (``resume_from_checkpoint``) is unchanged: it reads ``model.safetensors`` itself.

        trainer = Trainer(model, args, callbacks=[lors.hf.checkpoint_callback()])
    """
    transformers = _transformers("checkpoint_callback")

    class LorsCheckpoints(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            config = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CONFIG_NAME
            if args.should_save and config.is_file():
                data = json.loads(config.read_text())
                data[MARKER_KEY] = MARKER  # what _write_config sets on a save_pretrained folder
                tmp = config.with_name(config.name + ".tmp")
                tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
                tmp.replace(config)
            return control

    return LorsCheckpoints()
