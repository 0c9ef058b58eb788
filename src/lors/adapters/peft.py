"""Serial LoRA as a PEFT method: `get_peft_model(model, SerialLoraConfig(r=8))`.

Importing this module registers the method with PEFT (peft>=0.18,<0.22; another version raises
ImportError). From then on PEFT's own API works on it: `print_trainable_parameters`,
`disable_adapter()`, `merge_adapter` / `unmerge_adapter`, `merge_and_unload`, `unload`,
`save_pretrained` and `PeftModel.from_pretrained`.

This is a second front door onto `lors.adapters.serial_lora`, not a second implementation: the
pair (eq. 1), merging and the Woodbury unmerge are `SerialLoraPair` and `SerialLoraLinear`;
`SerialLoraLayer` adds only PEFT's bookkeeping (adapter name, active / disabled / merged).

Who owns the shared pair. PEFT treats as adapter state what its tuner layers hold besides
`base_layer`: from 0.21 it picks the tensors to train, save and load by walking the tuner layers,
before 0.21 by the prefix `serial_lora_` in their names. So here the pair of a block is owned by
the tuner layer of the block's first adapted input projection (`...self.query.serial_lora_pair.
<adapter>.A`), and the block's other projections refer to it without registering it
(`SerialLoraLinear.pair`), as the native layers do. Each pair is then one entry in
`named_parameters()`, the optimiser and the adapter file, under a name that carries the prefix.
(`serial_lora.inject` hangs the pair on the attention module instead; the two files are not
interchangeable.)

Limitations: one adapter per model (a second one, or `delete_adapter`, raises
NotImplementedError), nn.Linear and transformers Conv1D projections only, no quantised layers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
from packaging.version import Version

from lors.adapters.serial_lora import (
    FUSED_NAMES,
    OUT_NAMES,
    PARENT_OUT_NAME,
    QKV_NAMES,
    SerialLoraLinear,
    SerialLoraPair,
    _io_features,
    find_attention_blocks,
    no_blocks_error,
    lora_plus_param_groups,
)

SUPPORTED_PEFT = ">=0.18,<0.22"  # 0.18 changed the tuner API; 0.21.x is the newest verified
_LOWEST, _BEYOND = Version("0.18"), Version("0.22")

try:
    import peft
except ImportError as err:
    raise ImportError(f"lors.adapters.peft needs PEFT ({SUPPORTED_PEFT}): pip install 'peft{SUPPORTED_PEFT}'") from err


def _check_peft_version(version: str) -> None:
    """ImportError unless `version` is in SUPPORTED_PEFT (a pre-release counts as its release)."""
    if not _LOWEST <= Version(Version(version).base_version) < _BEYOND:
        raise ImportError(f"lors.adapters.peft supports peft{SUPPORTED_PEFT} but peft {version} is installed: "
                          f"pip install 'peft{SUPPORTED_PEFT}'")


_check_peft_version(peft.__version__)

from peft.config import PeftConfig  # noqa: E402  (only once the version is known to fit)
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from peft.tuners.tuners_utils import (  # noqa: E402
    BaseTuner,
    BaseTunerLayer,
    check_adapters_to_merge,
    check_target_module_exists,
)
from peft.utils.peft_types import PeftType, register_peft_method  # noqa: E402

NAME = "serial_lora"
PREFIX = "serial_lora_"  # in every adapter tensor's name (PEFT < 0.21 selects them by it)
PAIR = "serial_lora_pair"  # the tuner layer's ModuleDict {adapter name: SerialLoraPair}

__all__ = ["SUPPORTED_PEFT", "SerialLoraConfig", "SerialLoraLayer", "SerialLoraModel", "lora_plus_param_groups"]


def _peft_type(name: str) -> PeftType:
    """PeftType[name], added to the enum first when this PEFT does not know it.

    `register_peft_method` accepts only names that are already enum members. The member is built as
    EnumType builds one and entered in the three tables that lookups and iteration use;
    `type.__setattr__` sets the class attribute without EnumType.__setattr__, which refuses any name
    already in `_member_map_`. Checked on Python 3.10 to 3.13.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


PEFT_TYPE = _peft_type(NAME.upper())


