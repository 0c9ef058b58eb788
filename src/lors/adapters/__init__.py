"""Adapters for pretrained transformers: Serial LoRA (one shared low-rank pair per attention block)."""
from lors.adapters.serial_lora import (
    AttentionBlock,
    SerialLoraLinear,
    SerialLoraPair,
    adapter_state_dict,
    find_attention_blocks,
    inject,
    load_adapter,
    lora_plus_param_groups,
    merge_adapter,
    save_adapter,
    trainable_parameters,
    unmerge_adapter,
)

__all__ = [
    "AttentionBlock", "SerialLoraLinear", "SerialLoraPair", "adapter_state_dict", "find_attention_blocks",
    "inject", "load_adapter", "lora_plus_param_groups", "merge_adapter", "save_adapter", "trainable_parameters",
    "unmerge_adapter",
]
