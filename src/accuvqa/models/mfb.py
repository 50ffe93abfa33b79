"""MFB and MFH (Yu et al. 2017, 2018): multi-modal factorized bilinear / high-order pooling with
co-attention, following openvqa's `openvqa/models/mfb/{net,mfb,adapter}.py`.

Registered twice: `mfb` (HIGH_ORDER False) and `mfh` (HIGH_ORDER True, two cascaded MFB blocks);
openvqa's mfh.yml, which says `MODEL_USE: mfb` with `HIGH_ORDER: True`, builds the same network.
Module and parameter names are openvqa's, so its state dicts load strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from accuvqa.models.layers import MLP
from accuvqa.models.ported import copy_embedding, fixed_length, run_lstm
from accuvqa.models.registry import config_key, register_model, require_positive, require_rate

_HIGH_ORDER_DOC = "False: MFB, one factorised bilinear block; True: MFH, two blocks in cascade"


@dataclass(frozen=True)
class MFBKeys:
    """MFB's own config keys; names and defaults are openvqa's (`models/mfb/model_cfgs.py`)."""

    HIGH_ORDER: bool = config_key(False, _HIGH_ORDER_DOC)
    HIDDEN_SIZE: int = config_key(512, "width of the question and image attention MLPs")
    MFB_K: int = config_key(5, "factor k of the factorised bilinear pooling (sum-pooling window)")
    MFB_O: int = config_key(1000, "output size o of each bilinear block")
    LSTM_OUT_SIZE: int = config_key(1024, "hidden size of the question LSTM")
    DROPOUT_R: float = config_key(0.1, "dropout rate")
    I_GLIMPSES: int = config_key(2, "glimpses of the image attention")
    Q_GLIMPSES: int = config_key(2, "glimpses of the question attention")

    def validate(self, where: Callable[[str], str]) -> None:
        """Raise ConfigError for sizes that cannot build the network."""
        require_positive(self, ["HIDDEN_SIZE", "MFB_K", "MFB_O", "LSTM_OUT_SIZE", "I_GLIMPSES", "Q_GLIMPSES"], where)
        require_rate(self, ["DROPOUT_R"], where)


@dataclass(frozen=True)
class MFHKeys(MFBKeys):
    """MFH: MFB's keys with HIGH_ORDER on (openvqa's mfh.yml)."""

    HIGH_ORDER: bool = config_key(True, _HIGH_ORDER_DOC)


class MFB(nn.Module):
    """One factorized bilinear pooling block: (B, C, D_img) x (B, 1, D_q) -> z (B, C, MFB_O), and its
    expanded product (B, C, MFB_K * MFB_O), which the next block of an MFH multiplies into its own."""

    def __init__(self, cfg: Any, img_feat_size: int, ques_feat_size: int, is_first: bool) -> None:
        super().__init__()
        self.k, self.o = cfg.MFB_K, cfg.MFB_O
        self.is_first = is_first
        self.proj_i = nn.Linear(img_feat_size, cfg.MFB_K * cfg.MFB_O)
        self.proj_q = nn.Linear(ques_feat_size, cfg.MFB_K * cfg.MFB_O)
        self.dropout = nn.Dropout(cfg.DROPOUT_R)

    def forward(self, img_feat: torch.Tensor, ques_feat: torch.Tensor,
                exp_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """img_feat (B, C, D_img), ques_feat (B, 1, D_q), exp_in (B, C, K*O) for a block after the first."""
        batch, regions = img_feat.shape[:2]
        exp_out = self.proj_i(img_feat) * self.proj_q(ques_feat)  # (B, C, K*O)
        if not self.is_first:
            exp_out = exp_out * exp_in
        exp_out = self.dropout(exp_out)
        z = exp_out.view(batch, regions, self.o, self.k).sum(-1)  # sum pooling of K neighbours: (B, C, O)
        z = torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z))  # signed square root
        z = F.normalize(z.reshape(batch, -1))  # L2 over all C * O values together, as the original
        return z.view(batch, regions, self.o), exp_out


def glimpse_pool(maps: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """Attention maps (B, L, G) softmaxed over L pool feat (B, L, D) into (B, G * D), glimpses concatenated."""
    return torch.einsum("blg,bld->bgd", F.softmax(maps, dim=1), feat).reshape(feat.size(0), -1)


class QAtt(nn.Module):
    """Question self-attention: Q_GLIMPSES softmax pools over all MAX_TOKEN positions."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.mlp = MLP(cfg.LSTM_OUT_SIZE, cfg.HIDDEN_SIZE, cfg.Q_GLIMPSES, dropout_r=cfg.DROPOUT_R, use_relu=True)

    def forward(self, ques_feat: torch.Tensor) -> torch.Tensor:
        """(B, T, LSTM_OUT_SIZE) -> (B, LSTM_OUT_SIZE * Q_GLIMPSES)."""
        return glimpse_pool(self.mlp(ques_feat), ques_feat)


class IAtt(nn.Module):
    """Question-guided image attention: an MFB block scores each region, I_GLIMPSES softmax pools."""

    def __init__(self, cfg: Any, img_feat_size: int, ques_att_feat_size: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.DROPOUT_R)
        self.mfb = MFB(cfg, img_feat_size, ques_att_feat_size, True)
        self.mlp = MLP(cfg.MFB_O, cfg.HIDDEN_SIZE, cfg.I_GLIMPSES, dropout_r=cfg.DROPOUT_R, use_relu=True)

    def forward(self, img_feat: torch.Tensor, ques_att_feat: torch.Tensor) -> torch.Tensor:
        """img_feat (B, C, IMG_FEAT_SIZE), ques_att_feat (B, D_q) -> (B, IMG_FEAT_SIZE * I_GLIMPSES)."""
        img_feat = self.dropout(img_feat)
        z, _ = self.mfb(img_feat, ques_att_feat.unsqueeze(1))  # (B, C, O)
        return glimpse_pool(self.mlp(z), img_feat)


