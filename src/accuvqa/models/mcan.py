"""MCAN (Deep Modular Co-Attention Networks, Yu et al. 2019), following mcan-vqa's net.py / mca.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
from torch import nn

from accuvqa.errors import ConfigError
from accuvqa.models.layers import FLAT_POOLS, SA, SGA, AttFlat, LayerNorm, MHAtt
from accuvqa.models.registry import config_key, register_model, require_positive


@dataclass(frozen=True)
class MCANKeys:
    """MCAN's own config keys; names and defaults are mcan-vqa's (MCAN-small)."""

    LAYER: int = config_key(6, "encoder (SA) and decoder (SGA) layers, each")
    HIDDEN_SIZE: int = config_key(512, "width of every attention layer")
    MULTI_HEAD: int = config_key(8, "attention heads (must divide HIDDEN_SIZE)")
    DROPOUT_R: float = config_key(0.1, "dropout rate")
    FLAT_MLP_SIZE: int = config_key(512, "hidden size of the attentional reduction's MLP")
    FLAT_GLIMPSES: int = config_key(1, "glimpses of the attentional reduction")
    FLAT_OUT_SIZE: int = config_key(1024, "size of the fused question-image vector")
    FF_SIZE: Optional[int] = config_key(None, "width of the feed-forward layers (null: 4 x HIDDEN_SIZE)")
    FLAT_IMG_POOL: str = config_key(
        "softmax", "how the image's attentional reduction weighs regions: softmax (mcan-vqa: the weights sum to 1) "
                   "or sigmoid (each region on its own, summed: the pooled vector keeps how many regions matched)")
    PROJ_HIDDEN_SIZE: int = config_key(
        0, "a hidden ReLU layer of this width before the answer layer (0: none, mcan-vqa's linear classifier)")

    # key -> the key it is derived from when left unset (re-derived when that key is replaced)
    DERIVED: ClassVar[dict[str, str]] = {"FF_SIZE": "HIDDEN_SIZE"}

    def __post_init__(self) -> None:
        if self.FF_SIZE is None:
            object.__setattr__(self, "FF_SIZE", 4 * self.HIDDEN_SIZE)

    def validate(self, where: Callable[[str], str]) -> None:
        """Raise ConfigError for sizes that cannot build an MCAN."""
        require_positive(self, ["LAYER", "HIDDEN_SIZE", "MULTI_HEAD", "FLAT_MLP_SIZE", "FLAT_GLIMPSES",
                                "FLAT_OUT_SIZE", "FF_SIZE"], where)
        if self.HIDDEN_SIZE % self.MULTI_HEAD:
            raise ConfigError(
                f"HIDDEN_SIZE ({self.HIDDEN_SIZE}) must be divisible by MULTI_HEAD ({self.MULTI_HEAD})"
                f"{where('HIDDEN_SIZE') or where('MULTI_HEAD')}; e.g. HIDDEN_SIZE "
                f"{self.HIDDEN_SIZE // self.MULTI_HEAD * self.MULTI_HEAD or self.MULTI_HEAD}")
        if self.FLAT_IMG_POOL not in FLAT_POOLS:
            raise ConfigError(f"FLAT_IMG_POOL must be one of {', '.join(FLAT_POOLS)}, got {self.FLAT_IMG_POOL!r}"
                              f"{where('FLAT_IMG_POOL')}")
        if self.PROJ_HIDDEN_SIZE < 0:
            raise ConfigError(f"PROJ_HIDDEN_SIZE must be 0 (no hidden layer) or positive, got {self.PROJ_HIDDEN_SIZE}"
                              f"{where('PROJ_HIDDEN_SIZE')}")
        if not 0.0 <= self.DROPOUT_R < 1.0:
            raise ConfigError(f"DROPOUT_R must be in [0, 1), got {self.DROPOUT_R}{where('DROPOUT_R')}")


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
        self.attflat_img = AttFlat(cfg, pool=getattr(cfg, "FLAT_IMG_POOL", "softmax"))
        self.attflat_lang = AttFlat(cfg)
        self.proj_norm = LayerNorm(cfg.FLAT_OUT_SIZE)
        hidden = getattr(cfg, "PROJ_HIDDEN_SIZE", 0)
        # PROJ_HIDDEN_SIZE 0 keeps mcan-vqa's parameters exactly (no proj_hidden in the state dict)
        self.proj_hidden = nn.Sequential(nn.Linear(cfg.FLAT_OUT_SIZE, hidden), nn.ReLU()) if hidden else None
        self.proj = nn.Linear(hidden or cfg.FLAT_OUT_SIZE, answer_size)

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
        fused = self.proj_norm(proj_feat)
        return self.proj(self.proj_hidden(fused) if self.proj_hidden is not None else fused)

    def keep_attention(self, on: bool = True) -> None:
        """Opt-in: attention is computed explicitly and its maps kept for `attention_maps` (same output)."""
        for module in self.modules():
            if isinstance(module, (MHAtt, AttFlat)):
                module.keep_map, module.kept_map = on, None

    def attention_maps(self) -> dict[str, torch.Tensor]:
        """The maps of the last forward pass run under `keep_attention(True)`, layers counted from 1:

        `question_self/<i>` (B, heads, T, T): encoder SA i, question words attending to words;
        `image_self/<i>` (B, heads, N, N): decoder SGA i, regions attending to regions;
        `image_question/<i>` (B, heads, N, T): decoder SGA i, regions attending to question words;
        `image_flat` (B, N, G) / `question_flat` (B, T, G): the AttFlat pooling weights per glimpse
        that feed the classifier (each glimpse sums to 1 over the unpadded regions / words; under
        FLAT_IMG_POOL sigmoid, each region's weight is in (0, 1) on its own).
        """
        maps = {}
        for i, enc in enumerate(self.backbone.enc_list, start=1):
            maps[f"question_self/{i}"] = enc.mhatt.kept_map
        for i, dec in enumerate(self.backbone.dec_list, start=1):
            maps[f"image_self/{i}"] = dec.mhatt1.kept_map
            maps[f"image_question/{i}"] = dec.mhatt2.kept_map
        maps["image_flat"] = self.attflat_img.kept_map
        maps["question_flat"] = self.attflat_lang.kept_map
        if any(m is None for m in maps.values()):
            raise RuntimeError("no attention maps kept: call keep_attention(True), then run forward")
        return maps


@register_model("mcan", keys=MCANKeys, inputs=("img_feat", "ques_ix"),
                token_param="embedding.weight", answer_param="proj.weight")
def mcan(cfg: Any, token_size: int, answer_size: int, pretrained_emb: np.ndarray | None = None) -> MCAN:
    """Build an MCAN from a config with mcan-vqa's upper-case attribute names."""
    return MCAN(cfg, token_size, answer_size, pretrained_emb)
