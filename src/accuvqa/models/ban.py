"""BAN (Bilinear Attention Networks, Kim et al. 2018), following openvqa's models/ban (net.py, ban.py).

Module and parameter names are openvqa's (weight-normalised layers keep torch's legacy
`weight_g` / `weight_v` names, the classifier keeps its spelling `classifer`), so an openvqa BAN
state_dict loads with `load_state_dict(strict=True)`.

openvqa pads every question to MAX_TOKEN tokens and BAN attends to, and sums over, every position,
the PAD ones included (it has no question mask): `forward` therefore brings `ques_ix` to exactly
MAX_TOKEN positions (PAD-padded, or cut as the tokenizer cuts), so dynamic padding in a batch does
not change the answer. Padded image regions (all-zero rows) are masked out of the attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from accuvqa.errors import ConfigError
from accuvqa.models.ported import WeightNormLinear, copy_embedding, fixed_length, run_lstm
from accuvqa.models.registry import config_key, register_model, require_positive, require_rate


@dataclass(frozen=True)
class BANKeys:
    """BAN's own config keys; names and defaults are openvqa's (models/ban/model_cfgs.py: BAN-8)."""

    GLIMPSE: int = config_key(8, "bilinear attention glimpses (maps over region-word pairs)")
    HIDDEN_SIZE: int = config_key(1024, "hidden size of the question GRU and the joint space")
    K_TIMES: int = config_key(3, "rank multiplier of the low-rank bilinear attention")
    BA_HIDDEN_SIZE: Optional[int] = config_key(  # derived as openvqa derives it
        None, "width of the bilinear attention (null: K_TIMES x HIDDEN_SIZE)")
    DROPOUT_R: float = config_key(0.2, "dropout rate")
    CLASSIFER_DROPOUT_R: float = config_key(0.5, "dropout rate of the classifier (openvqa's spelling)")
    FLAT_OUT_SIZE: int = config_key(2048, "hidden size of the classifier")

    DERIVED: ClassVar[dict[str, str]] = {"BA_HIDDEN_SIZE": "HIDDEN_SIZE"}

    def __post_init__(self) -> None:
        if self.BA_HIDDEN_SIZE is None:
            object.__setattr__(self, "BA_HIDDEN_SIZE", self.K_TIMES * self.HIDDEN_SIZE)

    def validate(self, where: Callable[[str], str]) -> None:
        """Raise ConfigError for sizes that cannot build a BAN."""
        require_positive(self, ["GLIMPSE", "HIDDEN_SIZE", "K_TIMES", "BA_HIDDEN_SIZE", "FLAT_OUT_SIZE"], where)
        if self.BA_HIDDEN_SIZE != self.K_TIMES * self.HIDDEN_SIZE:
            raise ConfigError(
                f"BA_HIDDEN_SIZE ({self.BA_HIDDEN_SIZE}){where('BA_HIDDEN_SIZE')} must be K_TIMES x HIDDEN_SIZE "
                f"({self.K_TIMES} x {self.HIDDEN_SIZE} = {self.K_TIMES * self.HIDDEN_SIZE}): BAN sum-pools "
                f"K_TIMES features back to HIDDEN_SIZE; leave BA_HIDDEN_SIZE unset")
        require_rate(self, ["DROPOUT_R", "CLASSIFER_DROPOUT_R"], where)


class WeightNormMLP(nn.Module):
    """openvqa's BAN MLP: for each layer [Dropout] WeightNormLinear [ReLU], in one `mlp` Sequential
    (so parameter indices move with the dropout, as in the original)."""

    def __init__(self, dims: list[int], relu: bool = True, dropout_r: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for in_size, out_size in zip(dims[:-1], dims[1:]):
            if dropout_r > 0:
                layers.append(nn.Dropout(dropout_r))
            layers.append(WeightNormLinear(in_size, out_size))
            if relu:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers."""
        return self.mlp(x)