class CoAtt(nn.Module):
    """Co-attention, then MFB (or MFH: two cascaded blocks, outputs concatenated) fusion."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.high_order = cfg.HIGH_ORDER
        img_att_feat_size = cfg.IMG_FEAT_SIZE * cfg.I_GLIMPSES
        ques_att_feat_size = cfg.LSTM_OUT_SIZE * cfg.Q_GLIMPSES
        self.q_att = QAtt(cfg)
        self.i_att = IAtt(cfg, cfg.IMG_FEAT_SIZE, ques_att_feat_size)
        if self.high_order:
            self.mfh1 = MFB(cfg, img_att_feat_size, ques_att_feat_size, True)
            self.mfh2 = MFB(cfg, img_att_feat_size, ques_att_feat_size, False)
        else:
            self.mfb = MFB(cfg, img_att_feat_size, ques_att_feat_size, True)

    def forward(self, img_feat: torch.Tensor, ques_feat: torch.Tensor) -> torch.Tensor:
        """img_feat (B, C, IMG_FEAT_SIZE), ques_feat (B, T, LSTM_OUT_SIZE) -> (B, O) or, MFH, (B, 2 * O)."""
        ques_feat = self.q_att(ques_feat)  # (B, LSTM_OUT_SIZE * Q_GLIMPSES)
        fuse_feat = self.i_att(img_feat, ques_feat).unsqueeze(1)  # (B, 1, IMG_FEAT_SIZE * I_GLIMPSES)
        ques_feat = ques_feat.unsqueeze(1)
        if self.high_order:
            z1, exp1 = self.mfh1(fuse_feat, ques_feat)
            z2, _ = self.mfh2(fuse_feat, ques_feat, exp1)
            return torch.cat((z1.squeeze(1), z2.squeeze(1)), 1)
        z, _ = self.mfb(fuse_feat, ques_feat)
        return z.squeeze(1)


class UnusedLinear(nn.Module):
    """Weight and bias of a linear layer that openvqa's MFB adapter creates for VQA but never applies.

    Kept as buffers: an openvqa state dict (which holds them) loads strictly, while training,
    DistributedDataParallel and the optimizer see no parameter that never gets a gradient.
    """

    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_size, in_size))
        self.register_buffer("bias", torch.zeros(out_size))


class Adapter(nn.Module):
    """openvqa's MFB adapter for VQA: region features pass unchanged; holds the unused `frcn_linear`."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.frcn_linear = UnusedLinear(cfg.IMG_FEAT_SIZE, cfg.HIDDEN_SIZE)


class MFBNet(nn.Module):
    """The MFB / MFH VQA network; forward returns answer logits (train with LOSS_FUNC kld, as openvqa)."""

    def __init__(self, cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None) -> None:
        super().__init__()
        self.img_feat_pad_size, self.max_token = cfg.IMG_FEAT_PAD_SIZE, cfg.MAX_TOKEN
        self.adapter = Adapter(cfg)
        self.embedding = nn.Embedding(token_size, cfg.WORD_EMBED_SIZE)
        if pretrained_emb is not None:
            copy_embedding(self.embedding, pretrained_emb)
        self.lstm = nn.LSTM(cfg.WORD_EMBED_SIZE, cfg.LSTM_OUT_SIZE, num_layers=1, batch_first=True)
        self.dropout = nn.Dropout(cfg.DROPOUT_R)
        self.dropout_lstm = nn.Dropout(cfg.DROPOUT_R)
        self.backbone = CoAtt(cfg)
        self.proj = nn.Linear((2 if cfg.HIGH_ORDER else 1) * cfg.MFB_O, answer_size)

    def forward(self, img_feat: torch.Tensor, ques_ix: torch.Tensor) -> torch.Tensor:
        """img_feat (B, N, IMG_FEAT_SIZE) with all-zero padded rows, ques_ix (B, T) with 0 = PAD -> (B, A) logits."""
        img_feat = fixed_length(img_feat, self.img_feat_pad_size)  # (B, IMG_FEAT_PAD_SIZE, D): no mask
        ques_ix = fixed_length(ques_ix, self.max_token)  # (B, MAX_TOKEN)
        ques_feat = self.dropout(self.embedding(ques_ix))  # (B, T, WORD_EMBED_SIZE)
        ques_feat = self.dropout_lstm(run_lstm(self.lstm, ques_feat))  # (B, T, LSTM_OUT_SIZE)
        return self.proj(self.backbone(img_feat, ques_feat))


@register_model("mfb", keys=MFBKeys, inputs=("img_feat", "ques_ix"),
                token_param="embedding.weight", answer_param="proj.weight")
def mfb(cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None) -> MFBNet:
    """Build an MFB (or, with HIGH_ORDER True, an MFH) network."""
    return MFBNet(cfg, token_size, answer_size, pretrained_emb)


@register_model("mfh", keys=MFHKeys, inputs=("img_feat", "ques_ix"),
                token_param="embedding.weight", answer_param="proj.weight")
def mfh(cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None) -> MFBNet:
    """Build an MFH network (MFB's keys, HIGH_ORDER True by default)."""
    return MFBNet(cfg, token_size, answer_size, pretrained_emb)
