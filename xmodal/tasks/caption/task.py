"""Seq2seq captioning: a modality encoder's tokens → a causal text decoder, teacher-forced.

Image → text (conv patches) or audio → text (log-mel time tokens, padded frames masked out of
cross-attention). Decoding is greedy or batched beam search with a key/value cache (config:
``model.beam_size``, ``length_penalty``, ``min_decode_len``, ``max_decode_len``), used at validation
and test. Caption metrics (BLEU-1..4, CIDEr-D, ROUGE-L; xmodal.metrics.caption) are corpus
metrics: each rank keeps its valid rows' hypotheses and references, they are gathered once per
evaluation and scored on every rank over the whole split, so 2 ranks report what 1 rank does.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from xmodal.images import SampleSet, animated_grids, caption_grid
from xmodal.metrics.caption import caption_scores, caption_spread, metric_tokens
from xmodal.metrics.collapse import warn_if_collapsed
from xmodal.modalities.roles import modality_of
from xmodal.nn.audio import LogMelEncoder
from xmodal.nn.image import ConvImageEncoder, FactorizedImageEncoder
from xmodal.nn.slots import build_slot
from xmodal.nn.text import TransformerTextDecoder
from xmodal.nn.video import VideoEncoder
from xmodal.tasks.base import GenerateError, XmodalTask, to_device, trainable
from xmodal.tasks.caption.config import CaptionConfig
from xmodal.tasks.caption.parallelize import parallelize_caption
from xmodal.tasks.generation import flag_of, only_inputs, role_inputs
from xmodal.tasks.schedule import with_warmup_cosine

DECODING_OPTIONS = ("beam_size", "length_penalty", "min_decode_len", "max_decode_len", "decode_cache")


class CaptionTask(XmodalTask):
    """Image → text or audio → text captioner (``model.source`` picks the encoder).

    ``model`` is the ``model`` config node as a plain dict (typed as :class:`CaptionConfig`),
    ``tokenizer`` the tokenizer's state (xmodal/tokenizers/base.py) and ``data`` the data shape; all
    are saved as hyperparameters, so a checkpoint alone rebuilds the captioner and its tokenizer
    (``CaptionTask.load_from_checkpoint(path)``), including nets given by ``_target_``. ``vocab``:
    what checkpoints written before tokenizer plug-ins hold instead of ``tokenizer`` (a word
    vocabulary); they load, and are saved again with the state.
    """

    config_class = CaptionConfig
    tests_holdout = True
    compiled_nets = ("encoder", "decoder")

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        *,
        vocab: list[str] | None = None,
    ):
        super().__init__()
        self.save_task_hyperparameters(tokenizer, vocab, data)
        self.cfg = cfg = CaptionConfig.from_node(model)
        self.source, self.target = cfg.source, cfg.target
        self.encoder: nn.Module = build_slot(cfg.encoder, lambda: self.default_encoder(cfg, data))
        self.decoder = build_slot(
            cfg.decoder,
            lambda: TransformerTextDecoder(
                vocab_size=len(self.tokenizer),
                d_model=cfg.d_model,
                layers=cfg.decoder_layers,
                heads=cfg.heads,
                ffn_mult=cfg.ffn_mult,
                dropout=cfg.dropout,
                max_len=max(data["max_text_len"], cfg.max_decode_len),
                pad_id=self.tokenizer.pad_id,
                activation_checkpointing=cfg.activation_checkpointing,
            ),
        )
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        # (key, hypothesis, references) of this rank's valid rows in the running evaluation.
        self.eval_rows: list[tuple[str, str, list[str]]] = []
        self.scored = False  # this evaluation's caption metrics are logged

    @staticmethod
    def default_encoder(cfg: CaptionConfig, data: dict[str, Any]) -> nn.Module:
        """The built-in encoder of the source's modality (conv stages on pixels, log-mels or clips)."""
        if modality_of(cfg.source, data.get("roles")).name == "audio":
            return LogMelEncoder(
                cfg.encoder_channels,
                cfg.d_model,
                data["audio_mels"],
                data["audio_frames"],
                patch=cfg.audio_patch,
            )
        if modality_of(cfg.source, data.get("roles")).name == "video":
            return VideoEncoder(
                cfg.encoder_channels,
                cfg.d_model,
                data["video_size"],
                data["video_frames"],
                cfg.encoder_patch,
                in_channels=data["image_channels"],
            )
        image_encoder = FactorizedImageEncoder if cfg.image_encoder == "factorized" else ConvImageEncoder
        return image_encoder(
            cfg.encoder_channels,
            cfg.d_model,
            data["image_size"],
            cfg.encoder_patch,
            in_channels=data["image_channels"],
        )

    def parallelize(self, mesh: Any) -> None:
        parallelize_caption(self, mesh)

    def memory(
        self, source: torch.Tensor, source_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder tokens ``[B, N, D]`` and which are real ``[B, N]`` (None: all; audio padding is not)."""
        memory = self.encoder(source)  # [B, N, D]
        if source_mask is not None and hasattr(self.encoder, "token_mask"):  # audio padding
            return memory, self.encoder.token_mask(source_mask.to(memory.device))  # [B, N]
        return memory, None

    def token_losses(
        self, batch: dict[str, Any], label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced cross-entropy per target token ``[B, T-1]`` and its mask ``[B, T-1]``."""
        memory, keep = self.memory(batch[self.source], batch.get(f"{self.source}_mask"))
        tokens = batch[self.target]  # [B, T]
        logits = self.decoder(self.drop_input_tokens(tokens[:, :-1]), memory, keep)  # [B, T-1, V]
        targets = tokens[:, 1:]  # [B, T-1]
        # Loss in fp32 from logits whatever the autocast dtype.
        losses = F.cross_entropy(
            logits.float().transpose(1, 2),
            targets,
            ignore_index=self.tokenizer.pad_id,
            reduction="none",
            label_smoothing=label_smoothing,
        )
        return losses, targets != self.tokenizer.pad_id

    def drop_input_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced inputs ``[B, T]`` with words replaced by ``<unk>`` at rate ``model.token_dropout``.

        Word dropout (Bowman et al. 2016) while training only: with the previous words sometimes
        hidden, the decoder must read each word from the source instead of from the words before
        it (meant for unseen attribute pairs; on the shapes compositional split it did not help,
        see BENCHMARKS.md). The mask comes from a generator seeded by (seed, rank, step): a resumed
        run drops the same words.
        """
        rate = self.cfg.token_dropout
        if not self.training or rate == 0.0:
            return inputs
        gen = torch.Generator().manual_seed(
            zlib.crc32(f"{self.run_seed}:{self.global_rank}:{self.global_step}".encode())
        )
        drop = torch.rand(inputs.shape, generator=gen).to(inputs.device) < rate  # [B, T]
        drop[:, 0] = False  # BOS stays: it starts every caption
        drop &= inputs != self.tokenizer.pad_id
        return inputs.masked_fill(drop, self.tokenizer.unk_id)

    def loss(self, batch: dict[str, Any], label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean over real target tokens of valid rows (padding rows of exact epochs count for nothing)."""
        losses, mask = self.token_losses(batch, label_smoothing)
        mask = mask & batch["valid"][:, None]
        return (losses * mask).sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def generate_ids(
        self, source: torch.Tensor, source_mask: torch.Tensor | None = None, **options: Any
    ) -> torch.Tensor:
        """Caption ids ``[B, L]`` (after BOS, padded after EOS) with the config's decoding options;
        ``options`` override them (``beam_size``, ``length_penalty``, ``min_decode_len``,
        ``max_decode_len``, ``decode_cache``)."""
        cfg = {**{k: getattr(self.cfg, k) for k in DECODING_OPTIONS}, **options}
        memory, keep = self.memory(source, source_mask)
        common = {
            "bos_id": self.tokenizer.bos_id,
            "eos_id": self.tokenizer.eos_id,
            "max_len": cfg["max_decode_len"],
            "memory_keep": keep,
            "min_len": cfg["min_decode_len"],
            "use_cache": cfg["decode_cache"],
            # Sharded (FSDP2) ranks must all run the same number of steps.
            "stop_early": self.device_mesh is None,
        }
        with self.eager_nets():  # a compiled decoder would recompile for each cache length
            if cfg["beam_size"] == 1:
                return self.decoder.greedy(memory, **common)
            return self.decoder.beam_search(
                memory, beam=cfg["beam_size"], alpha=cfg["length_penalty"], **common
            )

    @torch.no_grad()
    def caption(
        self, source: torch.Tensor, source_mask: torch.Tensor | None = None, **options: Any
    ) -> list[str]:
        """Captions for a batch of sources (``source_mask [B, T]``: real audio frames)."""
        ids = self.generate_ids(source, source_mask, **options)
        return [self.tokenizer.decode(row.tolist()) for row in ids]

    def validation_samples(self, batch: dict[str, Any]) -> SampleSet:
        """Sources with generated captions (a grid) and a table of key, references and caption."""
        source = batch[self.source]
        captions = self.caption(source.to(self.device), batch.get(f"{self.source}_mask"))
        modality = modality_of(self.source, self.hparams.data.get("roles"))
        rows = [
            [key, " / ".join(refs), hyp]
            for key, refs, hyp in zip(batch["__key__"], batch["captions"], captions, strict=True)
        ]
        samples = SampleSet(
            {"val": caption_grid(modality.show(source), captions)}, ["key", "references", "generated"], rows
        )
        clips = modality.animate(source)  # [B, T, C, H, W] for a source with time (video), else None
        if clips is not None:
            samples.animations["val"] = animated_grids(clips, lambda frames: caption_grid(frames, captions))
        return samples

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss = self.loss(batch, self.cfg.label_smoothing)
        rows = int(batch["valid"].sum().clamp(min=1))
        self.log_train_scalars({"train/loss": loss}, rows, prog_bar=("train/loss",))
        return self.finite_or_skip(loss)

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        valid = batch["valid"]  # [B] False on padding rows
        # Plain NLL (no label smoothing): comparable across configs.
        losses, mask = self.token_losses(batch)
        # A token mean over the whole split, synced as (sum, count): exact for any rank count.
        mean_loss = self.val_loss if stage == "val" else self.test_loss
        mean_loss.update(losses[mask & valid[:, None]])
        self.log(f"{stage}/loss", mean_loss, batch_size=len(valid))
        hypotheses = self.caption(batch[self.source], batch.get(f"{self.source}_mask"))
        for key, hyp, refs, keep in zip(
            batch["__key__"], hypotheses, batch["captions"], valid.tolist(), strict=True
        ):
            if keep:
                # Both sides in the metrics' units, whatever the model's tokenizer (CJK: characters).
                self.eval_rows.append((str(key), metric_tokens(hyp), [metric_tokens(r) for r in refs]))
        if self.is_last_eval_batch(batch_idx):
            self._log_caption_metrics(stage)

    def _log_caption_metrics(self, stage: str) -> None:
        """Score every valid row of the split, gathered from all ranks, once; every rank logs the same."""
        rows = self.eval_rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        rows = sorted(rows)  # the same order whatever the rank count: bit-identical sums
        self.eval_rows = []
        self.scored = True
        hypotheses, references = [hyp for _, hyp, _ in rows], [refs for _, _, refs in rows]
        scores = caption_scores(hypotheses, references) | caption_spread(hypotheses, references)
        warn_if_collapsed(self, stage, scores)
        for name, value in scores.items():
            # One value per split, logged once: batch_size=1 spares Lightning guessing from the batch.
            self.log(f"{stage}/{name}", value, prog_bar=name in ("bleu4", "cider"), batch_size=1)

    def on_validation_epoch_start(self) -> None:
        self.eval_rows, self.scored = [], False

    def on_test_epoch_start(self) -> None:
        self.eval_rows, self.scored = [], False

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        if not self.scored:  # a loader of unknown length
            self._log_caption_metrics("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, self.test_prefix)

    def on_test_epoch_end(self) -> None:
        if not self.scored:
            self._log_caption_metrics(self.test_prefix)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            trainable(self), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.98)
        )
        return with_warmup_cosine(
            optimizer, int(self.trainer.estimated_stepping_batches), self.cfg.warmup_steps
        )

    # ----------------------------------------------------------------- xmodal-generate
    def generate_outputs(self, inputs: dict[str, list[Any]], args: Any) -> list[dict[str, str]]:
        """One caption per input of the source's modality (``--image FILE …``, ``--audio FILE …``)."""
        modality = modality_of(self.source, self.hparams.data.get("roles"))
        given = [name for name, values in inputs.items() if values]
        if not given:
            raise GenerateError(f"{args.ckpt} is a captioner: give {flag_of(modality)} FILE …")
        if modality.name not in given:
            raise GenerateError(
                f"{args.ckpt} captions {modality.name}, not {given[0]}: use {flag_of(modality)}"
            )
        only_inputs(args.ckpt, inputs, modality.name, f"a {modality.name} captioner")
        values = inputs[modality.name]
        batch = to_device(role_inputs(self, self.source, values), self.device)
        captions = self.caption(batch[self.source], batch.get(f"{self.source}_mask"))
        return [
            {modality.name: str(value), "caption": caption}
            for value, caption in zip(values, captions, strict=True)
        ]
