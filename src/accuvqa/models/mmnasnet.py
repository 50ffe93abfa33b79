"""MMNasNet (Deep Multimodal Neural Architecture Search, Yu et al. 2020), following openvqa's
models/mmnasnet (net.py, nasnet.py, adapter.py).

The searched architecture is the config key ARCH: an encoder of SA / FFN cells on the question and a
decoder of SA / GA / RSA / FFN cells on the image. RSA (relation self-attention) adds to its scores
the log of a learned function of each region pair's relative geometry, computed from the regions'
raw boxes `x1, y1, x2, y2` (the features' `bbox`, in pixels, as openvqa reads them with its default
BBOX_NORMALIZE False): the model's inputs are `img_feat`, `bbox` (B, N, 4, zero rows where padded)
and `ques_ix`. Module and parameter names are openvqa's, so its state_dicts load strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from accuvqa.errors import ConfigError
from accuvqa.models.layers import MASK_VALUE, MLP, AttFlat, LayerNorm, MHAtt
from accuvqa.models.mcan import make_mask
from accuvqa.models.ported import copy_embedding, run_lstm
from accuvqa.models.registry import config_key, register_model, require_positive, require_rate

ENCODER_CELLS = ("SA", "FFN")  # the encoder sees the question only
DECODER_CELLS = ("SA", "GA", "RSA", "FFN")


def _default_arch() -> dict[str, list[str]]:
    return {
        "enc": ["SA", "SA", "SA", "SA", "FFN", "FFN", "FFN", "FFN", "SA", "FFN", "FFN", "FFN"],
        "dec": ["GA", "GA", "FFN", "FFN", "GA", "FFN", "RSA", "GA", "FFN", "GA", "RSA", "FFN", "RSA", "SA", "FFN",
                "RSA", "GA", "FFN"],
    }


@dataclass(frozen=True)
class MMNasNetKeys:
    """MMNasNet's own config keys; names and defaults are openvqa's (models/mmnasnet/model_cfgs.py, small).

    openvqa's FF_SIZE, BBOXFEAT_EMB_SIZE, USE_AUX_FEAT and USE_BBOX_FEAT are left out: its VQA model
    uses none of them (the FFN cells are 4 x HIDDEN_SIZE wide; the box-feature branch is unused).
    """

    ARCH: dict[str, list[str]] = config_key(
        doc="the searched cells: {enc: [SA|FFN ...], dec: [SA|GA|RSA|FFN ...]}", factory=_default_arch)
    HIDDEN_SIZE: int = config_key(512, "width of every cell")
    REL_HBASE: int = config_key(64, "head size of the relation embedding of RSA cells")
    REL_SIZE: int = config_key(64, "size of each region pair's relative-position features")
    MULTI_HEAD: int = config_key(8, "attention heads (must divide HIDDEN_SIZE)")
    DROPOUT_R: float = config_key(0.1, "dropout rate")
    FLAT_MLP_SIZE: int = config_key(512, "hidden size of the attentional reduction's MLP")
    FLAT_GLIMPSES: int = config_key(1, "glimpses of the attentional reduction")
    FLAT_OUT_SIZE: int = config_key(1024, "size of the fused question-image vector")

    def validate(self, where: Callable[[str], str]) -> None:
        """Raise ConfigError for an architecture or sizes that cannot build an MMNasNet."""
        require_positive(self, ["HIDDEN_SIZE", "REL_HBASE", "REL_SIZE", "MULTI_HEAD", "FLAT_MLP_SIZE",
                                "FLAT_GLIMPSES", "FLAT_OUT_SIZE"], where)
        if set(self.ARCH) != {"enc", "dec"}:
            raise ConfigError(f"ARCH{where('ARCH')} must map exactly enc and dec to lists of cells, got keys "
                              f"{', '.join(sorted(self.ARCH)) or 'none'}")
        for part, allowed in (("enc", ENCODER_CELLS), ("dec", DECODER_CELLS)):
            bad = [cell for cell in self.ARCH[part] if cell not in allowed]
            if bad:
                raise ConfigError(f"ARCH {part}{where('ARCH')}: unknown cell {bad[0]!r}; {part} cells are "
                                  f"{', '.join(allowed)}")
        for key in ("MULTI_HEAD", "REL_HBASE"):
            if self.HIDDEN_SIZE % getattr(self, key):
                raise ConfigError(f"HIDDEN_SIZE ({self.HIDDEN_SIZE}){where('HIDDEN_SIZE')} must be divisible by "
                                  f"{key} ({getattr(self, key)}){where(key)}")
        require_rate(self, ["DROPOUT_R"], where)


def relation_embedding(bbox: torch.Tensor) -> torch.Tensor:
    """Relative geometry of every region pair from boxes (B, N, 4) x1, y1, x2, y2 -> (B, N, N, 4):
    log|dx / w|, log|dy / h| (clamped at 1e-3), log(w_i / w_j), log(h_i / h_j); w = x2 - x1 + 1."""
    x_min, y_min, x_max, y_max = torch.chunk(bbox, 4, dim=2)  # each (B, N, 1)
    cx, cy = (x_min + x_max) * 0.5, (y_min + y_max) * 0.5
    w, h = (x_max - x_min) + 1.0, (y_max - y_min) + 1.0
    delta_x = torch.log(torch.clamp(torch.abs((cx - cx.transpose(-1, -2)) / w), min=1e-3))
    delta_y = torch.log(torch.clamp(torch.abs((cy - cy.transpose(-1, -2)) / h), min=1e-3))
    delta_w = torch.log(w / w.transpose(-1, -2))
    delta_h = torch.log(h / h.transpose(-1, -2))
    return torch.stack((delta_x, delta_y, delta_w, delta_h), dim=-1)  # (B, N, N, 4)


class Adapter(nn.Module):
    """Region features to HIDDEN_SIZE, and the relation embedding of the boxes (openvqa's VQA adapter)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.frcn_linear = nn.Linear(cfg.IMG_FEAT_SIZE, cfg.HIDDEN_SIZE)

    def forward(self, img_feat: torch.Tensor, bbox: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, IMG_FEAT_SIZE), (B, N, 4) -> (B, N, H), (B, N, N, 4)."""
        return self.frcn_linear(img_feat), relation_embedding(bbox)


class RelMHAtt(nn.Module):
    """Multi-head attention (HIDDEN_SIZE / REL_HBASE heads of REL_HBASE) whose scores add
    log(max(relu(linear_r(rel)), 1e-6)), one relation term per head and region pair."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.hidden_size: int = cfg.HIDDEN_SIZE
        self.head_size: int = cfg.REL_HBASE
        self.n_heads = cfg.HIDDEN_SIZE // cfg.REL_HBASE
        self.linear_v = nn.Linear(cfg.HIDDEN_SIZE, cfg.HIDDEN_SIZE)
        self.linear_k = nn.Linear(cfg.HIDDEN_SIZE, cfg.HIDDEN_SIZE)
        self.linear_q = nn.Linear(cfg.HIDDEN_SIZE, cfg.HIDDEN_SIZE)
        self.linear_merge = nn.Linear(cfg.HIDDEN_SIZE, cfg.HIDDEN_SIZE)
        self.linear_r = nn.Linear(cfg.REL_SIZE, self.n_heads, bias=True)
        self.dropout = nn.Dropout(cfg.DROPOUT_R)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, H) -> (B, heads, L, REL_HBASE)
        return x.view(x.size(0), -1, self.n_heads, self.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """x (B, N, H) attends to itself; mask (B, 1, 1, N) True where padded; rel (B, N, N, REL_SIZE)."""
        v, k, q = self._split(self.linear_v(x)), self._split(self.linear_k(x)), self._split(self.linear_q(x))
        r = F.relu(self.linear_r(rel)).permute(0, 3, 1, 2)  # (B, heads, N, N)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_size)
        scores = torch.log(torch.clamp(r, min=1e-6)) + scores
        scores = scores.masked_fill(mask, MASK_VALUE)
        att_map = self.dropout(F.softmax(scores, dim=-1))
        atted = torch.matmul(att_map, v).transpose(1, 2).reshape(x.size(0), -1, self.hidden_size)
        return self.linear_merge(atted)


class _Cell(nn.Module):
    """A residual cell: x = norm(x + dropout(op(...))). Every cell takes (x, y, x_mask, y_mask, rel)."""

    def __init__(self, cfg: Any, op_name: str, op: nn.Module) -> None:
        super().__init__()
        setattr(self, op_name, op)  # first, as openvqa registers it
        self.dropout = nn.Dropout(cfg.DROPOUT_R)
        self.norm = LayerNorm(cfg.HIDDEN_SIZE)

    def residual(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """norm(x + dropout(update))."""
        return self.norm(x + self.dropout(update))


class SA(_Cell):
    """Self-attention on x."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, "mhatt", MHAtt(cfg))

    def forward(self, x: torch.Tensor, y: Any, x_mask: torch.Tensor, y_mask: Any, rel: Any) -> torch.Tensor:
        """x (B, L, H)."""
        return self.residual(x, self.mhatt(x, x, x, x_mask))


class GA(_Cell):
    """Guided attention: x attends to the question y."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, "mhatt", MHAtt(cfg))

    def forward(self, x: torch.Tensor, y: torch.Tensor, x_mask: Any, y_mask: torch.Tensor, rel: Any) -> torch.Tensor:
        """x (B, N, H), y (B, T, H)."""
        return self.residual(x, self.mhatt(y, y, x, y_mask))


class RSA(_Cell):
    """Relation self-attention on the regions."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, "mhatt", RelMHAtt(cfg))

    def forward(self, x: torch.Tensor, y: Any, x_mask: torch.Tensor, y_mask: Any, rel: torch.Tensor) -> torch.Tensor:
        """x (B, N, H), rel (B, N, N, REL_SIZE)."""
        return self.residual(x, self.mhatt(x, x_mask, rel))


class FFN(_Cell):
    """Feed-forward: MLP(HIDDEN -> 4 x HIDDEN -> HIDDEN)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, "mlp", MLP(cfg.HIDDEN_SIZE, cfg.HIDDEN_SIZE * 4, cfg.HIDDEN_SIZE,
                                         dropout_r=cfg.DROPOUT_R, use_relu=True))

    def forward(self, x: torch.Tensor, y: Any, x_mask: Any, y_mask: Any, rel: Any) -> torch.Tensor:
        """x (B, L, H)."""
        return self.residual(x, self.mlp(x))


CELLS: dict[str, type[_Cell]] = {"SA": SA, "GA": GA, "RSA": RSA, "FFN": FFN}


class NAS_ED(nn.Module):
    """Encoder cells on the question, then decoder cells on the image (ARCH['enc'], ARCH['dec'])."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.enc_list = nn.ModuleList([CELLS[cell](cfg) for cell in cfg.ARCH["enc"]])
        self.dec_list = nn.ModuleList([CELLS[cell](cfg) for cell in cfg.ARCH["dec"]])

    def forward(self, y: torch.Tensor, x: torch.Tensor, y_mask: torch.Tensor, x_mask: torch.Tensor,
                rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y: question (B, T, H), x: image (B, N, H); returns both updated."""
        for enc in self.enc_list:
            y = enc(y, None, y_mask, None, None)
        for dec in self.dec_list:
            x = dec(x, y, x_mask, y_mask, rel)
        return y, x


class MMNasNet(nn.Module):
    """The MMNasNet VQA network (openvqa's Net); forward returns answer logits."""

    def __init__(self, cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(token_size, cfg.WORD_EMBED_SIZE)
        if pretrained_emb is not None:
            copy_embedding(self.embedding, pretrained_emb)
        self.lstm = nn.LSTM(cfg.WORD_EMBED_SIZE, cfg.HIDDEN_SIZE, num_layers=1, batch_first=True)
        self.adapter = Adapter(cfg)
        self.backbone = NAS_ED(cfg)
        self.linear_rel = nn.Linear(4, cfg.REL_SIZE)
        self.relu = nn.ReLU()
        self.attflat_img = AttFlat(cfg)
        self.attflat_lang = AttFlat(cfg)
        self.proj_norm = LayerNorm(cfg.FLAT_OUT_SIZE)
        self.proj = nn.Linear(cfg.FLAT_OUT_SIZE, answer_size)

    def forward(self, img_feat: torch.Tensor, bbox: torch.Tensor, ques_ix: torch.Tensor) -> torch.Tensor:
        """img_feat (B, N, IMG_FEAT_SIZE) and bbox (B, N, 4) with all-zero padded rows, ques_ix (B, T)
        with 0 = PAD -> (B, A) logits."""
        lang_mask = make_mask(ques_ix.unsqueeze(2))  # (B, 1, 1, T)
        img_mask = make_mask(img_feat)  # (B, 1, 1, N)
        lang_feat = run_lstm(self.lstm, self.embedding(ques_ix))  # (B, T, H)
        img, rel_embed = self.adapter(img_feat, bbox)  # (B, N, H), (B, N, N, 4)
        rel = self.relu(self.linear_rel(rel_embed))  # (B, N, N, REL_SIZE)
        lang_feat, img = self.backbone(lang_feat, img, lang_mask, img_mask, rel)
        proj_feat = self.attflat_lang(lang_feat, lang_mask) + self.attflat_img(img, img_mask)
        return self.proj(self.proj_norm(proj_feat))


@register_model("mmnasnet", keys=MMNasNetKeys, inputs=("img_feat", "bbox", "ques_ix"),
                token_param="embedding.weight", answer_param="proj.weight")
def mmnasnet(cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None) -> MMNasNet:
    """Build an MMNasNet from a config with openvqa's upper-case attribute names."""
    return MMNasNet(cfg, token_size, answer_size, pretrained_emb)
