"""Pieces shared by the models ported from openvqa (MFB/MFH, BUTD).

Fixed lengths: openvqa's MFB, MFH and BUTD never mask padding: their softmaxes run over every one of the
IMG_FEAT_PAD_SIZE regions and MAX_TOKEN tokens their loader pads to, and BUTD reads the LSTM state
at the last padded position. accuvqa's loader pads each batch only to its longest item, so these
models bring their inputs back to openvqa's fixed lengths first: then outputs do not depend on how
a batch was padded or split, and equal openvqa's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def fixed_length(x: torch.Tensor, size: int) -> torch.Tensor:
    """x (B, L, ...) cut or zero-padded along dim 1 to `size`, as openvqa's loader does per item."""
    if x.size(1) >= size:
        return x[:, :size]
    return torch.cat([x, x.new_zeros(x.size(0), size - x.size(1), *x.shape[2:])], dim=1)


def run_lstm(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """The LSTM's outputs (B, T, H) for x (B, T, D); in float32 under CPU autocast."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # oneDNN has no reduced-precision LSTM for every shape
        with torch.autocast("cpu", enabled=False):
            return lstm(x.float())[0]
    return lstm(x)[0]


def copy_embedding(embedding: nn.Embedding, pretrained_emb: np.ndarray) -> None:
    """Copy pretrained word vectors (token_size, WORD_EMBED_SIZE) into `embedding`; ValueError on another shape."""
    emb = torch.as_tensor(np.asarray(pretrained_emb))
    if emb.shape != embedding.weight.shape:
        raise ValueError(f"pretrained_emb shape {tuple(emb.shape)} != {tuple(embedding.weight.shape)}")
    with torch.no_grad():
        embedding.weight.copy_(emb)


class WeightNormLinear(nn.Module):
    """Linear layer with weight = weight_g * weight_v / ||weight_v||, one scalar weight_g: what
    `torch.nn.utils.weight_norm(nn.Linear(...), dim=None)` builds, with the same parameter names."""

    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        linear = nn.Linear(in_size, out_size)  # torch's initialisation; then g = ||v||, as weight_norm starts
        self.bias = nn.Parameter(linear.bias.detach().clone())
        self.weight_g = nn.Parameter(linear.weight.detach().norm())
        self.weight_v = nn.Parameter(linear.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the normalised linear map."""
        return F.linear(x, self.weight_v * (self.weight_g / self.weight_v.norm()), self.bias)