class BilinearAttentionLogits(nn.Module):
    """Low-rank bilinear attention logits (openvqa's `BC(atten=True)` under weight_norm of `h_mat`):
    logits[b, g, v, q] = sum_k h[g, k] v_[b, v, k] q_[b, q, k] + h_bias[g]."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.h_bias = nn.Parameter(torch.randn(1, cfg.GLIMPSE, 1, 1))
        h_mat = torch.randn(1, cfg.GLIMPSE, 1, cfg.BA_HIDDEN_SIZE)
        self.h_mat_g = nn.Parameter(h_mat.norm())
        self.h_mat_v = nn.Parameter(h_mat)
        self.v_net = WeightNormMLP([cfg.IMG_FEAT_SIZE, cfg.BA_HIDDEN_SIZE], dropout_r=cfg.DROPOUT_R)
        self.q_net = WeightNormMLP([cfg.HIDDEN_SIZE, cfg.BA_HIDDEN_SIZE], dropout_r=cfg.DROPOUT_R)
        self.dropout = nn.Dropout(cfg.CLASSIFER_DROPOUT_R)

    def forward(self, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """v (B, N, IMG_FEAT_SIZE), q (B, T, HIDDEN_SIZE) -> (B, GLIMPSE, N, T)."""
        h_mat = self.h_mat_v * (self.h_mat_g / self.h_mat_v.norm())
        v_ = self.dropout(self.v_net(v))  # (B, N, BA)
        q_ = self.q_net(q)  # (B, T, BA)
        return torch.einsum("xhyk,bvk,bqk->bhvq", h_mat, v_, q_) + self.h_bias


class BiAttention(nn.Module):
    """GLIMPSE bilinear attention maps over (region, token) pairs, softmax over all pairs."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.logits = BilinearAttentionLogits(cfg)

    def forward(self, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """v (B, N, IMG_FEAT_SIZE) with all-zero padded rows, q (B, T, H) -> maps (B, GLIMPSE, N, T)."""
        logits = self.logits(v, q)
        padded = (v.abs().sum(2) == 0)[:, None, :, None]  # (B, 1, N, 1)
        logits = logits.masked_fill(padded, float("-inf"))
        b, g, n, t = logits.shape
        return F.softmax(logits.reshape(b, g, n * t), dim=2).view(b, g, n, t)


class BilinearConnect(nn.Module):
    """Bilinear pooling of regions and tokens under one attention map (openvqa's `BC`), then
    sum-pooling of each K_TIMES consecutive features: (B, BA_HIDDEN_SIZE) -> (B, HIDDEN_SIZE)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.k_times: int = cfg.K_TIMES
        self.v_net = WeightNormMLP([cfg.IMG_FEAT_SIZE, cfg.BA_HIDDEN_SIZE], dropout_r=cfg.DROPOUT_R)
        self.q_net = WeightNormMLP([cfg.HIDDEN_SIZE, cfg.BA_HIDDEN_SIZE], dropout_r=cfg.DROPOUT_R)

    def forward(self, v: torch.Tensor, q: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """v (B, N, IMG_FEAT_SIZE), q (B, T, H), att (B, N, T) -> (B, H)."""
        pooled = torch.einsum("bvk,bvq,bqk->bk", self.v_net(v), att, self.q_net(q))  # (B, BA)
        return pooled.view(pooled.size(0), -1, self.k_times).sum(2)


class BAN(nn.Module):
    """The BAN backbone: one attention, then GLIMPSE residual bilinear updates of the question."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.glimpses: int = cfg.GLIMPSE
        self.BiAtt = BiAttention(cfg)
        self.b_net = nn.ModuleList([BilinearConnect(cfg) for _ in range(cfg.GLIMPSE)])
        self.q_prj = nn.ModuleList([WeightNormMLP([cfg.HIDDEN_SIZE, cfg.HIDDEN_SIZE], relu=False,
                                                  dropout_r=cfg.DROPOUT_R) for _ in range(cfg.GLIMPSE)])

    def forward(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, T, H), v (B, N, IMG_FEAT_SIZE) -> q updated (B, T, H)."""
        att = self.BiAtt(v, q)  # (B, GLIMPSE, N, T)
        for g in range(self.glimpses):
            bi_emb = self.b_net[g](v, q, att[:, g])  # (B, H)
            q = self.q_prj[g](bi_emb.unsqueeze(1)) + q  # broadcast over the T positions
        return q


class BANNet(nn.Module):
    """The BAN VQA network (openvqa's Net); forward returns answer logits."""

    def __init__(self, cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None) -> None:
        super().__init__()
        self.max_token: int = cfg.MAX_TOKEN
        self.embedding = nn.Embedding(token_size, cfg.WORD_EMBED_SIZE)
        if pretrained_emb is not None:
            copy_embedding(self.embedding, pretrained_emb)
        self.rnn = nn.GRU(cfg.WORD_EMBED_SIZE, cfg.HIDDEN_SIZE, num_layers=1, batch_first=True)
        self.backbone = BAN(cfg)
        self.classifer = nn.Sequential(  # openvqa's spelling, kept for its state_dict keys
            WeightNormLinear(cfg.HIDDEN_SIZE, cfg.FLAT_OUT_SIZE),
            nn.ReLU(),
            nn.Dropout(cfg.CLASSIFER_DROPOUT_R),
            WeightNormLinear(cfg.FLAT_OUT_SIZE, answer_size),
        )

    def forward(self, img_feat: torch.Tensor, ques_ix: torch.Tensor) -> torch.Tensor:
        """img_feat (B, N, IMG_FEAT_SIZE) with all-zero padded rows, ques_ix (B, T) with 0 = PAD -> (B, A)."""
        ques_ix = fixed_length(ques_ix, self.max_token)  # (B, MAX_TOKEN), as openvqa
        lang_feat = run_lstm(self.rnn, self.embedding(ques_ix))  # the GRU's outputs (B, MAX_TOKEN, H)
        lang_feat = self.backbone(lang_feat, img_feat)
        return self.classifer(lang_feat.sum(1))


@register_model("ban", keys=BANKeys, inputs=("img_feat", "ques_ix"),
                token_param="embedding.weight", answer_param="classifer.3.weight_v")
def ban(cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None) -> BANNet:
    """Build a BAN from a config with openvqa's upper-case attribute names."""
    return BANNet(cfg, token_size, answer_size, pretrained_emb)
