"""`lors convert MODEL`: one pretrained model into LORS or basis form, saved compact.

    result = convert_model("smollm2", out="runs/convert/smollm2", settings=ConvertSettings(budget=0.5))

Loads the model (`lors.models.pretrained`), records the targets' input moments on calibration
text, calls `lors.convert_layers`, checks that ``lors.load`` into a plain copy gives the same
outputs, and writes ``DIR/model.safetensors`` (``lors.save``: each shared tensor once, the layout
in the file), ``DIR/conversion.json`` (settings, ranks, errors, parameter counts) and, with
``merged``, ``DIR/merged/`` (``lors.merge`` then ``save_pretrained``: a plain HF model, checked
to reload to the same outputs). ``form="drop"`` (layer dropping) removes whole blocks instead
(`evaluate.layers_to_drop`, the choice of the compare row "drop"); the result is a plain HF model
with fewer layers, written with ``save_pretrained`` to ``DIR/model/`` and checked to reload. ``conversion.json`` is written last, so it marks a finished run:
a run that fails after its first write leaves none (an earlier run's is removed first), and the
merged folder is written under ``merged.tmp`` and renamed once complete.

Held-out measure (``eval_tokens``) and healing (``up``, `uptrain.uptrain`) by the model's kind: a
causal LM's perplexity on windows of held-out text, healed by next-token distillation ("distill")
or next-token loss ("lm"); an encoder's cosine similarity to the original's sentence embeddings
on the first held-out entries holding ``eval_tokens`` tokens (`HeldOut`, as `lors convert compare
--model minilm` measures), healed by distilling the original's embeddings and hidden states
("embed", on windows read as sentences: `heal_windows`).
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

import lors
from lors.core.convert import FORMS, Conversion, check_options, convert_layers, convert_targets
from lors.core.share import find_layers
from lors.experiments.convert.evaluate import (batches, drop_layers, embedding_cosine, layer_similarity,
                                               layers_to_drop, perplexity, record_moments, sentence_embeddings,
                                               sentences_for_tokens)
from lors.engine.checkpoint import find_checkpoint
from lors.experiments.convert.texts import Text, resolve_text, text_windows
from lors.experiments.convert.uptrain import (CAUSAL_LOSSES, ENCODER_LOSSES, RESUME_FREE, UptrainSettings,
                                              check_loss, uptrain)

DROP = "drop"  # the form that removes whole blocks instead of converting their Linears
from lors.models.pretrained import CAUSAL, Pretrained, load_pretrained
from lors.models.sharing import writes_residual


@dataclass
class ConvertSettings:
    """How to convert: the arguments of ``convert_layers`` and the calibration text.

    ``calibration``: a text for `texts.resolve_text` (None or "fortunes": the fortunes corpus's
    train part; "pydoc": Python's help topics' train part; or a UTF-8 text file);
    ``calib_tokens`` tokens of it in windows of ``seq_len``; 0 converts without calibration
    (weight-space SVD). ``form`` "drop": remove the fraction 1 - ``budget`` of the blocks whose
    input and output are most alike on the calibration text (``side``, ``groups``,
    ``writer_groups``, ``allocation`` and ``damping`` do not apply)."""

    budget: float | None = 0.5
    rank: int | None = None
    form: str = "basis"
    side: str | dict[str, str] = "in"
    groups: int | None = 2
    writer_groups: int | str | None = 1  # groups for the Linears that write the residual stream; "same": groups
    allocation: str = "uniform"
    damping: float = 0.001
    targets: list[str] | None = None
    calibration: str | None = None
    calib_tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 4

    def validate(self) -> "ConvertSettings":
        if self.form == DROP:
            if self.rank is not None or self.budget is None:
                raise ValueError("--form drop removes whole blocks, which has no rank: give --budget, the fraction "
                                 "of the blocks to keep, instead of --rank")
            if not self.calib_tokens:
                raise ValueError("--form drop picks the blocks to remove on calibration text: --calib-tokens must "
                                 "be > 0")
        elif self.form not in FORMS:
            raise ValueError(f"form must be one of {(*FORMS, DROP)}, got {self.form!r}")
        else:
            check_options(self.form, self.side, self.allocation)
        if not (self.writer_groups in (None, "same") or (isinstance(self.writer_groups, int) and self.writer_groups >= 1)):
            raise ValueError(f"writer_groups must be a group size >= 1, None (all layers) or 'same', got "
                             f"{self.writer_groups!r}")
        if self.calib_tokens < 0 or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("calib_tokens must be >= 0, seq_len >= 2 and batch_size >= 1")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"--rank {self.rank!r} keeps nothing of the layers (every relative error would be "
                             "1.0): give a rank >= 1, or --budget for a fraction of the parameters")
        return self


def calibration_inputs(pre: Pretrained, text: Text, tokens: int, seq_len: int, batch_size: int) -> list[dict]:
    """Keyword arguments of the calibration forward passes: windows of ``seq_len`` tokens."""
    ids = text_windows(pre.tokenizer, text, tokens, seq_len, "--calib-tokens")
    if pre.kind == CAUSAL:
        return [dict(input_ids=b, use_cache=False) for b in batches(ids, batch_size)]
    return [dict(input_ids=b, attention_mask=torch.ones_like(b)) for b in batches(ids, batch_size)]


def heal_windows(pre: Pretrained, text: Text, tokens: int, seq_len: int) -> torch.Tensor:
    """The uptraining pool (N, ``seq_len``): windows from the first ``tokens`` tokens of ``text``
    (fewer windows if it is shorter, but one at least). An encoder reads each window as it reads a
    sentence, between its tokenizer's special tokens ([CLS] ... [SEP]: ``seq_len`` - 2 tokens of
    text), as its held-out sentences have them; a causal LM reads plain windows."""
    flag = "--uptrain-tokens"
    if pre.kind == CAUSAL:
        return text_windows(pre.tokenizer, text, tokens, seq_len, flag, at_most=True)
    before, after = special_tokens(pre.tokenizer)
    extra = len(before) + len(after)
    if seq_len <= extra or tokens < seq_len:
        raise ValueError(f"an encoder's uptraining window holds {extra} special tokens and the text's: --seq-len "
                         f"{seq_len} must be above {extra} and {flag} {tokens} at least --seq-len")
    body = text_windows(pre.tokenizer, text, tokens, seq_len - extra, flag, at_most=True)
    n = len(body)
    return torch.cat([torch.tensor(before, dtype=body.dtype).expand(n, -1), body,
                      torch.tensor(after, dtype=body.dtype).expand(n, -1)], dim=1)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids that ``tokenizer`` puts before and after one text ([CLS] and [SEP] for BERT)."""
    bare, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise ValueError(f"{type(tokenizer).__name__} changes a text's own tokens when it adds its special ones, so "
                     "uptraining windows cannot be framed as it frames a sentence")


