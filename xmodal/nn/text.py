"""Text decoder: a causal transformer that cross-attends to a modality encoder's tokens, with
greedy and batched beam search that share one step function and a key/value cache.

Decoding runs through ``forward`` only (never a side method that touches parameters), so an
FSDP2-sharded decoder gathers its weights for every step exactly as in training.
"""

from __future__ import annotations

import torch
from torch import nn

from xmodal.nn.attention import Cache, DecoderLayer, run_block


def length_penalty(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT length penalty ``((5 + len) / 6) ** alpha``; scores are divided by it (alpha 0 = none)."""
    return ((5.0 + lengths) / 6.0) ** alpha


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
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.activation_checkpointing = activation_checkpointing
        """Training forwards keep only each layer's input and recompute the layer in backward."""
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        # Small init: the tied output layer then starts near uniform logits (loss ≈ ln V) instead
        # of N(0, 1) embeddings giving logits of size ~sqrt(d_model).
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.pos = nn.Parameter(torch.zeros(1, max_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads, ffn_mult, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size, bias=False)
        self.out.weight = self.embed.weight  # tied: fewer parameters, better small-data behaviour

    def new_cache(self) -> list[Cache]:
        """An empty key/value cache, one dict per layer (filled by ``forward``)."""
        return [{} for _ in self.layers]

    def forward(
        self,
        tokens: torch.Tensor,
        memory: torch.Tensor,
        memory_keep: torch.Tensor | None = None,
        cache: list[Cache] | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` for ``tokens [B, T]`` given ``memory [B, N, D]``.

        ``memory_keep [B, N]`` is True on real memory tokens (audio padding is False). With a
        ``cache``, ``tokens`` are the positions not yet cached (all of them on the first call,
        then one per call) and their keys/values are added to it.
        """
        start = cache[0]["self_k"].shape[2] if cache and "self_k" in cache[0] else 0
        length = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:, start : start + length]  # [B, T, D]
        # Training only: evaluation keeps no activations for a backward, and decoding fills a cache.
        recompute = self.activation_checkpointing and self.training and cache is None
        for i, layer in enumerate(self.layers):
            x = run_block(layer, recompute, x, memory, memory_keep, None if cache is None else cache[i])
        return self.out(self.norm(x))  # [B, T, V]

    def step(
        self,
        tokens: torch.Tensor,
        memory: torch.Tensor,
        memory_keep: torch.Tensor | None,
        cache: list[Cache] | None,
    ) -> torch.Tensor:
        """Log-probabilities ``[B, V]`` (fp32) of the token after ``tokens [B, t]``.

        The one step function of greedy and beam search: with a cache it feeds only the positions
        not cached yet (O(t) work per step); without one it reruns the whole prefix (O(t²)).
        """
        if cache is not None:
            cached = cache[0]["self_k"].shape[2] if "self_k" in cache[0] else 0
            tokens = tokens[:, cached:]
        logits = self(tokens, memory, memory_keep, cache)[:, -1]  # [B, V]
        return torch.log_softmax(logits.float(), dim=-1)

    def constrain(
        self,
        logp: torch.Tensor,
        generated: int,
        finished: torch.Tensor,
        bos_id: int,
        eos_id: int,
        min_len: int,
    ) -> torch.Tensor:
        """Rules shared by greedy and beam search, applied to ``logp [B, V]`` in place.

        BOS and padding are never generated; EOS is barred before ``min_len`` words; a finished
        row can only add padding, at no cost (its score stays frozen).
        """
        logp[:, [bos_id, self.pad_id]] = -torch.inf
        if generated < min_len:
            logp[:, eos_id] = -torch.inf
        if bool(finished.any()):
            logp[finished] = -torch.inf
            logp[finished, self.pad_id] = 0.0
        return logp

    def _steps(self, max_len: int) -> int:
        # max_len counts BOS (as data.max_text_len does); positions must fit the embedding table.
        return min(max_len, self.max_len) - 1

    @torch.no_grad()
    def greedy(
        self,
        memory: torch.Tensor,
        bos_id: int,
        eos_id: int,
        max_len: int,
        memory_keep: torch.Tensor | None = None,
        min_len: int = 0,
        use_cache: bool = True,
        stop_early: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding: ids ``[B, L]`` starting after BOS, padded after each row's EOS.

        ``stop_early=False`` runs all steps: sharded (FSDP) parameters are gathered in every
        forward, so all ranks must take the same number of steps.
        """
        batch = memory.shape[0]
        tokens = torch.full((batch, 1), bos_id, dtype=torch.long, device=memory.device)  # [B, 1]
        finished = torch.zeros(batch, dtype=torch.bool, device=memory.device)
        cache = self.new_cache() if use_cache else None
        for generated in range(self._steps(max_len)):
            logp = self.constrain(
                self.step(tokens, memory, memory_keep, cache), generated, finished, bos_id, eos_id, min_len
            )
            next_ids = logp.argmax(-1)  # [B]
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            finished |= next_ids == eos_id
            if stop_early and bool(finished.all()):
                break
        return tokens[:, 1:]

    @torch.no_grad()
    def beam_search(
        self,
        memory: torch.Tensor,
        bos_id: int,
        eos_id: int,
        max_len: int,
        beam: int,
        memory_keep: torch.Tensor | None = None,
        min_len: int = 0,
        alpha: float = 0.0,
        use_cache: bool = True,
        stop_early: bool = True,
    ) -> torch.Tensor:
        """Batched beam search: all ``B × beam`` hypotheses advance in one forward per step.

        Finished hypotheses stay in the beam with a frozen score (they only add padding), so the
        beam always holds the ``beam`` best-scoring prefixes; the winner is picked by score divided
        by the GNMT length penalty with exponent ``alpha``. ``beam=1`` takes the same tokens as
        :meth:`greedy`. Returns ids ``[B, L]`` after BOS, padded after EOS.
        """
        batch, width = memory.shape[0], beam
        memory = memory.repeat_interleave(width, dim=0)  # [B*K, N, D]
        if memory_keep is not None:
            memory_keep = memory_keep.repeat_interleave(width, dim=0)  # [B*K, N]
        device = memory.device
        tokens = torch.full((batch * width, 1), bos_id, dtype=torch.long, device=device)  # [B*K, 1]
        scores = torch.zeros(batch, width, device=device)  # [B, K] summed log-probs
        scores[:, 1:] = -torch.inf  # all beams start identical: expand only the first
        finished = torch.zeros(batch * width, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch * width, device=device)  # generated tokens, EOS included
        offsets = torch.arange(batch, device=device)[:, None] * width  # [B, 1]
        cache = self.new_cache() if use_cache else None
        for generated in range(self._steps(max_len)):
            logp = self.constrain(
                self.step(tokens, memory, memory_keep, cache), generated, finished, bos_id, eos_id, min_len
            )
            vocab = logp.shape[-1]
            candidates = (scores.view(-1, 1) + logp).view(batch, width * vocab)  # [B, K*V]
            scores, index = candidates.topk(width, dim=1)  # [B, K]
            origin = (offsets + index // vocab).view(-1)  # [B*K] row each new hypothesis extends
            next_ids = (index % vocab).view(-1)  # [B*K]
            tokens = torch.cat([tokens[origin], next_ids[:, None]], dim=1)
            lengths = lengths[origin] + (~finished[origin]).float()
            finished = finished[origin] | (next_ids == eos_id)
            if cache is not None:
                for layer_cache in cache:  # cross-attention keys are equal within a beam group
                    layer_cache["self_k"] = layer_cache["self_k"][origin]
                    layer_cache["self_v"] = layer_cache["self_v"][origin]
            if stop_early and bool(finished.all()):
                break
        normalised = scores / length_penalty(lengths.view(batch, width), alpha)  # [B, K]
        best = offsets.view(-1) + normalised.argmax(dim=1)  # [B]
        return tokens[best, 1:]
