"""Fine-tuning pretrained encoders: one run (`run`), the sweep behind `lors finetune` (`sweep`)
and its report (`report`)."""
from lors.experiments.finetune.report import comparison, summarize, table, write_plot, write_report
from lors.experiments.finetune.run import (LORA_TARGETS, METHODS, PRESET, FinetuneConfig, TextClassifier,
                                           build_classifier, evaluate, finetune, length_grouped_batches,
                                           load_minilm, lr_schedule, param_groups, tokenize)
from lors.experiments.finetune.sweep import FinetuneSweep, command_line, load_sweep, machine, plan, run_sweep

__all__ = ["LORA_TARGETS", "METHODS", "PRESET", "FinetuneConfig", "FinetuneSweep", "TextClassifier",
           "build_classifier", "command_line", "comparison", "evaluate", "finetune", "length_grouped_batches",
           "load_minilm", "load_sweep", "lr_schedule", "machine", "param_groups", "plan", "run_sweep",
           "summarize", "table", "tokenize", "write_plot", "write_report"]