@dataclass
class HeldOut:
    """The held-out measure of ``--eval-tokens``: ``measure(model)`` is ``metric`` ("perplexity",
    lower is better, or "cosine", higher is better) on ``tokens`` held-out tokens (``sentences``
    of them for an encoder); the summary records it under ``key``."""

    metric: str
    measure: Callable[[nn.Module], float]
    tokens: int
    sentences: int | None = None

    @property
    def key(self) -> str:
        return f"held_out_{self.metric}"

    def record(self, quality: dict) -> dict:
        """What ``conversion.json`` holds of it: the values of ``quality`` and what they were measured on."""
        return quality | {"tokens": self.tokens} | ({} if self.sentences is None else {"sentences": self.sentences})


def held_out(pre: Pretrained, text: Text, tokens: int, seq_len: int) -> HeldOut:
    """The measure of ``pre`` (the original, before conversion) on ``tokens`` tokens of ``text``:
    a causal LM's perplexity on windows of ``seq_len``; an encoder's mean cosine similarity of its
    sentence embeddings (`evaluate.embedding_cosine`) to the original's, on the first entries of
    ``text`` (fortunes, paragraphs) that hold ``tokens`` tokens, each read as `lors convert compare`
    reads one (special tokens included, cut at 128)."""
    if pre.kind == CAUSAL:
        windows = text_windows(pre.tokenizer, text, tokens, seq_len, "--eval-tokens")
        return HeldOut("perplexity", lambda m: perplexity(m, windows), int(windows.numel()))
    sentences, count = sentences_for_tokens(pre.tokenizer, text.entries(), tokens)
    if count < tokens:
        raise ValueError(f"the {text.role} text {text.name} ({text.part}) holds {count:,} tokens in {len(sentences):,} "
                         f"entries, fewer than the {tokens:,} that --eval-tokens {tokens} asks for: lower "
                         f"--eval-tokens (to {count} for all of it), or pass a longer text as {text.flag}")
    reference = sentence_embeddings(pre.model, pre.tokenizer, sentences)
    return HeldOut("cosine", lambda m: embedding_cosine(m, pre.tokenizer, sentences, reference), count, len(sentences))