@dataclass
class SerialLoraConfig(PeftConfig):
    """What `get_peft_model` needs to add Serial LoRA to a model.

    Args:
        r: rank of each pair, 1 <= r <= the block's input width.
        alpha: s = alpha / r; None (default) becomes 2 r, as in the fine-tuning sweeps.
        target_modules: None (default) finds every attention block as `serial_lora.inject` does
            (`find_attention_blocks`) and adapts its q/k/v or fused qkv projections. Otherwise PEFT's
            matching (exact names, name suffixes, or one regex); every match must be an input
            projection of a found block, or, with adapt_out, its output projection. The matched input
            projections of a block share one pair.
        exclude_modules: names (or one regex) never to adapt, as in PEFT.
        adapt_out: also give each block's output projection a pair of its own.
        modules_to_save: modules outside the adapter that are trained and saved in full (a head).
    """

    r: int = 8
    alpha: Optional[float] = None
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    adapt_out: bool = False
    modules_to_save: Optional[list[str]] = None
    # written into adapter_config.json, where a reader of the folder sees it: PEFT itself only
    # knows the method once this module is imported (without it: KeyError 'SERIAL_LORA')
    load_with: str = "import lors.adapters.peft before PeftModel.from_pretrained (pip install lors)"

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}: e.g. SerialLoraConfig(r=8)")
        self.alpha = 2.0 * self.r if self.alpha is None else float(self.alpha)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)


class SerialLoraLayer(SerialLoraLinear, BaseTunerLayer):
    """A frozen projection behind its block's Serial LoRA pair, as a PEFT tuner layer.

    Args:
        base_layer: the original projection (nn.Linear or Conv1D), kept as `base_layer`.
        pair: the block's SerialLoraPair.
        adapter_name: PEFT's name of the adapter ("default").
        owns_pair: register the pair here as `serial_lora_pair[adapter_name]`; the block's other
            layers only refer to it.
    """

    adapter_layer_names = (PAIR,)

    def __init__(self, base_layer: nn.Module, pair: SerialLoraPair, adapter_name: str, owns_pair: bool):
        super().__init__(base_layer, pair)
        self.adapter_name = adapter_name
        setattr(self, PAIR, nn.ModuleDict({adapter_name: pair} if owns_pair else {}))
        self._active_adapter = adapter_name

    # BaseTunerLayer derives `merged` from `merged_adapters`; SerialLoraLinear sets a bool.
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @merged.setter
    def merged(self, value: bool) -> None:
        self.merged_adapters = [self.adapter_name] if value else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out); the base projection alone when disabled or inactive."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.adapter_name not in self.active_adapters:
            return self.base_layer(x)  # merged weights stay merged while inactive, as in PEFT LoRA
        return super().forward(x)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """PEFT's merge: SerialLoraLinear.merge, W <- W (I + s B A); safe_merge keeps W when the
        result is not finite."""
        names = check_adapters_to_merge(self, adapter_names)
        if not names:
            return
        if names != [self.adapter_name]:
            raise ValueError(f"cannot merge adapter(s) {names}: this layer holds only '{self.adapter_name}'")
        weight = self.base_layer.weight
        before = weight.detach().clone() if safe_merge else None
        super().merge()
        if before is not None and not torch.isfinite(weight).all():
            weight.data.copy_(before)
            self.merged = False
            raise ValueError(f"merging adapter '{self.adapter_name}' gives NaN/inf weights (its pair holds "
                             "NaN/inf, or the weights overflow their dtype); the weights are left as they were")


