"""One AdaMixer decoder stage: self-attention, 3D sampling, adaptive mixing, FFN, heads."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from lors.models.adamixer.boxes import box_iof, xyzr_to_xyxy
from lors.models.adamixer.mixing import AdaptiveMixing
from lors.models.adamixer.sampling import AdaptiveSampling


def position_encoding(xyzr: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sinusoidal encoding of query boxes, (B, N, 4) -> (B, N, dim), dim/4 features per coordinate.

    x and y (pixels) are divided by 1000 first, so that they span about the same range as z
    and r (log2 units), as in AdaMixer.
    """
    if dim % 8:
        raise ValueError(f"query width {dim} must be divisible by 8 for the xyzr position encoding")
    feats = dim // 4
    scaled = xyzr / xyzr.new_tensor([1000.0, 1000.0, 1.0, 1.0])
    k = torch.arange(feats, dtype=xyzr.dtype, device=xyzr.device)
    freq = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / feats)
    angles = scaled[..., None] / freq                                    # (B, N, 4, dim/4)
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(2)


def refine_xyzr(xyzr: Tensor, delta: Tensor) -> Tensor:
    """Apply a stage's box update: centre moves by ``delta_xy * 2^z`` (relative to the box's
    scale), z and r add ``delta_zr``. (B, N, 4) x (B, N, 4) -> (B, N, 4)."""
    xy = xyzr[..., :2] + delta[..., :2] * torch.exp2(xyzr[..., 2:3])
    return torch.cat([xy, xyzr[..., 2:] + delta[..., 2:]], dim=-1)


class DecoderStage(nn.Module):
    """Everything of one stage except its mixing weights, which ``AdaptiveMixing`` holds for
    all stages (shared with LORS, stacked without).

    Args:
        query_dim: d, the query width (256).
        num_heads: self-attention heads (8), each with its own IoF temperature.
        ffn_dim: hidden width of the FFN (2048).
        num_classes: C, sigmoid classes (80 for COCO).
        num_groups: G, sampling groups.
        in_points: P_in, points sampled per group.
        dropout: dropout in attention and FFN (AdaMixer: 0).
        prior_prob: initial foreground probability of the classifier (focal-loss init).

    Parameters: ``attention`` (4d^2 + 4d), ``iof_tau`` (heads), ``sampling`` (d x 3 G P_in),
    ``ffn``, ``attn_norm``/``mix_norm``/``ffn_norm`` LayerNorms, ``cls_branch`` and
    ``reg_branch`` (Linear + LayerNorm each), ``fc_cls`` (d -> C), ``fc_reg`` (d -> 4).
    """

    def __init__(self, query_dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048,
                 num_classes: int = 80, num_groups: int = 4, in_points: int = 32,
                 dropout: float = 0.0, prior_prob: float = 0.01):
        super().__init__()
        d = query_dim
        self.attention = nn.MultiheadAttention(d, num_heads, dropout=dropout, batch_first=True)
        self.iof_tau = nn.Parameter(torch.empty(num_heads))
        self.attn_norm = nn.LayerNorm(d)
        self.sampling = AdaptiveSampling(d, num_groups=num_groups, in_points=in_points)
        self.mix_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, d), nn.Dropout(dropout))
        self.ffn_norm = nn.LayerNorm(d)
        self.cls_branch = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(inplace=True))
        self.reg_branch = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(inplace=True))
        self.fc_cls = nn.Linear(d, num_classes)
        self.fc_reg = nn.Linear(d, 4)
        self.num_heads, self.prior_prob = num_heads, prior_prob
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """AdaMixer's init, as the authors' stage does it: every Linear (the attention's
        output projection included) gets nn.Linear's default bias, ±1/sqrt(in), and a
        Xavier-uniform weight; the attention's packed q/k/v projection a Xavier-uniform
        weight and zero bias (nn.MultiheadAttention's own init); classifier bias at the
        prior probability, zero box regressor (the first boxes pass through unchanged), IoF
        temperatures uniform in [0, 4], and the sampling offsets' own init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
                nn.init.xavier_uniform_(m.weight)
        nn.init.xavier_uniform_(self.attention.in_proj_weight)
        nn.init.zeros_(self.attention.in_proj_bias)
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - self.prior_prob) / self.prior_prob))
        nn.init.zeros_(self.fc_reg.weight)
        nn.init.zeros_(self.fc_reg.bias)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)
        self.sampling.reset_parameters()

    def attention_bias(self, xyzr: Tensor) -> Tensor:
        """Per-head bias tau_h log(IoF) between queries' boxes, (B, N, 4) -> (B * heads, N, N):
        a query attends less to queries whose boxes cover little of its own box."""
        with torch.no_grad():
            boxes = xyzr_to_xyxy(xyzr)
            log_iof = torch.log(box_iof(boxes, boxes) + 1e-7)               # (B, N, N)
        return (log_iof[:, None] * self.iof_tau.view(1, -1, 1, 1)).flatten(0, 1)

    def forward(self, query: Tensor, xyzr: Tensor, features: Sequence[Tensor], strides: Sequence[int],
                mixing: AdaptiveMixing, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """Run stage ``index``.

        Args:
            query: (B, N, d) query content.
            xyzr: (B, N, 4) query boxes (pixels of the input image, log2 scale and ratio).
            features: L feature maps (B, C, H_l, W_l).
            strides: L strides.
            mixing: the decoder's AdaptiveMixing; this stage uses its weights ``index``.
            index: this stage's position in the decoder, 0-based.

        Returns:
            logits (B, N, num_classes), box delta (B, N, 4) for ``refine_xyzr``, and the
            updated query (B, N, d).
        """
        with torch.no_grad():
            pos = position_encoding(xyzr, query.shape[-1])
        q = query + pos  # AdaMixer keeps the encoding in the residual path too
        attended = self.attention(q, q, q, attn_mask=self.attention_bias(xyzr), need_weights=False)[0]
        query = self.attn_norm(q + attended)
        sampled = self.sampling(query, xyzr, features, strides)             # (B, N, G, P_in, C/G)
        query = self.mix_norm(query + mixing(sampled, query, index))
        query = self.ffn_norm(query + self.ffn(query))
        logits = self.fc_cls(self.cls_branch(query))
        delta = self.fc_reg(self.reg_branch(query))
        return logits, delta, query
