"""Small building blocks of MCAN, mirroring mcan-vqa's net_utils.py / mca.py / net.py.

Module and parameter names follow the original code so that original checkpoints load
with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Score given to masked positions (the original uses masked_fill(mask, -1e9)).
MASK_VALUE = -1e9


class FC(nn.Module):
    """Linear layer optionally followed by ReLU and dropout."""

    def __init__(self, in_size: int, out_size: int, dropout_r: float = 0.0, use_relu: bool = True) -> None:
        super().__init__()
        self.dropout_r = dropout_r
        self.use_relu = use_relu
        self.linear = nn.Linear(in_size, out_size)
        if use_relu:
            self.relu = nn.ReLU(inplace=True)
        if dropout_r > 0:
            self.dropout = nn.Dropout(dropout_r)
        self.written_backward = True  # False: plain autograd through the modules (see plain_autograd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply linear (+ ReLU) (+ dropout)."""
        x = self.linear(x)
        if (self.written_backward and self.use_relu and self.dropout_r > 0 and self.dropout.p > 0
                and self.training and x.requires_grad):
            return ReLUDropout.apply(x, self.dropout.p)  # the same values, less memory kept for backward
        if self.use_relu:
            x = self.relu(x)
        if self.dropout_r > 0:
            x = self.dropout(x)
        return x


class ReLUDropout(torch.autograd.Function):
    """dropout(relu(x)) in training, keeping only the output for backward.

    The forward runs torch's own ReLU and dropout, so values and random numbers are those of the
    two modules. Autograd would keep the ReLU output and the dropout's scaled mask (two tensors of
    the input's size) besides the output that the next linear layer keeps anyway; here the gradient
    is read off that output: it is positive exactly where the ReLU passed and dropout kept, and
    there the gradient is the incoming one times dropout's scale 1 / (1 - p), as autograd computes
    it (tests/test_layers.py compares the two bit for bit).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:  # noqa: D102
        out = F.dropout(F.relu(x), p, training=True)
        ctx.scale = torch.ones((), dtype=x.dtype, device=x.device).div_(1 - p)  # dropout's scale, its dtype
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad * ctx.scale, out, 0), None  # ReLU's own backward kernel


class MLP(nn.Module):
    """Two-layer perceptron: FC(in -> mid) then Linear(mid -> out)."""

    def __init__(
        self, in_size: int, mid_size: int, out_size: int, dropout_r: float = 0.0, use_relu: bool = True
    ) -> None:
        super().__init__()
        self.fc = FC(in_size, mid_size, dropout_r=dropout_r, use_relu=use_relu)
        self.linear = nn.Linear(mid_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the two layers."""
        return self.linear(self.fc(x))


class LayerNorm(nn.Module):
    """mcan-vqa's LayerNorm: a_2 * (x - mean) / (std + eps) + b_2 with the unbiased std."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.a_2 = nn.Parameter(torch.ones(size))
        self.b_2 = nn.Parameter(torch.zeros(size))
        self.written_backward = True  # False: plain autograd through the formula (see plain_autograd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        if self.written_backward and torch.is_grad_enabled() and (
                x.requires_grad or self.a_2.requires_grad or self.b_2.requires_grad):
            return OriginalLayerNorm.apply(x, self.a_2, self.b_2, self.eps)
        return layer_norm_values(x, self.a_2, self.b_2, self.eps)


def layer_norm_values(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """a * (x - mean) / (std + eps) + b over the last dimension, unbiased std, in the original's order."""
    std, mean = torch.std_mean(x, dim=-1, keepdim=True)
    return a * (x - mean) / (std + eps) + b


def plain_autograd(model: nn.Module, on: bool = True) -> nn.Module:
    """Run every FC and LayerNorm of `model` through plain autograd on the original formulas (on=True)
    or through their written-out backward passes (on=False, the default): the reference those passes
    are tested and benchmarked against. The values are the same either way."""
    for module in model.modules():
        if isinstance(module, (FC, LayerNorm)):
            module.written_backward = not on
    return model