@dataclass
class Dropping:
    """What ``form="drop"`` did: the layers removed (``dropped``, old indices) out of
    ``len(similarity)``, each layer's input/output similarity, and the targets' parameters
    (weights and biases of the blocks' Linears) before and after."""

    budget: float
    dropped: list[int]
    similarity: list[float]
    params_before: int
    params_after: int
    form: str = DROP

    @property
    def kept(self) -> float:
        return self.params_after / self.params_before

    def summary(self) -> dict:
        return dict(form=self.form, budget=self.budget, layers=len(self.similarity), dropped=self.dropped,
                    similarity=self.similarity, params_before=self.params_before, params_after=self.params_after,
                    kept=self.kept)

    def table(self) -> str:
        """One line per layer: its similarity and whether it was kept."""
        lines = ["layer  input/output cosine similarity  kept"]
        lines += [f"{i:>5}  {s:>31.4f}  {'dropped' if i in self.dropped else 'yes'}"
                  for i, s in enumerate(self.similarity)]
        return "\n".join(lines)


def target_parameters(layers: Sequence, targets: Sequence[str]) -> int:
    """The parameters of the Linears ``targets`` in ``layers``."""
    return sum(p.numel() for layer in layers for t in targets for p in layer.get_submodule(t).parameters())


def drop_pretrained(pre: Pretrained, settings: ConvertSettings, inputs: Sequence[dict]) -> Dropping:
    """Drop ``pre.model``'s layers in place by their input/output similarity over ``inputs``
    (calibration forward passes' keyword arguments), keeping ``settings.budget`` of them."""
    _, stack = find_layers(pre.model)
    targets = convert_targets(stack[0], settings.targets)
    before = target_parameters(stack, targets)
    similarity = layer_similarity(pre.model, inputs)
    dropped = layers_to_drop(similarity, settings.budget)
    drop_layers(pre.model, dropped)
    return Dropping(settings.budget, dropped, similarity, before, target_parameters(find_layers(pre.model)[1], targets))


