"""MCAN (Deep Modular Co-Attention Networks, Yu et al. 2019), following mcan-vqa's net.py / mca.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from accuvqa.models.layers import SA, SGA, AttFlat, LayerNorm


def make_mask(feature: torch.Tensor) -> torch.Tensor:
    """Padding mask (B, 1, 1, N), True where a row of feature (B, N, D) is all zero."""
    return (torch.sum(torch.abs(feature), dim=-1) == 0).unsqueeze(1).unsqueeze(2)


class MCA_ED(nn.Module):
    """Encoder-decoder stack: LAYER SA blocks on the question, then LAYER SGA blocks on the image."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.enc_list = nn.ModuleList([SA(cfg) for _ in range(cfg.LAYER)])
        self.dec_list = nn.ModuleList([SGA(cfg) for _ in range(cfg.LAYER)])

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: language (B, T, H), y: image (B, N, H); returns both updated."""
        for enc in self.enc_list:
            x = enc(x, x_mask)
        for dec in self.dec_list:
            y = dec(y, x, y_mask, x_mask)  # every decoder layer sees the final encoder output
        return x, y


class MCAN(nn.Module):
    """The MCAN VQA network; forward returns answer logits (the original applies a sigmoid)."""

    def __init__(
        self, cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(token_size, cfg.WORD_EMBED_SIZE)
        if pretrained_emb is not None:
            emb = torch.as_tensor(np.asarray(pretrained_emb))
            if emb.shape != self.embedding.weight.shape:
                raise ValueError(f"pretrained_emb shape {tuple(emb.shape)} != {tuple(self.embedding.weight.shape)}")
            with torch.no_grad():
                self.embedding.weight.copy_(emb)
        self.lstm = nn.LSTM(cfg.WORD_EMBED_SIZE, cfg.HIDDEN_SIZE, num_layers=1, batch_first=True)
        self.img_feat_linear = nn.Linear(cfg.IMG_FEAT_SIZE, cfg.HIDDEN_SIZE)
        self.backbone = MCA_ED(cfg)
        self.attflat_img = AttFlat(cfg)
        self.attflat_lang = AttFlat(cfg)
        self.proj_norm = LayerNorm(cfg.FLAT_OUT_SIZE)
        self.proj = nn.Linear(cfg.FLAT_OUT_SIZE, answer_size)

    def forward(self, img_feat: torch.Tensor, ques_ix: torch.Tensor) -> torch.Tensor:
        """img_feat (B, N, IMG_FEAT_SIZE) with all-zero padded rows, ques_ix (B, T) with 0 = PAD -> (B, A) logits."""
        lang_mask = make_mask(ques_ix.unsqueeze(2))  # (B, 1, 1, T)
        img_mask = make_mask(img_feat)  # (B, 1, 1, N)

        emb = self.embedding(ques_ix)  # (B, T, WORD_EMBED_SIZE)
        if emb.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN has no reduced-precision LSTM for every shape: run the LSTM in float32.
            with torch.autocast("cpu", enabled=False):
                lang_feat, _ = self.lstm(emb.float())  # (B, T, H)
        else:
            lang_feat, _ = self.lstm(emb)  # (B, T, H)
        img = self.img_feat_linear(img_feat)  # (B, N, H)

        lang_feat, img = self.backbone(lang_feat, img, lang_mask, img_mask)
        proj_feat = self.attflat_lang(lang_feat, lang_mask) + self.attflat_img(img, img_mask)  # (B, FLAT_OUT)
        return self.proj(self.proj_norm(proj_feat))


def build_model(
    cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None
) -> MCAN:
    """Build an MCAN from a config with mcan-vqa's upper-case attribute names."""
    return MCAN(cfg, token_size, answer_size, pretrained_emb)
