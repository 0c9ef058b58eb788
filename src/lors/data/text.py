"""A labelled text classification task from Debian's `fortunes` files.

Source: the Debian package `fortunes` (fortune-mod 1.99.1 data, `apt-get install fortunes`) installs
one plain-text file per category under /usr/share/games/fortunes; entries are separated by lines
holding a single `%`. The category (the file name) is the label. Licence: BSD (University of
California), see /usr/share/doc/fortunes/copyright. Nothing is downloaded at run time.

Entries that appear in more than one category are dropped, duplicates are removed, and the split
into train and test is balanced per class and fixed by `split_seed`, so every method and training
seed sees the same examples.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Topical categories with at least 147 entries each, so a split of 64 + 80 per class fits.
CATEGORIES: tuple[str, ...] = ("computers", "food", "law", "love", "politics", "science", "sports", "startrek")


@dataclass
class TextSplit:
    """texts[i] has label labels[i], an index into classes."""

    texts: list[str]
    labels: list[int]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def split_fortunes(raw: str) -> list[str]:
    """The entries of a fortune file's text (separated by lines holding a single ``%``), as
    written, blank ones dropped."""
    return [e.strip("\n") for e in re.split(r"^%\s*$", raw, flags=re.MULTILINE) if e.strip()]


def read_fortune_file(path: str | Path) -> list[str]:
    """Entries of one fortune file, whitespace collapsed, empty entries dropped."""
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    return [" ".join(e.split()) for e in split_fortunes(raw)]


def load_fortunes(categories: tuple[str, ...] = CATEGORIES, train_per_class: int = 64,
                  test_per_class: int = 80, split_seed: int = 0,
                  root: str | Path = FORTUNES_DIR) -> tuple[TextSplit, TextSplit]:
    """Balanced train and test splits, one class per fortune category.

    Args:
        categories: fortune file names used as classes, in label order.
        train_per_class, test_per_class: examples per class in each split.
        split_seed: seed of the shuffle that picks the examples (fixed across training seeds).
        root: folder of the fortune files.
    """
    root = Path(root)
    missing = [c for c in categories if not (root / c).is_file()]
    if missing:
        raise ValueError(f"fortune files {missing} not found in {root}: install the Debian package 'fortunes' "
                         f"(apt-get install fortunes) or pass the folder that holds them")
    per_class = {c: sorted(set(read_fortune_file(root / c))) for c in categories}
    seen: dict[str, int] = {}
    for entries in per_class.values():
        for e in entries:
            seen[e] = seen.get(e, 0) + 1
    rng = random.Random(split_seed)
    train, test = TextSplit([], [], tuple(categories)), TextSplit([], [], tuple(categories))
    for label, c in enumerate(categories):
        entries = [e for e in per_class[c] if seen[e] == 1]  # ambiguous entries have no single label
        if len(entries) < train_per_class + test_per_class:
            raise ValueError(f"category '{c}' has {len(entries)} usable entries, fewer than "
                             f"{train_per_class} + {test_per_class}: lower the per-class counts")
        rng.shuffle(entries)
        for split, chunk in ((train, entries[:train_per_class]),
                             (test, entries[train_per_class:train_per_class + test_per_class])):
            split.texts += chunk
            split.labels += [label] * len(chunk)
    return train, test