def convert_pretrained(pre: Pretrained, settings: ConvertSettings, moments=None, text: Text | None = None
                       ) -> Conversion | Dropping:
    """Convert ``pre.model`` in place (``moments``: reuse an earlier calibration run; ``text``: the
    calibration text, default ``settings.calibration`` resolved alone). Readers of the residual
    stream get ``settings.groups``, writers ``settings.writer_groups``. ``form="drop"`` drops
    layers instead (`drop_pretrained`, on the calibration text; ``moments`` unused)."""
    settings.validate()
    if settings.form == DROP:
        text = text or resolve_text(settings.calibration, "calibration")
        return drop_pretrained(pre, settings, calibration_inputs(pre, text, settings.calib_tokens, settings.seq_len,
                                                                 settings.batch_size))
    if moments is None and settings.calib_tokens:
        text = text or resolve_text(settings.calibration, "calibration")
        inputs = calibration_inputs(pre, text, settings.calib_tokens, settings.seq_len, settings.batch_size)
        moments = record_moments(pre.model, settings.targets, inputs)
    targets = convert_targets(find_layers(pre.model)[1][0], settings.targets)
    writers = settings.groups if settings.writer_groups == "same" else settings.writer_groups
    groups = {t: writers if writes_residual(t) else settings.groups for t in targets}
    return convert_layers(pre.model, targets=targets, form=settings.form, budget=settings.budget,
                          rank=settings.rank, groups=groups, calibration=moments, side=settings.side,
                          allocation=settings.allocation, damping=settings.damping)


def check_out(out: Path) -> None:
    """Fail before any work if ``out`` cannot hold the results (a file, a read-only place)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise ValueError(f"cannot write the results to {out} ({err.strerror or err}): pass a writable "
                         "folder as --out") from None


def check_earlier(out: Path, source: str, settings: ConvertSettings, up: UptrainSettings | None) -> None:
    """Refuse to overwrite what an earlier run left in ``out`` unless it is this same run: a
    finished conversion of other settings (an uptrained model would be replaced by a plain one),
    or an unfinished uptraining that this run would not continue."""
    marker = out / "conversion.json"
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        before = (done.get("source"), done.get("settings"), _weights((done.get("uptrain") or {}).get("settings")))
        now = (source, json.loads(json.dumps(asdict(settings))), _weights(None if up is None else asdict(up)))
        old, new = before[2], now[2]
        if old and new and new["loss"] is None:  # the model kind's default, not known yet: checked again once it is
            new = new | {"loss": old["loss"]}
            now = (*now[:2], new)
        if old and new and new["schedule"] == "constant" and old.get("steps", 0) < new["steps"]:
            before = (*before[:2], old | {"steps": new["steps"]})  # a constant rate continues exactly
        if before != now:
            raise ValueError(f"{out} holds a finished conversion with other settings ({_changes(before, now)}): "
                             "pass another --out, or delete the folder to convert again")
    elif up is None and find_checkpoint(out / "uptrain") is not None:
        raise ValueError(f"{out / 'uptrain'} holds an unfinished uptraining: rerun with its --uptrain-* flags "
                         "to resume it, or pass another --out")


def _weights(up: dict | None) -> dict | None:
    """The uptraining settings that shape the weights (not where it is evaluated or checkpointed);
    a setting that an earlier version did not record has its default."""
    if up is None:
        return None
    full = json.loads(json.dumps(asdict(UptrainSettings()))) | json.loads(json.dumps(up))
    return {k: v for k, v in full.items() if k not in RESUME_FREE}


def _changes(before: tuple, now: tuple) -> str:
    names = ("model", "conversion settings", "uptraining")
    parts = []
    for name, a, b in zip(names, before, now):
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            parts += [f"{name}: {k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys]
        else:
            parts.append(f"{name}: {a!r} -> {b!r}")
    return "; ".join(parts)


def check_serializable(pre: Pretrained) -> None:
    """Fail before any work if ``save_pretrained`` would refuse the model, as it does a quantized one."""
    quantizer = getattr(pre.model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_serializable():
        method = getattr(quantizer.quantization_config, "quant_method", "?")
        raise ValueError(f"{pre.source} was loaded quantized ({getattr(method, 'value', method)}), which "
                         "save_pretrained cannot write, so the merged model could not be saved: pass a "
                         "float model, or leave out --merged")


def save_merged(model, tokenizer, folder: Path, probe: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    """``save_pretrained`` the merged ``model`` (and ``tokenizer``) to ``folder``, through
    ``folder.tmp`` renamed once written and reloaded to the outputs ``expected`` on ``probe``."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    with torch.no_grad():
        got = type(model).from_pretrained(tmp).eval()(input_ids=probe)[key]
    # a merged weight rounds differently from its two thin factors: on SmolLM2 (30 layers) the
    # logits differ by ~1e-5 of their largest magnitude, so the bound is relative to that
    error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    if error > 1e-4:
        raise RuntimeError(f"{tmp} does not reload to the converted model (largest difference {error:.1e} of "
                         "the largest output): report this as a bug")
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    elif folder.exists() or folder.is_symlink():
        folder.unlink()
    tmp.rename(folder)


