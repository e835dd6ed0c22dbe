"""Multi-head attention on PyTorch's ``scaled_dot_product_attention``, with a key/value cache.

Why not ``nn.MultiheadAttention``: incremental decoding needs to keep each layer's keys and values
between steps (so a step costs O(length), not O(length²)), and the fused SDPA kernels are faster.
Masks are additive and built with ``torch.finfo(dtype).min`` rather than ``-inf``/``-1e9``:
``-1e9`` overflows fp16, and ``-inf`` turns a fully masked row into NaN.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Cache = dict[str, Any]
"""Per-layer decoding state: ``self_k``/``self_v`` ``[B, H, t, Dh]`` grow by one step each call;
``cross_k``/``cross_v`` ``[B, H, N, Dh]`` are projected from the memory once."""


def padding_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key mask ``[B, N]`` (True = attend) → additive bias ``[B, 1, 1, N]`` of 0 / ``finfo(dtype).min``.

    Built directly in the dtype of the scores: ``finfo(float32).min`` cast to fp16 or bf16 is -inf.
    """
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    bias = bias.masked_fill(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :]  # [B, 1, 1, N]


class MultiHeadAttention(nn.Module):
    """Attention of ``x`` over ``context`` (itself for self-attention), one SDPA call."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must divide by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)  # [B, H, L, Dh]

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(context).chunk(2, dim=-1)  # [B, N, D] each
        return self.split(k), self.split(v)  # [B, H, N, Dh]

    def attend(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keep: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Queries from ``x [B, T, D]`` over keys/values ``[B, H, N, Dh]`` (``keep [B, N]``: True = real
        key) → ``[B, T, D]``."""
        q = self.split(self.q(x))  # [B, H, T, Dh]
        # In q's dtype: under autocast that is the low precision the scores are computed in.
        bias = None if keep is None else padding_bias(keep, q.dtype)  # [B, 1, 1, N]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )  # [B, H, T, Dh]
        batch, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))  # [B, T, D]


class DecoderLayer(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to the memory, GELU MLP.

    With a ``cache`` the input is only the newest position(s): their keys/values are appended to
    the cache and attended together with the earlier ones, so no causal mask is needed (nothing
    later exists yet). Without a cache the whole sequence runs with ``is_causal``. Text padding sits
    after EOS, so causal masking alone keeps real positions from seeing it.
    """

    def __init__(self, d_model: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (
            nn.LayerNorm(d_model),
            nn.LayerNorm(d_model),
            nn.LayerNorm(d_model),
        )
        self.self_attn = MultiHeadAttention(d_model, heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, heads, dropout)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_mult * d_model),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_mult * d_model, d_model),
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_keep: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """``x [B, T, D]`` (new positions only when cached), ``memory [B, N, D]``, ``memory_keep [B, N]``
        (True = real memory token) → ``[B, T, D]``."""
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)  # [B, H, T, Dh]
        if cache is not None and "self_k" in cache:
            if x.shape[1] != 1:
                raise ValueError("after the first cached call, feed one new position at a time")
            k = torch.cat([cache["self_k"], k], dim=2)  # [B, H, t+1, Dh]
            v = torch.cat([cache["self_v"], v], dim=2)
        if cache is not None:
            cache["self_k"], cache["self_v"] = k, v
        # One new query may attend to every cached key; a chunk of several needs the causal mask.
        causal = x.shape[1] > 1
        x = x + self.drop(self.self_attn.attend(h, k, v, causal=causal))
        h = self.norm2(x)
        # The memory's keys/values are the same at every step: project them once (inside forward,
        # so FSDP2 has gathered this layer's parameters).
        if cache is not None and "cross_k" in cache:
            mk, mv = cache["cross_k"], cache["cross_v"]
        else:
            mk, mv = self.cross_attn.project_kv(memory)  # [B, H, N, Dh]
            if cache is not None:
                cache["cross_k"], cache["cross_v"] = mk, mv
        x = x + self.drop(self.cross_attn.attend(h, mk, mv, keep=memory_keep))
        return x + self.drop(self.ffn(self.norm3(x)))  # [B, T, D]


def run_block(block: nn.Module, recompute: bool, *args: Any) -> torch.Tensor:
    """``block(*args)``; with ``recompute`` (activation checkpointing) only the inputs are kept and
    the block runs again in backward: memory per block falls from its activations to its input,
    at the cost of one more forward. Non-reentrant: gradients reach every input and parameter
    (also under FSDP2 and torch.compile), and the dropout RNG state is replayed, so the loss and
    gradients equal the plain run's."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
