"""Configuration of a GPT language model (+ LORS or tied layers) and its training.

Load one with ``load_lm_config("gpt_small_lors", ["lors.rank=16"])`` (``lors/configs/lm/NAME.yaml``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from lors.config import Sections, at_least, check_rule, load_config, multiple_of, within
from lors.models.sharing import LorsSection
from lors.models.training import StepTrainConfig


@dataclass
class ModelConfig:
    vocab_size: int = 256                 # bytes
    block_size: int = 128                 # context window, tokens
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    positions: Literal["learned", "rotary"] = "learned"
    sharing: Literal["none", "lors", "tied"] = "none"  # tied: one block's weights for every layer (ALBERT)

    def validate(self) -> None:
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            at_least(f"model.{key}", getattr(self, key), 1)  # first: n_embd % n_head needs n_head >= 1
        multiple_of("model.n_embd", self.n_embd, "model.n_head", self.n_head)
        check_rule(self.positions != "rotary" or (self.n_embd // self.n_head) % 2 == 0, "model.positions",
                   f"is rotary, which needs an even head width, but model.n_embd / model.n_head is "
                   f"{self.n_embd // self.n_head}: change model.n_embd or model.n_head")
        within("model.dropout", self.dropout, 0, 1, "[)")


@dataclass
class TrainSection(StepTrainConfig):
    output_dir: str = "runs/lm"
    eval_batches: int = 20                 # val batches (of batch_size windows) per evaluation

    def validate(self) -> None:
        super().validate()
        at_least("train.eval_batches", self.eval_batches, 1)


@dataclass
class DataSection:
    corpus: str | None = None              # None: the Debian fortunes; else a UTF-8 file or folder
    val_fraction: float = 0.05
    tokenizer: Literal["bytes", "bpe"] = "bytes"  # bpe: byte-level BPE of model.vocab_size tokens, trained
                                                  # on the train split with HF tokenizers

    def validate(self) -> None:
        within("data.val_fraction", self.val_fraction, 0, 1, "()")


class LMConfig(Sections, lors_layers="model.n_layer"):
    model: ModelConfig
    lors: LorsSection
    train: TrainSection
    data: DataSection

    def validate(self) -> None:
        super().validate()
        vocab = self.model.vocab_size
        check_rule(self.data.tokenizer != "bytes" or vocab == 256, "model.vocab_size",
                   f"is {vocab}, but byte tokens need 256: set model.vocab_size=256, or data.tokenizer=bpe to "
                   "train a BPE of that size")
        check_rule(self.data.tokenizer != "bpe" or vocab > 256, "model.vocab_size",
                   f"is {vocab}, but a BPE needs model.vocab_size > 256 (the 256 bytes plus merges): e.g. "
                   "model.vocab_size=1024")


def load_lm_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> LMConfig:
    """A preset in lors/configs/lm (or a YAML path), with ``key=value`` overrides, validated."""
    return load_config(LMConfig, name_or_path, overrides, kind="lm")