def check_arguments(settings: ConvertSettings, merged: bool, eval_tokens: int, eval_text: str | None,
                    up: UptrainSettings | None) -> None:
    """Refuse settings that cannot work together, before anything is loaded."""
    settings.validate()
    drop = settings.form == DROP
    if up is not None:
        up.validate()
        if drop and up.params == "converted":
            raise ValueError("--form drop converts no tensors, so --uptrain-params converted would train nothing: "
                             "pass --uptrain-params all")
    if drop and merged:
        raise ValueError("--form drop writes a plain model (DIR/model, save_pretrained) already: leave out --merged")
    if eval_text is not None and not eval_tokens:
        raise ValueError(f"--eval-text {eval_text} names the held-out text, but no held-out tokens are asked for: "
                         "pass --eval-tokens T as well")
    if up is not None and up.eval_at_tokens and not eval_tokens:
        raise ValueError("--eval-at-tokens needs held-out text to measure: pass --eval-tokens T as well")


def check_model(pre: Pretrained, source: str, settings: ConvertSettings, merged: bool, eval_tokens: int,
                up: UptrainSettings | None) -> None:
    """Refuse a loaded model the asked-for steps cannot handle (not a language model, an
    encoder asked for a next-token loss or a causal LM for the embedding loss, no tokenizer where
    text is read, not savable)."""
    if getattr(pre.model, "main_input_name", "input_ids") != "input_ids":
        raise ValueError(f"{source} is a {type(pre.model).__name__}, which reads {pre.model.main_input_name}: "
                         "lors convert handles language models (token ids); convert its layers from Python "
                         "with lors.convert_layers (docs/convert.md)")
    if merged or settings.form == DROP:
        check_serializable(pre)
    if up is not None:
        check_loss(up.loss, pre.kind == CAUSAL, source)
        if up.loss not in ENCODER_LOSSES and up.hidden_weight != UptrainSettings.hidden_weight:
            raise ValueError(f"--uptrain-hidden-weight weighs the hidden states' term of --uptrain-loss embed (an "
                             f"encoder's), and this run's loss is {up.loss}: leave it out")
    needs_text = settings.calib_tokens or eval_tokens or up is not None
    if needs_text and pre.tokenizer is None:
        raise ValueError(f"{source} has no tokenizer that transformers can load ({pre.tokenizer_error}), and "
                         "calibration, --eval-tokens and uptraining read text: add the tokenizer's files to the "
                         "folder, or pass --calib-tokens 0 (weight-space SVD, no text) without --eval-tokens")


def save_converted(pre: Pretrained, out: Path, drop: bool, original: nn.Module | None,
                   probe: torch.Tensor, expected: torch.Tensor, key: str) -> Path:
    """Save the converted model and check that the file alone gives back ``expected`` (its
    outputs on ``probe``): ``DIR/model.safetensors`` loaded into the plain ``original`` (the
    source read again if None), which then holds the converted weights; for a dropped model, a
    plain ``DIR/model`` folder that must reload. Returns the path."""
    if drop:  # a plain model with fewer layers: save_pretrained, checked to reload to the same outputs
        path = out / "model"
        save_merged(pre.model, pre.tokenizer, path, probe, expected, key)
        return path
    path = lors.save(pre.model, out / "model.safetensors")
    lors.load(original, path)  # the file alone re-creates the converted model on the plain copy
    with torch.no_grad():
        b = original(input_ids=probe)
    if not torch.allclose(expected, b[key], rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"{path} does not load back to the converted model: report this as a bug")
    return path


