"""The AdaMixer detector: backbone, neck, initial queries and the stack of decoder stages."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lors.models.adamixer.backbone import ResNetBackbone
from lors.models.adamixer.boxes import cxcywh_to_xyxy, xyxy_to_xyzr, xyzr_to_xyxy
from lors.models.adamixer.config import DetectorConfig
from lors.models.adamixer.mixing import AdaptiveMixing, build_mixing, merge_mixing
from lors.models.adamixer.neck import ChannelMapping
from lors.models.adamixer.stage import DecoderStage, refine_xyzr


def as_image_sizes(image_sizes: Tensor | Sequence[Sequence[int]], batch: int, device) -> Tensor:
    """(B, 2) float tensor of (height, width) from a tensor or a list of pairs."""
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device)
    if sizes.shape != (batch, 2):
        raise ValueError(f"image_sizes must be (height, width) for each of the {batch} images, "
                         f"got shape {tuple(sizes.shape)}")
    return sizes


class InitialQueries(nn.Module):
    """N learned content vectors and N boxes that cover the whole image.

    Parameters: ``content`` Embedding(N, d) and ``boxes`` (N, 4), N (d + 4) in all. The boxes
    are normalised (cx, cy, w, h), fixed at (0.5, 0.5, 1, 1) and not trained
    (``requires_grad=False``), as in AdaMixer, where no gradient reaches them.
    """

    def __init__(self, num_queries: int = 100, query_dim: int = 256):
        super().__init__()
        self.content = nn.Embedding(num_queries, query_dim)
        self.boxes = nn.Parameter(torch.tensor([0.5, 0.5, 1.0, 1.0]).repeat(num_queries, 1), requires_grad=False)

    def forward(self, image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """image_sizes (B, 2) as (h, w) -> content (B, N, d) and xyzr boxes (B, N, 4) in pixels."""
        B = image_sizes.shape[0]
        whwh = image_sizes.flip(-1).repeat(1, 2)[:, None, :]                   # (B, 1, 4)
        xyzr = xyxy_to_xyzr(cxcywh_to_xyxy(self.boxes.detach())[None] * whwh)  # (B, N, 4)
        content = F.layer_norm(self.content.weight, self.content.weight.shape[-1:])
        return content[None].expand(B, -1, -1), xyzr


class AdaMixerDecoder(nn.Module):
    """The decoder stages and the mixing weights they use (owned once, here).

    Args:
        stages: the DecoderStages, in order.
        mixing: AdaptiveMixing holding every stage's mixing generator and output projection.
    """

    def __init__(self, stages: Sequence[DecoderStage], mixing: AdaptiveMixing):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.mixing = mixing

    def forward(self, features: Sequence[Tensor], strides: Sequence[int], query: Tensor,
                xyzr: Tensor) -> list[dict[str, Tensor]]:
        """Refine the queries stage by stage.

        Args:
            features: L maps (B, C, H_l, W_l); strides: their L strides.
            query: (B, N, d) initial content; xyzr: (B, N, 4) initial boxes.

        Returns:
            One dict per stage: ``pred_logits`` (B, N, num_classes), ``pred_boxes`` (B, N, 4)
            absolute xyxy in input-image pixels, ``pred_xyzr`` (B, N, 4).
        """
        outputs = []
        for i, stage in enumerate(self.stages):
            logits, delta, query = stage(query, xyzr, features, strides, self.mixing, i)
            xyzr = refine_xyzr(xyzr, delta)
            outputs.append({"pred_logits": logits, "pred_boxes": xyzr_to_xyxy(xyzr), "pred_xyzr": xyzr})
            xyzr = xyzr.detach()  # each stage's boxes are a fixed starting point for the next
        return outputs


class AdaMixer(nn.Module):
    """AdaMixer (Gao et al., CVPR 2022), with LORS in its mixing when configured.

    Args:
        backbone: returns C2..C5 and has ``out_channels`` and ``strides``.
        neck: maps them to a common width.
        queries: the initial queries.
        decoder: the decoder stages and their mixing weights.
    """

    def __init__(self, backbone: ResNetBackbone, neck: ChannelMapping, queries: InitialQueries,
                 decoder: AdaMixerDecoder):
        super().__init__()
        self.backbone, self.neck, self.queries, self.decoder = backbone, neck, queries, decoder
        self.strides = list(backbone.strides)

    def features(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> L maps (B, C, H / stride_l, W / stride_l)."""
        return self.neck(self.backbone(images))

    def decode(self, features: Sequence[Tensor], image_sizes: Tensor | Sequence[Sequence[int]]) -> dict:
        """Run the decoder on ``features``; see ``forward`` for the output."""
        sizes = as_image_sizes(image_sizes, features[0].shape[0], features[0].device)
        query, xyzr = self.queries(sizes)
        stages = self.decoder(features, self.strides, query, xyzr)
        return {"pred_logits": stages[-1]["pred_logits"], "pred_boxes": stages[-1]["pred_boxes"],
                "stages": stages}

    def forward(self, images: Tensor, image_sizes: Tensor | Sequence[Sequence[int]]) -> dict:
        """Detect objects.

        Args:
            images: (B, 3, H, W) normalised images, zero-padded at the bottom and right to a
                common size (a multiple of 32 keeps feature maps aligned with pixels).
            image_sizes: (B, 2) tensor or list of (height, width) of each image before padding;
                the initial query boxes cover exactly this area.

        Returns:
            ``pred_logits`` (B, N, num_classes) class logits (sigmoid, no background class) and
            ``pred_boxes`` (B, N, 4) absolute xyxy boxes in input pixels, both of the last
            stage, and ``stages``: a list with one such dict per stage (plus ``pred_xyzr``), all
            of which the criterion supervises.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        return self.decode(self.features(images), image_sizes)


def build_detector(cfg: DetectorConfig, device: torch.device | str | None = None) -> AdaMixer:
    """Build AdaMixer from a DetectorConfig.

    ``device="meta"`` builds it without allocating memory (for parameter and FLOP counts);
    backbone weights are then not loaded.
    """
    dec = cfg.decoder
    with torch.device(device) if device is not None else nullcontext():
        backbone = ResNetBackbone(depth=cfg.backbone.depth, weights=cfg.backbone.weights,
                                  frozen_stages=cfg.backbone.frozen_stages, norm_eval=cfg.backbone.norm_eval,
                                  num_levels=cfg.backbone.num_levels)
        neck = ChannelMapping(backbone.out_channels, out_channels=cfg.neck.dim, gn_groups=cfg.neck.gn_groups)
        stages = [DecoderStage(query_dim=dec.query_dim, num_heads=dec.num_heads, ffn_dim=dec.ffn_dim,
                               num_classes=dec.num_classes, num_groups=dec.num_groups,
                               in_points=dec.in_points, dropout=dec.dropout, prior_prob=dec.prior_prob)
                  for _ in range(dec.num_stages)]
        mixing = build_mixing(num_stages=dec.num_stages, query_dim=dec.query_dim, feat_dim=cfg.neck.dim,
                              num_groups=dec.num_groups, in_points=dec.in_points, out_points=dec.out_points,
                              adaptive=cfg.lors.adaptive, static=cfg.lors.static, init=cfg.lors.init)
        queries = InitialQueries(dec.num_queries, dec.query_dim)
        return AdaMixer(backbone, neck, queries, AdaMixerDecoder(stages, mixing))


def merge_detector(model: AdaMixer) -> AdaMixer:
    """Fold the decoder's LORS (LORS^A generators, LORS^T output projection) into plain AdaMixer
    layers, in place (see ``merge_mixing``): the same detections, at vanilla AdaMixer's cost and
    parameter count. Build the merged model's config with ``merged_config``."""
    model.decoder.mixing = merge_mixing(model.decoder.mixing)
    return model
