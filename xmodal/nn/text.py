"""Text decoders: a causal transformer that cross-attends to a modality encoder's tokens."""

from __future__ import annotations

import torch
from torch import nn


class TransformerTextDecoder(nn.Module):
    """Pre-norm transformer decoder with tied input/output embeddings."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        layers: int,
        heads: int,
        ffn_mult: int,
        dropout: float,
        max_len: int,
        pad_id: int,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        # Small init: the tied output layer then starts near uniform logits (loss ≈ ln V) instead
        # of N(0, 1) embeddings giving logits of size ~sqrt(d_model).
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.pos = nn.Parameter(torch.zeros(1, max_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerDecoderLayer(
            d_model, heads, ffn_mult * d_model, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(d_model))
        self.out = nn.Linear(d_model, vocab_size, bias=False)
        self.out.weight = self.embed.weight  # tied: fewer parameters, better small-data behaviour

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` for ``tokens [B, T]`` given encoder ``memory [B, N, D]``."""
        length = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:, :length]  # [B, T, D]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tokens.device), diagonal=1)
        x = self.layers(x, memory, tgt_mask=causal, tgt_key_padding_mask=tokens == self.pad_id)  # [B, T, D]
        return self.out(x)  # [B, T, V]

    @torch.no_grad()
    def greedy(
        self, memory: torch.Tensor, bos_id: int, eos_id: int, max_len: int, stop_early: bool = True
    ) -> torch.Tensor:
        """Greedy decoding: ids ``[B, L]`` starting after BOS, padded after each row's EOS.

        ``stop_early=False`` runs all ``max_len`` steps: sharded (FSDP) parameters are gathered
        in every forward, so all ranks must take the same number of steps.
        """
        batch = memory.shape[0]
        tokens = torch.full((batch, 1), bos_id, dtype=torch.long, device=memory.device)  # [B, 1]
        done = torch.zeros(batch, dtype=torch.bool, device=memory.device)
        for _ in range(min(max_len, self.max_len) - 1):
            next_ids = self(tokens, memory)[:, -1].argmax(-1)  # [B]
            next_ids = next_ids.masked_fill(done, self.pad_id)
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            done |= next_ids == eos_id
            if stop_early and bool(done.all()):
                break
        return tokens[:, 1:]
