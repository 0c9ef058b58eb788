"""The detector's parameters by component and, optionally, its MACs (`lors params detect`).

Models are built on the meta device, so counting the full-size detector takes well under a
second and allocates nothing. Shared LORS tensors are counted once (``count_parameters``).

"Decoder" follows the paper's and mmdetection's split: the decoder stages and their mixing
weights. The initial queries (N x (d + 4)) are listed on their own line; the total is
backbone + neck + queries + decoder.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lors.core import count_parameters
from lors.models.adamixer.config import DetectorConfig
from lors.models.adamixer.detector import AdaMixer, build_detector

# Decoder components by the DecoderStage attributes that hold them.
STAGE_COMPONENTS = {
    "attention": ("attention", "iof_tau"),
    "sampling": ("sampling",),
    "ffn": ("ffn",),
    "heads": ("cls_branch", "reg_branch", "fc_cls", "fc_reg"),
    "norms": ("attn_norm", "mix_norm", "ffn_norm"),
}
LABELS = {
    "attention": "self-attention + IoF temperatures",
    "sampling": "3D sampling offsets",
    "mixing_generator": "mixing generator (M_c, M_s)",
    "mixing_out_proj": "mixing output projection",
    "ffn": "FFN",
    "heads": "cls/reg branches, fc_cls, fc_reg",
    "norms": "LayerNorms (attention, mixing, FFN)",
}
FLOP_INPUT = (800, 1333)  # (height, width): the 1x test scale


def _numel(obj) -> int:
    return obj.numel() if isinstance(obj, nn.Parameter) else count_parameters(obj).total


def parameter_report(model: AdaMixer) -> dict:
    """Exact parameter counts of ``model`` by part and decoder component."""
    decoder = model.decoder
    components = {name: sum(_numel(getattr(stage, attr)) for stage in decoder.stages for attr in attrs)
                  for name, attrs in STAGE_COMPONENTS.items()}
    generator = count_parameters(decoder.mixing.generator)
    out_proj = count_parameters(decoder.mixing.out_proj)
    components["mixing_generator"] = generator.total
    components["mixing_out_proj"] = out_proj.total
    order = ("attention", "sampling", "mixing_generator", "mixing_out_proj", "ffn", "heads", "norms")
    components = {k: components[k] for k in order}
    total_decoder = count_parameters(decoder).total
    if sum(components.values()) != total_decoder:  # a parameter no component claims
        components["other"] = total_decoder - sum(components.values())
    report = {
        "backbone": count_parameters(model.backbone).total,
        "neck": count_parameters(model.neck).total,
        "queries": count_parameters(model.queries).total,
        "decoder": total_decoder,
        "decoder_components": components,
        "lors": {"mixing_generator": generator.as_dict(), "mixing_out_proj": out_proj.as_dict()},
        "total": count_parameters(model).total,
    }
    parts = report["backbone"] + report["neck"] + report["queries"] + report["decoder"]
    if parts != report["total"]:
        raise RuntimeError(f"parameter parts sum to {parts}, the model has {report['total']}")
    return report


@torch.no_grad()
def count_macs(model: AdaMixer, height: int = FLOP_INPUT[0], width: int = FLOP_INPUT[1]) -> dict:
    """Multiply-accumulates of one image of ``height`` x ``width``, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per multiply-add of
    matmuls, convolutions and attention; MACs = FLOPs / 2). Element-wise work (norms,
    activations, ``grid_sample``) is not counted, as in mmcv's ``get_flops`` that produced the
    paper's GFLOPs columns. Counted in eval mode; the model keeps the mode it had."""
    # lors.engine.loop.evaluating, written out: models/ may not import the engine (tests/test_layers.py)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        images = torch.zeros(1, 3, height, width, device=device)
        with FlopCounterMode(display=False) as features_counter:
            features = model.features(images)
        with FlopCounterMode(display=False) as decoder_counter:
            model.decode(features, [[height, width]])
    finally:
        model.train(was_training)
    feats, dec = features_counter.get_total_flops() // 2, decoder_counter.get_total_flops() // 2
    return {"input": [height, width], "backbone_neck": feats, "decoder": dec, "model": feats + dec}


def describe(cfg: DetectorConfig) -> str:
    d, lors = cfg.decoder, cfg.lors
    parts = [f"ResNet-{cfg.backbone.depth}", f"{d.num_stages} stages", f"{d.num_queries} queries",
             f"{d.num_groups} groups x {d.in_points} points"]
    if lors.adaptive.enabled:
        terms = "+".join(t for t, on in (("shared", lors.adaptive.use_shared), ("private", lors.adaptive.use_private)) if on)
        parts.append(f"LORS^A r={lors.adaptive.rank} K={lors.adaptive.groups} ({terms})")
    if lors.static.enabled:
        parts.append(f"LORS^T r={lors.static.rank} K={lors.static.groups}")
    if lors.adaptive.enabled or lors.static.enabled:
        parts.append(f"init={lors.init}")
    return ", ".join(parts)


def detect_report(cfg: DetectorConfig, flops: bool = False) -> dict:
    """Parameter report (and MACs with ``flops``) of the detector ``cfg`` describes."""
    model = build_detector(cfg, device="meta")
    report = {"model": describe(cfg), **parameter_report(model)}
    if flops:
        report["macs"] = count_macs(model)
    return report