def convert_model(source: str, out: str | Path, settings: ConvertSettings, merged: bool = False,
                  eval_tokens: int = 0, eval_text: str | None = None, up: UptrainSettings | None = None,
                  resume: bool = True, quiet: bool = False) -> dict:
    """Load, convert, verify, save (see the module docstring); with ``eval_tokens``, the held-out
    measure before and after (`held_out`: a causal LM's perplexity, an encoder's cosine to the
    original's sentence embeddings), on ``eval_text`` (a text for `texts.resolve_text`; None: the
    fortunes' held-out part); with ``up``, uptrain (`uptrain.uptrain`: by distillation from the
    original, or next-token loss alone without it; ``up.loss`` None: "distill" for a causal LM,
    "embed" for an encoder; in ``DIR/uptrain``, resumable; the measure at ``up.eval_at_tokens``
    to its val.csv) before saving. ``quiet``: no progress lines or bars. Returns the summary it
    writes."""
    check_arguments(settings, merged, eval_tokens, eval_text, up)
    drop = settings.form == DROP
    out = Path(out)
    check_out(out)
    check_earlier(out, source, settings, up)
    texts = {}  # resolved before the model is loaded, so a bad path fails at once
    if settings.calib_tokens or up is not None:
        texts["calibration"] = resolve_text(settings.calibration, "calibration", other=eval_text)
    if eval_tokens:
        texts["evaluation"] = resolve_text(eval_text, "evaluation", other=settings.calibration)
    start = time.perf_counter()
    pre = load_pretrained(source)
    if up is not None and up.loss is None:  # the default of the model's kind, now that it is known
        up = replace(up, loss=CAUSAL_LOSSES[0] if pre.kind == CAUSAL else ENCODER_LOSSES[0])
        check_earlier(out, source, settings, up)
    check_model(pre, source, settings, merged, eval_tokens, up)
    total_before = lors.count_parameters(pre.model).total
    if not quiet:
        print(f"loaded {source}: {total_before:,} parameters ({time.perf_counter() - start:.0f} s)")
    held = held_out(pre, texts["evaluation"], eval_tokens, settings.seq_len) if eval_tokens else None
    pool = None
    if up is not None:  # checked before the conversion's minutes are spent
        pool = heal_windows(pre, texts["calibration"], up.text_tokens, settings.seq_len)
    quality = {}
    if held is not None:
        quality["original"] = held.measure(pre.model)
    # the plain model: teacher for distillation, then what the saved file is loaded into (reloaded from
    # the source after next-token uptraining, which runs without it; a dropped model reloads by itself)
    teacher = up is not None and up.loss != "lm"
    original = copy.deepcopy(pre.model) if teacher or (up is None and not drop) else None
    conversion = convert_pretrained(pre, settings, text=texts.get("calibration"))
    total_after = lors.count_parameters(pre.model).total
    seconds = time.perf_counter() - start
    if held is not None:
        quality["converted"] = held.measure(pre.model)
    up_summary = None
    if up is not None:
        evaluate = None if held is None else lambda: {held.metric: held.measure(pre.model)}
        fitted = uptrain(pre.model, original, pool, up, out / "uptrain", asdict(settings), resume=resume,
                         progress=not quiet, evaluate=evaluate)
        up_summary = dict(settings=asdict(up), tokens=up.steps * up.batch_size * settings.seq_len,
                          steps=fitted.get("steps"), run_dir=str(out / "uptrain"), text_tokens=int(pool.numel()))
        if held is not None:
            quality["uptrained"] = (fitted.get("metrics") or evaluate())[held.metric]  # fit's, after the last step
            up_summary["curve"] = fitted["curve"]  # DIR/uptrain/val.csv: the measure against tokens trained
    (out / "conversion.json").unlink(missing_ok=True)  # from here on DIR holds this run's files, unfinished until the marker is back
    probe = torch.randint(0, min(1000, getattr(pre.model.config, "vocab_size", 1000)), (1, 32))
    key = "logits" if pre.kind == CAUSAL else "last_hidden_state"
    with torch.no_grad():
        a = pre.model.eval()(input_ids=probe)
    if original is None and not drop:
        original = load_pretrained(source).model
    path = save_converted(pre, out, drop, original, probe, a[key], key)
    summary = dict(source=source, settings=asdict(settings), total_params_before=total_before,
                   total_params_after=total_after, seconds=round(seconds, 1), checkpoint=str(path),
                   texts={role: t.describe() for role, t in texts.items()}, **conversion.summary())
    if held is not None:
        summary[held.key] = held.record(quality)
    if up_summary is not None:
        summary["uptrain"] = up_summary
    if merged:
        lors.merge(original)
        save_merged(original, pre.tokenizer, out / "merged", probe, a[key], key)
        summary["merged"] = str(out / "merged")
    write_conversion(out, summary)
    return summary | {"table": conversion.table()}


