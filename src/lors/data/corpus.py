"""Byte-level text corpora for language models: UTF-8 bytes as tokens (vocabulary 256), so the
metric is bits per byte and no tokenizer is needed.

The default corpus is every English fortune file of the Debian package `fortunes`
(/usr/share/games/fortunes, `apt-get install fortunes`; BSD licence): each file is split into its
fortunes (entries between lines holding a single ``%``), and each fortune goes to train or val by
a hash of its text, so the split is the same on every machine and a fortune never straddles it.
A user's corpus (``data.corpus=PATH``: a UTF-8 text file or a folder of them) is split the same
way by paragraph (blank lines). Train and val are each one long byte sequence, entries joined by
``\\n\\n``.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lors.data.text import FORTUNES_DIR, split_fortunes

VOCAB_SIZE = 256  # bytes
ENTRY_SEPARATOR = "\n\n"  # between the entries (fortunes, paragraphs) of a split
INSTALL = "install the Debian package with `apt-get install fortunes`, or pass data.corpus=PATH (a UTF-8 text file or folder)"


@dataclass
class Corpus:
    """Train and val byte sequences, (N,) uint8 tensors, and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    files: int
    entries: int


def _split_entries(text: str, fortunes: bool) -> list[str]:
    if fortunes:
        return split_fortunes(text)
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's text; a ValueError naming the fix for a missing file, a folder, a
    binary file (NUL bytes anywhere) or one that is not UTF-8 (latin-1, say)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a text file: pass a UTF-8 text file")
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass an existing UTF-8 text file")
    return _read(path)


def _read(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path} looks binary (it holds NUL bytes): a corpus is UTF-8 text; remove the "
                         "file or point data.corpus at the text files only")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start} does not decode): convert it with "
                         "`iconv -t UTF-8` or leave it out") from None


def held_out(key: str, val_fraction: float) -> bool:
    """Whether the entry of ``key`` (its text, or a name that identifies it) goes to val: by the
    first byte of its sha256, so the split is the same on every machine and run."""
    return hashlib.sha256(key.encode("utf-8")).digest()[0] < 256 * val_fraction


def _files(root: Path, fortunes: bool) -> list[Path]:
    if root.is_file():
        return [root]
    if fortunes:  # the English fortune files: plain files beside their .dat index, not the .u8 links
        return sorted(p for p in root.iterdir() if p.is_file() and p.with_name(p.name + ".dat").exists())
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def load_corpus(path: str | Path | None = None, val_fraction: float = 0.05, context: int = 1) -> Corpus:
    """The byte-level corpus at ``path`` (None: the Debian fortunes), split into train and val.

    Raises ValueError, naming the fix, for a missing corpus, an empty one, one whose train or val
    part is shorter than ``context + 1`` bytes (one window and its next byte), and a binary or
    non-UTF-8 file.
    """
    fortunes = path is None
    root = FORTUNES_DIR if fortunes else Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"no corpus at {root}: {INSTALL}" if fortunes else
                         f"corpus {root} does not exist: pass an existing UTF-8 text file or folder")
    files = _files(root, fortunes)
    if not files:
        raise ValueError(f"{root} holds no text files: {INSTALL}" if fortunes else
                         f"corpus folder {root} holds no files: put UTF-8 text files in it")
    train, val, entries = [], [], 0
    for f in files:
        for entry in _split_entries(_read(f), fortunes):
            entries += 1
            (val if held_out(entry, val_fraction) else train).append(entry)
    if not entries:
        raise ValueError(f"corpus {root} is empty (no text in {len(files)} file(s)): pass a corpus with text in it")
    out = {}
    for name, part in (("train", train), ("val", val)):
        data = ENTRY_SEPARATOR.join(part).encode("utf-8")
        if len(data) < context + 1:
            raise ValueError(f"corpus {root}: the {name} split has {len(data)} bytes, fewer than one context "
                             f"window of {context} + 1: use a larger corpus or a smaller model.block_size")
        out[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return Corpus(out["train"], out["val"], str(root), len(files), entries)


def decode(tokens: torch.Tensor | list[int]) -> str:
    """Bytes back to text (invalid UTF-8, e.g. a cut multi-byte character, as U+FFFD)."""
    values = tokens.tolist() if torch.is_tensor(tokens) else tokens
    return bytes(values).decode("utf-8", errors="replace")


def encode(text: str) -> torch.Tensor:
    """Text as (N,) int64 byte tokens."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


@dataclass
class Tokens:
    """A corpus as token ids: train and val (N,) int64, and what turns text into ids and back.

    ``bytes_per_token`` is val's bytes over its tokens, so a loss per token converts to bits
    per byte: ``loss / ln 2 / bytes_per_token``. ``tokenizer_json`` is the BPE (None for bytes).
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    bytes_per_token: float
    tokenizer_json: str | None = None
    train_bytes_per_token: float = 1.0

    def _bpe(self):
        from tokenizers import Tokenizer
        if not hasattr(self, "_tok"):
            self._tok = Tokenizer.from_str(self.tokenizer_json)
        return self._tok

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer_json is None:
            return encode(text)
        return torch.tensor(self._bpe().encode(text).ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        if self.tokenizer_json is None:
            return decode(ids)
        return self._bpe().decode(ids.tolist() if torch.is_tensor(ids) else list(ids))


def train_bpe(text: str, vocab_size: int) -> str:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``text`` with HF `tokenizers`; its JSON."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as err:
        raise ValueError("data.tokenizer=bpe needs HF tokenizers: pip install tokenizers") from err
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return tok.to_str()


def tokenize(corpus: Corpus, tokenizer: str = "bytes", vocab_size: int = VOCAB_SIZE,
             tokenizer_json: str | None = None) -> Tokens:
    """``corpus`` as token ids: its bytes, or a byte-level BPE (``tokenizer_json``, or one of
    ``vocab_size`` tokens trained on the train split)."""
    if tokenizer == "bytes":
        return Tokens(corpus.train.long(), corpus.val.long(), VOCAB_SIZE, 1.0)
    from tokenizers import Tokenizer
    train_text, val_text = decode(corpus.train), decode(corpus.val)
    tokenizer_json = tokenizer_json or train_bpe(train_text, vocab_size)
    tok = Tokenizer.from_str(tokenizer_json)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"the BPE has {tok.get_vocab_size()} tokens but model.vocab_size is {vocab_size}")
    train_ids, val_ids = (torch.tensor(tok.encode(t).ids, dtype=torch.long) for t in (train_text, val_text))
    return Tokens(train_ids, val_ids, vocab_size, len(corpus.val) / len(val_ids), tokenizer_json,
                  len(corpus.train) / len(train_ids))


def codec(tokenizer_json: str | None) -> Tokens:
    """Encoding and decoding only (no corpus): bytes, or the BPE of ``tokenizer_json``."""
    empty = torch.zeros(0, dtype=torch.long)
    return Tokens(empty, empty, VOCAB_SIZE, 1.0, tokenizer_json)


def digest(tokens: Tokens) -> str:
    """sha256 of the train and val token ids: what a run stores to notice that the corpus at its
    path changed (a resumed run on another text would silently mix the two)."""
    h = hashlib.sha256(tokens.train.numpy().tobytes())
    h.update(b"|")
    h.update(tokens.val.numpy().tobytes())
    return h.hexdigest()