class OriginalLayerNorm(torch.autograd.Function):
    """mcan-vqa's LayerNorm with a written-out backward that keeps one tensor of the input's size.

    The forward computes the same values with the same operations as `layer_norm_values`. Autograd
    through those operations keeps three input-sized tensors (x, x - mean and a * (x - mean)); this
    keeps x - mean and the per-row std. With n features, c = x - mean, s the unbiased std,
    d = s + eps, h = c / d and g = a * grad:

        grad_x = (g - mean(g)) / d - h * sum(g * h) / ((n - 1) s),
        grad_a = sum over rows of grad * h,   grad_b = sum over rows of grad

    (the mean of the second term of grad_x is zero because sum(c) is). A row with s = 0 gets
    grad_x = (g - mean(g)) / d, as autograd gives. tests/test_layers.py compares it with autograd
    in float64.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: D102
        std, mean = torch.std_mean(x, dim=-1, keepdim=True)
        centred = x - mean
        denom = std + eps
        ctx.save_for_backward(centred, std, denom, a)
        ctx.dtypes = (x.dtype, b.dtype)
        return a * centred / denom + b

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # noqa: D102
        centred, std, denom, a = ctx.saved_tensors
        x_dtype, b_dtype = ctx.dtypes
        normed = centred / denom
        rows = tuple(range(grad.dim() - 1))
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            g = grad * a
            n = centred.size(-1)
            coef = torch.where(std > 0, (g * normed).sum(-1, keepdim=True) / ((n - 1) * std), 0)
            grad_x = ((g - g.mean(-1, keepdim=True)) / denom - coef * normed).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_a = (grad * normed).sum(rows).to(a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(rows).to(b_dtype)
        return grad_x, grad_a, grad_b, None


class MHAtt(nn.Module):
    """Multi-head scaled dot-product attention with key padding mask."""

    def __init__(self, cfg: Any, use_sdpa: bool = True) -> None:
        super().__init__()
        self.hidden_size: int = cfg.HIDDEN_SIZE
        self.n_heads: int = cfg.MULTI_HEAD
        if self.hidden_size % self.n_heads != 0:
            raise ValueError("HIDDEN_SIZE must be divisible by MULTI_HEAD")
        self.head_size = self.hidden_size // self.n_heads
        self.use_sdpa = use_sdpa
        # Opt-in (off by default, so training keeps SDPA): compute attention explicitly and keep the
        # (B, heads, Lq, Lk) map of the last forward pass in `kept_map`; the output is the same.
        self.keep_map = False
        self.kept_map: torch.Tensor | None = None

        self.linear_v = nn.Linear(self.hidden_size, self.hidden_size)
        self.linear_k = nn.Linear(self.hidden_size, self.hidden_size)
        self.linear_q = nn.Linear(self.hidden_size, self.hidden_size)
        self.linear_merge = nn.Linear(self.hidden_size, self.hidden_size)
        self.dropout = nn.Dropout(cfg.DROPOUT_R)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, H) -> (B, heads, L, H/heads)
        return x.view(x.size(0), -1, self.n_heads, self.head_size).transpose(1, 2)

    def forward(
        self, v: torch.Tensor, k: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attend from q (B, Lq, H) to k/v (B, Lk, H); mask (B, 1, 1, Lk) is True where padded."""
        batch = q.size(0)
        v, k, q = self._split(self.linear_v(v)), self._split(self.linear_k(k)), self._split(self.linear_q(q))
        if self.use_sdpa and not self.keep_map:
            attn_mask = None
            if mask is not None:
                attn_mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, MASK_VALUE)
            p = self.dropout.p if self.training else 0.0
            atted = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        else:
            atted = self.att(v, k, q, mask)
        atted = atted.transpose(1, 2).reshape(batch, -1, self.hidden_size)  # (B, Lq, H)
        return self.linear_merge(atted)

    def att(
        self, value: torch.Tensor, key: torch.Tensor, query: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Explicit attention: softmax(q k^T / sqrt(d_k), masked_fill(-1e9)) v, with dropout on the map."""
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(query.size(-1))
        if mask is not None:
            scores = scores.masked_fill(mask, MASK_VALUE)
        att_map = F.softmax(scores, dim=-1)  # (B, heads, Lq, Lk)
        if self.keep_map:
            self.kept_map = att_map.detach()
        return torch.matmul(self.dropout(att_map), value)


class FFN(nn.Module):
    """Position-wise feed-forward net: MLP(HIDDEN -> FF_SIZE -> HIDDEN)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.mlp = MLP(cfg.HIDDEN_SIZE, cfg.FF_SIZE, cfg.HIDDEN_SIZE, dropout_r=cfg.DROPOUT_R, use_relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP."""
        return self.mlp(x)


def _add_residual_norms(module: nn.Module, cfg: Any, count: int) -> None:
    """Register dropout1, norm1, ..., dropout<count>, norm<count>: the original's names and order."""
    for i in range(1, count + 1):
        setattr(module, f"dropout{i}", nn.Dropout(cfg.DROPOUT_R))
        setattr(module, f"norm{i}", LayerNorm(cfg.HIDDEN_SIZE))


class SA(nn.Module):
    """Self-attention unit: MHAtt + FFN, each with residual, dropout and LayerNorm."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.mhatt = MHAtt(cfg)
        self.ffn = FFN(cfg)
        _add_residual_norms(self, cfg, 2)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, H), x_mask (B, 1, 1, L)."""
        x = self.norm1(x + self.dropout1(self.mhatt(x, x, x, x_mask)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class SGA(nn.Module):
    """Self-guided-attention unit: self-attention on x, guided attention x -> y, then FFN."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.mhatt1 = MHAtt(cfg)
        self.mhatt2 = MHAtt(cfg)
        self.ffn = FFN(cfg)
        _add_residual_norms(self, cfg, 3)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor | None, y_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, Lx, H) attends to itself and to guide y (B, Ly, H)."""
        x = self.norm1(x + self.dropout1(self.mhatt1(x, x, x, x_mask)))
        x = self.norm2(x + self.dropout2(self.mhatt2(y, y, x, y_mask)))
        return self.norm3(x + self.dropout3(self.ffn(x)))


FLAT_POOLS = ("softmax", "sigmoid")


class AttFlat(nn.Module):
    """Attentional flattening: FLAT_GLIMPSES masked pools, concatenated, then linear_merge.

    `pool` "softmax" (mcan-vqa's) weighs the rows of each glimpse to sum to 1; "sigmoid" weighs each row on its
    own, in (0, 1), and sums them, so the pooled vector grows with how many rows the glimpse picks (a count).
    """

    def __init__(self, cfg: Any, pool: str = "softmax") -> None:
        super().__init__()
        if pool not in FLAT_POOLS:
            raise ValueError(f"pool must be one of {', '.join(FLAT_POOLS)}, got {pool!r}")
        self.pool = pool
        self.glimpses: int = cfg.FLAT_GLIMPSES
        self.mlp = MLP(cfg.HIDDEN_SIZE, cfg.FLAT_MLP_SIZE, cfg.FLAT_GLIMPSES, dropout_r=cfg.DROPOUT_R, use_relu=True)
        self.linear_merge = nn.Linear(cfg.HIDDEN_SIZE * cfg.FLAT_GLIMPSES, cfg.FLAT_OUT_SIZE)
        self.keep_map = False  # opt-in: keep the (B, L, G) pooling weights of the last forward pass
        self.kept_map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, H), x_mask (B, 1, 1, L) -> (B, FLAT_OUT_SIZE)."""
        att = self.mlp(x)  # (B, L, G)
        if x_mask is not None:
            att = att.masked_fill(x_mask.squeeze(1).squeeze(1).unsqueeze(2), MASK_VALUE)
        att = F.softmax(att, dim=1) if self.pool == "softmax" else torch.sigmoid(att)  # masked rows: 0 either way
        if self.keep_map:
            self.kept_map = att.detach()
        x_atted = torch.einsum("blg,blh->bgh", att, x)  # (B, G, H)
        return self.linear_merge(x_atted.reshape(x.size(0), -1))  # glimpses concatenated: (B, G*H)