def converted_model(folder: Path, done: dict, pre: Pretrained) -> nn.Module:
    """The model a finished conversion in ``folder`` saved (``done``: its conversion.json): the
    plain ``DIR/model`` folder of a dropped model, or ``DIR/model.safetensors`` loaded into
    ``pre.model`` (the original, converted in place by the file's layout)."""
    if done["settings"]["form"] == DROP:
        return load_pretrained(folder / "model").model
    return lors.load(pre.model, folder / "model.safetensors").eval()


def write_conversion(folder: Path, done: dict) -> None:
    """Write ``done`` as ``folder``'s ``conversion.json``, atomically (a crash leaves the old file
    or none, never half of one): the marker that a conversion finished."""
    marker = folder / "conversion.json"
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(done, indent=2))
    tmp.replace(marker)


def read_conversion(folder: Path) -> dict:
    """The ``conversion.json`` of a finished `convert_model` folder (a named error if there is none)."""
    marker = folder / "conversion.json"
    if not marker.is_file():
        raise ValueError(f"{folder} holds no finished conversion (no conversion.json): pass the --out folder of a "
                         "lors convert run that finished")
    return json.loads(marker.read_text())


def evaluate_converted(folder: str | Path, eval_tokens: int, eval_text: str | None = None,
                       seq_len: int | None = None) -> dict:
    """Measure a finished `convert_model` folder (converted, maybe healed) on held-out text: the
    original's measure and the saved model's, ``eval_tokens`` tokens of ``eval_text`` (as in
    `convert_model`; ``seq_len`` None: the conversion's). The entry is added to the folder's
    ``conversion.json`` under ``evaluations`` (replacing one on the same text, tokens and
    window) and returned: how a healed model is read on a text it never trained on."""
    folder = Path(folder)
    done = read_conversion(folder)
    seq_len = seq_len or done["settings"]["seq_len"]
    if eval_tokens < 1:
        raise ValueError("lors convert evaluate measures held-out text: pass --eval-tokens T (T >= 1)")
    text = resolve_text(eval_text, "evaluation", other=done["settings"].get("calibration"))
    start = time.perf_counter()
    pre = load_pretrained(done["source"])
    held = held_out(pre, text, eval_tokens, seq_len)
    quality = {"original": held.measure(pre.model)}
    label = "uptrained" if done.get("uptrain") else "converted"
    quality[label] = held.measure(converted_model(folder, done, pre))
    entry = dict(metric=held.metric, text=text.describe(), seq_len=seq_len, **held.record(quality),
                 seconds=round(time.perf_counter() - start, 1))
    same = lambda e: (e["text"]["sha256"], e["tokens"], e["seq_len"]) == (entry["text"]["sha256"], entry["tokens"],
                                                                          seq_len)
    done["evaluations"] = [e for e in done.get("evaluations", []) if not same(e)] + [entry]
    write_conversion(folder, done)
    return entry
