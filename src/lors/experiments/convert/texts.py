"""The texts a conversion is calibrated, healed and measured on: one resolver for a name or a path.

    calib = resolve_text("pydoc", "calibration", other="pydoc")    # the train part of the topics
    held = resolve_text("pydoc", "evaluation", other="pydoc")      # the held-out topics: disjoint

Built in (nothing is downloaded):
    "fortunes"  the Debian fortunes corpus (`lors.data.corpus.load_corpus`): train and val parts
                split by a hash of each fortune (5 % held out).
    "pydoc"     Python's own help topics (`pydoc_data.topics.topics`, shipped with CPython): each
                topic goes to the train or the held-out part by a hash of its key (25 % held out,
                the topics being few), and the held-out part drops the paragraphs that train
                topics repeat. Its text is that of the running Python's version.
Calibration (and uptraining) read a built-in text's train part, evaluation its held-out part,
whatever the other text is, so figures of one text compare across runs.

A path names a UTF-8 text file, used whole; when the same file is both the calibration and the
evaluation text it is split by paragraph (blank lines), each by a hash of its text, as
`load_corpus` splits a user's corpus, so the two parts never share a paragraph.
"""
from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from lors.data.corpus import ENTRY_SEPARATOR, decode, held_out, load_corpus, read_text_file
from lors.experiments.convert.evaluate import token_windows

BUILT_IN = ("fortunes", "pydoc")
HELD_OUT = 0.25  # the share of pydoc's topics, or of a file's paragraphs, held out
FLAGS = {"calibration": "--calibration", "evaluation": "--eval-text"}
PARTS = {"calibration": "train", "evaluation": "held-out"}


@dataclass(frozen=True)
class Text:
    """One part of a text: ``name`` ("fortunes", "pydoc" or the file's path), ``part`` ("train",
    "held-out" or "whole"), ``role`` ("calibration" or "evaluation") and the ``text`` itself."""

    name: str
    part: str
    role: str
    text: str
    source: str

    @property
    def flag(self) -> str:
        """The command-line flag that chooses this text."""
        return FLAGS[self.role]

    def entries(self) -> list[str]:
        """Its entries (fortunes, paragraphs), for encoders measured one sentence at a time."""
        return [e for e in self.text.split(ENTRY_SEPARATOR) if e.strip()]

    def describe(self) -> dict:
        """What a summary records of it: enough to tell which text, which part, which version."""
        return dict(name=self.name, part=self.part, source=self.source, characters=len(self.text),
                    sha256=hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16])


def _same(a: str | None, b: str | None) -> bool:
    a, b = a or "fortunes", b or "fortunes"
    if a in BUILT_IN or b in BUILT_IN:
        return a == b
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return a == b


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in text.split(ENTRY_SEPARATOR) if p.strip()]


def _split(entries: list[tuple[str, str]], name: str) -> tuple[str, str]:
    """(train, held-out) text of ``(key, entry)`` pairs, each entry placed by a hash of its key;
    a held-out paragraph that the train part also holds is dropped (pydoc's topics repeat whole
    sections: "try" and "exceptions", say), so the two parts never share a paragraph."""
    train = [e for k, e in entries if not held_out(k, HELD_OUT)]
    seen = {p for e in train for p in _paragraphs(e)}
    val = [kept for k, e in entries if held_out(k, HELD_OUT)
           if (kept := ENTRY_SEPARATOR.join(p for p in _paragraphs(e) if p not in seen))]
    if not train or not val:
        raise ValueError(f"{name} is both --calibration and --eval-text but its {len(entries)} paragraph(s) all "
                         "fall on one side of the split: separate its paragraphs with blank lines (it needs "
                         "several), or pass two different texts")
    return ENTRY_SEPARATOR.join(train), ENTRY_SEPARATOR.join(val)


def resolve_text(spec: str | None, role: str, other: str | None = None) -> Text:
    """The text of ``spec`` (None or "fortunes", "pydoc", or a path) for ``role`` ("calibration"
    or "evaluation"); ``other`` is the spec of the other role, so that one file given for both
    is split instead of read twice. Raises ValueError naming the flag for a missing, binary or
    non-UTF-8 file."""
    if role not in FLAGS:
        raise ValueError(f"role must be one of {tuple(FLAGS)}, got {role!r}")
    name = spec or "fortunes"
    part = PARTS[role]
    if name == "fortunes":
        corpus = load_corpus()
        text = decode(corpus.train if role == "calibration" else corpus.val)
        source = f"Debian fortunes ({corpus.source})"
    elif name == "pydoc":
        from pydoc_data.topics import topics
        train, val = _split([(k, topics[k]) for k in sorted(topics)], "pydoc")
        text = train if role == "calibration" else val
        source = f"pydoc_data.topics of Python {platform.python_version()}"
    else:
        try:
            whole = read_text_file(name)  # the corpus loader's checks: a folder, binary, not UTF-8
        except ValueError as err:
            raise ValueError(f"{role} text ({FLAGS[role]}): {err} (or a built-in text: "
                             f"{', '.join(BUILT_IN)})") from None
        source = f"file {Path(name).expanduser().resolve()}"
        if other is not None and _same(name, other):
            train, val = _split([(p, p) for p in _paragraphs(whole)], name)
            text = train if role == "calibration" else val
        else:
            text, part = whole, "whole"
    return Text(name, part, role, text, source)


def text_windows(tokenizer, text: Text, tokens: int, seq_len: int, flag: str, at_most: bool = False
                 ) -> torch.Tensor:
    """The first ``tokens`` tokens of ``text`` as (tokens // seq_len, seq_len) ids; a ValueError
    naming the text, the tokens it has, the tokens asked for and ``flag`` (the flag that asked)
    if it is shorter. ``at_most``: fewer windows will do (a pool to draw from), but not none."""
    if tokens < seq_len:
        raise ValueError(f"{flag} {tokens} holds no window of --seq-len {seq_len}: ask for at least {seq_len} "
                         "tokens, or lower --seq-len")
    windows = token_windows(tokenizer, text.text, tokens, seq_len)
    need = seq_len if at_most else tokens // seq_len * seq_len
    if windows.numel() < need:
        have = len(tokenizer(text.text, add_special_tokens=False)["input_ids"])
        raise ValueError(f"the {text.role} text {text.name} ({text.part}) has {have:,} tokens, fewer than the "
                         f"{need:,} that {flag} {tokens} asks for ({need // seq_len} window(s) of {seq_len}): lower "
                         f"{flag if not at_most else '--seq-len'}, or pass a longer text as {text.flag}")
    return windows
