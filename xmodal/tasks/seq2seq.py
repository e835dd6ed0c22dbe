"""Seq2seq captioning: a modality encoder's tokens → a causal text decoder, teacher-forced.

The foundation version (image → text, greedy decoding, corpus BLEU). Beam search, audio
encoders and CIDEr arrive with the captioning issue; the batch contract stays the same.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import BLEUScore

from xmodal.data.tokenizer import WordTokenizer, normalize
from xmodal.images import SampleSet, caption_grid
from xmodal.nn.audio import LogMelEncoder
from xmodal.nn.image import ConvImageEncoder
from xmodal.nn.text import TransformerTextDecoder


def spectrogram_images(mels: torch.Tensor) -> torch.Tensor:
    """Log-mel ``[B, 1, M, T]`` → grey images ``[B, 1, M, T]`` in [-1, 1], low bands at the bottom."""
    flat = mels.flatten(1)
    low, high = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
    return ((mels - low) / (high - low).clamp(min=1e-6) * 2 - 1).flip(2)


class CaptionTask(L.LightningModule):
    """Image → text or audio → text captioner (``model.source`` picks the encoder).

    ``model`` is the ``model`` config node as a plain dict, ``vocab`` the tokenizer's vocabulary
    and ``data`` the data shape (image size and channels, mel bands and frames, text length); all
    are saved as hyperparameters, so a checkpoint alone rebuilds the captioner and its tokenizer
    (``CaptionTask.load_from_checkpoint(path)``).
    """

    def __init__(self, model: dict[str, Any], vocab: list[str], data: dict[str, int]):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = model
        self.tokenizer = WordTokenizer(vocab)
        self.source, self.target = model["source"], model["target"]
        d_model = model["d_model"]
        if self.source == "audio":
            self.encoder: nn.Module = LogMelEncoder(
                model["encoder_channels"], d_model, data["audio_mels"], data["audio_frames"]
            )
        else:
            self.encoder = ConvImageEncoder(
                model["encoder_channels"],
                d_model,
                data["image_size"],
                model["encoder_patch"],
                in_channels=data["image_channels"],
            )
        self.decoder = TransformerTextDecoder(
            vocab_size=len(vocab),
            d_model=d_model,
            layers=model["decoder_layers"],
            heads=model["heads"],
            ffn_mult=model["ffn_mult"],
            dropout=model["dropout"],
            max_len=max(data["max_text_len"], model["max_decode_len"]),
            pad_id=self.tokenizer.pad_id,
        )
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_bleu4, self.test_bleu4 = BLEUScore(n_gram=4), BLEUScore(n_gram=4)
        self.val_bleu1, self.test_bleu1 = BLEUScore(n_gram=1), BLEUScore(n_gram=1)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp2`` shard each decoder layer, the encoder and the rest (FSDP2)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        # Lightning calls this hook again for test/validate after fit: shard once.
        if self.device_mesh is None or isinstance(self.decoder, FSDPModule):
            return

        mesh = self.device_mesh["data_parallel"]
        for layer in self.decoder.layers.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.encoder, mesh=mesh)
        fully_shard(self.decoder, mesh=mesh)

    def token_losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced cross-entropy per target token ``[B, T-1]`` and its mask ``[B, T-1]``."""
        memory = self.encoder(batch[self.source])  # [B, N, D]
        tokens = batch[self.target]  # [B, T]
        logits = self.decoder(tokens[:, :-1], memory)  # [B, T-1, V]
        targets = tokens[:, 1:]  # [B, T-1]
        # Loss in fp32 from logits whatever the autocast dtype.
        losses = F.cross_entropy(
            logits.float().transpose(1, 2), targets, ignore_index=self.tokenizer.pad_id, reduction="none"
        )
        return losses, targets != self.tokenizer.pad_id

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean over real target tokens of valid rows (padding rows of exact epochs count for nothing)."""
        losses, mask = self.token_losses(batch)
        mask = mask & batch["valid"][:, None]
        return (losses * mask).sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def caption(self, source: torch.Tensor) -> list[str]:
        """Greedy captions for a batch of source tensors."""
        memory = self.encoder(source)
        ids = self.decoder.greedy(
            memory,
            self.tokenizer.bos_id,
            self.tokenizer.eos_id,
            self.cfg["max_decode_len"],
            stop_early=self.device_mesh is None,
        )
        return [self.tokenizer.decode(row.tolist()) for row in ids]

    def validation_samples(self, batch: dict[str, Any]) -> SampleSet:
        """Sources with generated captions (a grid) and a table of key, references and caption."""
        source = batch[self.source]
        captions = self.caption(source.to(self.device))
        # A spectrogram shows as a grey image (mel bands upwards), scaled to [-1, 1] per clip.
        shown = source if self.source == "image" else spectrogram_images(source)
        rows = [
            [key, " / ".join(refs), hyp]
            for key, refs, hyp in zip(batch["__key__"], batch["captions"], captions, strict=True)
        ]
        return SampleSet({"val": caption_grid(shown, captions)}, ["key", "references", "generated"], rows)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["valid"].sum().clamp(min=1)))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        valid = batch["valid"]  # [B] False on padding rows
        losses, mask = self.token_losses(batch)
        # A token mean over the whole split, synced as (sum, count): exact for any rank count.
        mean_loss = getattr(self, f"{stage}_loss")
        mean_loss.update(losses[mask & valid[:, None]])
        self.log(f"{stage}/loss", mean_loss)
        hypotheses = self.caption(batch[self.source])
        refs = [[" ".join(normalize(r)) for r in refs] for refs in batch["captions"]]
        keep = valid.tolist()
        hypotheses = [h for h, k in zip(hypotheses, keep, strict=True) if k]
        refs = [r for r, k in zip(refs, keep, strict=True) if k]
        bleu4, bleu1 = getattr(self, f"{stage}_bleu4"), getattr(self, f"{stage}_bleu1")
        bleu4.update(hypotheses, refs)
        bleu1.update(hypotheses, refs)
        self.log(f"{stage}/bleu4", bleu4, prog_bar=True)
        self.log(f"{stage}/bleu1", bleu1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.cfg["lr"], weight_decay=self.cfg["weight_decay"], betas=(0.9, 0.98)
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.cfg["warmup_steps"], max(total // 10, 1))

        def schedule(step: int) -> float:
            # Linear warm-up, then cosine decay to 10 % of the peak rate at the last step.
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
