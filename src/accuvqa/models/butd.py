"""BUTD (bottom-up and top-down attention, Anderson et al. 2018; Teney et al. 2018), following
openvqa's `openvqa/models/butd/{net,tda}.py`.

Module and parameter names are openvqa's (`weight_g` / `weight_v` of its weight-normalised
layers, the `classifer` spelling included), so its state dicts load strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from accuvqa.models.ported import WeightNormLinear, copy_embedding, fixed_length, run_lstm
from accuvqa.models.registry import config_key, register_model, require_positive, require_rate


@dataclass(frozen=True)
class BUTDKeys:
    """BUTD's own config keys; names and defaults are openvqa's (`models/butd/model_cfgs.py`).

    openvqa's IMG_FEAT_SIZE (2048) is accuvqa's common key of the same name.
    """

    HIDDEN_SIZE: int = config_key(512, "hidden size of the question LSTM and the attention")
    DROPOUT_R: float = config_key(0.2, "dropout rate of the attention")
    CLASSIFER_DROPOUT_R: float = config_key(0.5, "dropout rate of the classifier (openvqa's spelling)")
    FLAT_OUT_SIZE: int = config_key(1024, "size of the joint question-image vector the classifier reads")

    def validate(self, where: Callable[[str], str]) -> None:
        """Raise ConfigError for sizes that cannot build the network."""
        require_positive(self, ["HIDDEN_SIZE", "FLAT_OUT_SIZE"], where)
        require_rate(self, ["DROPOUT_R", "CLASSIFER_DROPOUT_R"], where)


class WeightNormMLP(nn.Module):
    """openvqa's BUTD MLP: per layer [Dropout if dropout_r > 0], WeightNormLinear, ELU; under `mlp`,
    numbered as the original's nn.Sequential numbers them."""

    def __init__(self, dims: Sequence[int], dropout_r: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for in_size, out_size in zip(dims[:-1], dims[1:]):
            if dropout_r > 0:
                layers.append(nn.Dropout(dropout_r))
            layers += [WeightNormLinear(in_size, out_size), nn.ELU()]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers."""
        return self.mlp(x)


class AttnMap(nn.Module):
    """Top-down attention: a softmax over the regions from [linear_v(v), linear_q(q)] per region."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.linear_q = WeightNormLinear(cfg.HIDDEN_SIZE, cfg.HIDDEN_SIZE)
        self.linear_v = WeightNormLinear(cfg.IMG_FEAT_SIZE, cfg.IMG_FEAT_SIZE)
        self.nonlinear = WeightNormMLP([cfg.IMG_FEAT_SIZE + cfg.HIDDEN_SIZE, cfg.HIDDEN_SIZE], dropout_r=cfg.DROPOUT_R)
        self.linear = WeightNormLinear(cfg.HIDDEN_SIZE, 1)

    def forward(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, HIDDEN_SIZE), v (B, N, IMG_FEAT_SIZE) -> weights (B, N, 1), over every region (no mask)."""
        v = self.linear_v(v)
        q = self.linear_q(q).unsqueeze(1).expand(-1, v.size(1), -1)  # (B, N, HIDDEN_SIZE)
        logits = self.linear(self.nonlinear(torch.cat((v, q), 2)))  # (B, N, 1)
        return F.softmax(logits, 1)


class TDA(nn.Module):
    """Attend the regions with the question, then fuse: q_net(q) * v_net(attended regions)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.v_att = AttnMap(cfg)
        self.q_net = WeightNormMLP([cfg.HIDDEN_SIZE, cfg.HIDDEN_SIZE])
        self.v_net = WeightNormMLP([cfg.IMG_FEAT_SIZE, cfg.HIDDEN_SIZE])

    def forward(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, HIDDEN_SIZE), v (B, N, IMG_FEAT_SIZE) -> joint (B, HIDDEN_SIZE)."""
        atted_v = (self.v_att(q, v) * v).sum(1)  # (B, IMG_FEAT_SIZE)
        return self.q_net(q) * self.v_net(atted_v)


class BUTD(nn.Module):
    """The BUTD VQA network; forward returns answer logits."""

    def __init__(self, cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None) -> None:
        super().__init__()
        self.img_feat_pad_size, self.max_token = cfg.IMG_FEAT_PAD_SIZE, cfg.MAX_TOKEN
        self.embedding = nn.Embedding(token_size, cfg.WORD_EMBED_SIZE)
        if pretrained_emb is not None:
            copy_embedding(self.embedding, pretrained_emb)
        self.rnn = nn.LSTM(cfg.WORD_EMBED_SIZE, cfg.HIDDEN_SIZE, num_layers=1, batch_first=True)
        self.backbone = TDA(cfg)
        self.classifer = nn.Sequential(  # sic: openvqa's name
            WeightNormLinear(cfg.HIDDEN_SIZE, cfg.FLAT_OUT_SIZE),
            nn.ReLU(),
            nn.Dropout(cfg.CLASSIFER_DROPOUT_R),
            WeightNormLinear(cfg.FLAT_OUT_SIZE, answer_size),
        )

    def forward(self, img_feat: torch.Tensor, ques_ix: torch.Tensor) -> torch.Tensor:
        """img_feat (B, N, IMG_FEAT_SIZE) with all-zero padded rows, ques_ix (B, T) with 0 = PAD -> (B, A) logits."""
        img_feat = fixed_length(img_feat, self.img_feat_pad_size)  # (B, IMG_FEAT_PAD_SIZE, D): no mask
        ques_ix = fixed_length(ques_ix, self.max_token)  # (B, MAX_TOKEN)
        lang_feat = run_lstm(self.rnn, self.embedding(ques_ix))  # (B, MAX_TOKEN, HIDDEN_SIZE)
        # the state after the last of the MAX_TOKEN positions, PADs included, as the original
        return self.classifer(self.backbone(lang_feat[:, -1], img_feat))


@register_model("butd", keys=BUTDKeys, inputs=("img_feat", "ques_ix"),
                token_param="embedding.weight", answer_param="classifer.3.weight_v")
def butd(cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None) -> BUTD:
    """Build a BUTD network."""
    return BUTD(cfg, token_size, answer_size, pretrained_emb)
