"""The question side shared by the openvqa models: word embedding (optionally pre-trained) and RNN."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def word_embedding(token_size: int, size: int, pretrained_emb: np.ndarray | None = None) -> nn.Embedding:
    """nn.Embedding(token_size, size), initialised from `pretrained_emb` (token_size, size) when given."""
    embedding = nn.Embedding(token_size, size)
    if pretrained_emb is not None:
        emb = torch.as_tensor(np.asarray(pretrained_emb))
        if emb.shape != embedding.weight.shape:
            raise ValueError(f"pretrained_emb shape {tuple(emb.shape)} != {tuple(embedding.weight.shape)}")
        with torch.no_grad():
            embedding.weight.copy_(emb)
    return embedding


def run_rnn(rnn: nn.RNNBase, emb: torch.Tensor) -> torch.Tensor:
    """Outputs (B, T, H) of a batch-first LSTM / GRU on `emb` (B, T, E); in float32 under CPU autocast,
    where oneDNN has no reduced-precision recurrent kernel for every shape."""
    if emb.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return rnn(emb.float())[0]
    return rnn(emb)[0]
