"""`lors detect merge`: a trained AdaMixer + LORS run as a plain AdaMixer checkpoint.

``merge_run(RUN, OUT)`` loads the newest checkpoint of RUN, folds its LORS into plain layers
(`lors.models.adamixer.merge_detector`: exact, the same detections) and writes OUT as a run
directory whose config is the same detector with LORS off, so `lors detect eval/predict` read it
like any other run. The merged model has vanilla AdaMixer's parameter count for the same sampling
layout: it trades LORS's memory saving for vanilla speed (see docs/detection.md).
"""
from __future__ import annotations

from pathlib import Path

import torch

from lors.config import to_dict
from lors.core.count import count_parameters
from lors.engine.checkpoint import find_checkpoint, save_checkpoint
from lors.experiments.detection.evaluate import load_detector
from lors.models.adamixer import merge_detector, merged_config

KEPT_STATE = ("class_names", "label_to_cat_id")


def merge_run(checkpoint: str | Path, out: str | Path) -> dict:
    """Write the merged detector of ``checkpoint`` (a run directory or ckpt_* folder) to the run
    directory ``out``; returns what it did (parameter counts, paths)."""
    out = Path(out)
    source = find_checkpoint(checkpoint)
    if out.exists() and find_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds a run: pass a new --out folder")
    model, cfg, state = load_detector(checkpoint)
    if not (cfg.lors.adaptive.enabled or cfg.lors.static.enabled):
        raise ValueError(f"{checkpoint} is a plain AdaMixer (no LORS in its config): there is nothing to merge")
    before = count_parameters(model).total
    merge_detector(model)
    after = count_parameters(model).total
    plain = merged_config(cfg)
    kept = {k: state[k] for k in KEPT_STATE if k in state}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # a checkpoint holds one; it has no state
    ckpt = save_checkpoint(out, int(state.get("step", 0)), model, optimizer,
                           {**kept, "config": to_dict(plain), "merged_from": str(source)})
    return dict(source=str(source), checkpoint=str(ckpt), params_before=before, params_after=after)