class SerialLoraModel(BaseTuner):
    """PEFT's tuner for Serial LoRA; `get_peft_model` builds it from a SerialLoraConfig."""

    prefix = PREFIX
    tuner_layer_cls = SerialLoraLayer
    target_module_mapping: dict[str, list[str]] = {}  # targets come from the model's structure

    def _check_new_adapter_config(self, config: SerialLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if len(self.peft_config) > 1:
            raise NotImplementedError(
                f"Serial LoRA supports one adapter per model, and this model has {sorted(self.peft_config)}: "
                "use one PeftModel per adapter (a fresh base model each), or merge_and_unload() the first")

    def delete_adapter(self, adapter_name: str) -> None:
        raise NotImplementedError("Serial LoRA supports one adapter per model, so it cannot be deleted: call "
                                  "unload() to get the base model back")

    def _prepare_adapter_config(self, peft_config: SerialLoraConfig, model_config: dict) -> SerialLoraConfig:
        """Plan every pair (and check everything) before the model is touched.

        Returns a copy whose target_modules are resolved for PEFT's matching; the stored config keeps
        target_modules=None, so a saved adapter re-discovers its blocks when loaded.
        """
        resolved, self._plan = _plan(self.model, peft_config)
        self._pairs: dict[str, SerialLoraPair] = {}  # pair key -> pair, filled by _create_and_replace
        return resolved

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key,
                            parameter_name=None) -> None:
        if isinstance(target, BaseTunerLayer):
            raise ValueError(f"'{current_key}' is already wrapped by a PEFT tuner layer ({type(target).__name__}): "
                             "add Serial LoRA to a model without other adapters")
        key, width = self._plan[current_key]
        pair = self._pairs.get(key)
        owns = pair is None
        if owns:
            pair = SerialLoraPair(width, peft_config.r, peft_config.alpha)
            pair.to(device=target.weight.device, dtype=target.weight.dtype)
            self._pairs[key] = pair
        self._replace_module(parent, target_name, SerialLoraLayer(target, pair, adapter_name, owns_pair=owns), target)


def _plan(model: nn.Module, config: SerialLoraConfig) -> tuple[SerialLoraConfig, dict[str, tuple[str, int]]]:
    """(config with target_modules resolved, {projection name: (pair key, input width)}).

    The pair key is "<block>:in" for the block's input projections (one shared pair) and
    "<block>:out" for its output projection. Every problem is a ValueError naming the module.
    """
    blocks = find_attention_blocks(model)
    if not blocks:
        raise no_blocks_error(model)
    roles = {}  # projection name -> (block name, "in" | "out")
    for block in blocks:
        roles.update({name: (block.name, "in") for name in block.in_projs})
        if block.out_proj is not None:
            roles.setdefault(block.out_proj, (block.name, "out"))
    resolved = copy.copy(config)
    if config.target_modules is None:
        if config.adapt_out and any(b.out_proj is None for b in blocks):
            missing = next(b.name for b in blocks if b.out_proj is None)
            raise ValueError(f"attention block '{missing}' has no output projection named {OUT_NAMES} "
                             f"or '{PARENT_OUT_NAME}' in its parent: use adapt_out=False")
        resolved.target_modules = {n for b in blocks for n in b.in_projs + ((b.out_proj,) if config.adapt_out else ())}
    matched = [name for name, _ in model.named_modules() if name and check_target_module_exists(resolved, name)]
    if not matched:
        raise ValueError(f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
                         f"matches no module of {type(model).__name__}: use target_modules=None to adapt every "
                         "attention block")
    plan, widths = {}, {}
    for name in matched:
        if name not in roles:
            raise ValueError(f"target module '{name}' is not a q/k/v, fused qkv or output projection of an "
                             f"attention block (names {QKV_NAMES}, {FUSED_NAMES}, {OUT_NAMES}): Serial LoRA adapts "
                             "attention blocks only; drop it from target_modules")
        block, role = roles[name]
        if role == "out" and not config.adapt_out:
            raise ValueError(f"target module '{name}' is the output projection of block '{block}': set "
                             "adapt_out=True to give it a pair of its own, or drop it from target_modules")
        width = _io_features(model.get_submodule(name))[0]
        key = f"{block}:{role}"
        if widths.setdefault(key, width) != width:
            raise ValueError(f"block '{block}' has input projections of widths {widths[key]} and {width} "
                             f"('{name}'): the shared pair needs one input width")
        if not 1 <= config.r <= width:
            raise ValueError(f"rank {config.r} does not fit '{name}' of input width {width}: pick r between 1 "
                             f"and {width}")
        plan[name] = (key, width)
    return resolved, plan


def _register() -> None:
    """Make PEFT build SerialLoraModel for a SerialLoraConfig (again, when this module is re-run)."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE, object).__module__ == __name__:
        PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = SerialLoraConfig  # importlib.reload: use the new classes
        PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = SerialLoraModel
        return
    register_peft_method(name=NAME, config_cls=SerialLoraConfig, model_cls=SerialLoraModel, prefix=PREFIX)


_register()
