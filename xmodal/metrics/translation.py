"""Paired-image metrics of a translation against its target: L1, PSNR, SSIM (torchmetrics), plus
FID/KID of the translations against the targets when given the cached feature classifier.

All on images in [0, 1] (L1 is the mean absolute pixel difference on that scale; PSNR in dB with
peak 1). Each is a per-image value averaged by a ``MeanMetric`` (a sum and a count reduced over
ranks), so 2 ranks scoring halves of a split give the 1-rank value.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from xmodal.metrics.fid import GenerativeMetrics

MAX_PSNR_DB = 100.0
"""A perfect translation scores infinite PSNR; capped so that a mean over images stays finite."""


def paired_scores(output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image L1, PSNR and SSIM ``[N]`` of ``output`` vs ``target`` ``[N, C, H, W]`` in [-1, 1]."""
    x = (output.float().clamp(-1, 1) + 1) / 2  # [N, C, H, W] in [0, 1]
    y = (target.float().clamp(-1, 1) + 1) / 2
    if x.shape[0] == 0:  # SSIM cannot take an empty batch; a rank may hold only padding rows
        empty = x.new_zeros(0)
        return {"l1": empty, "psnr": empty, "ssim": empty}
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))  # [N]
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")  # [N]
    return {"l1": (x - y).abs().flatten(1).mean(1), "psnr": psnr.clamp(max=MAX_PSNR_DB), "ssim": ssim}


class TranslationMetrics:
    """Split-level means of :func:`paired_scores`, and FID/KID when ``generative`` is given.

    A plain object, not an ``nn.Module``: the task keeps it outside its module tree so its states
    never enter checkpoints, DDP's parameter set or FSDP2's shards.
    """

    def __init__(self, generative: GenerativeMetrics | None = None):
        self.means = {name: MeanMetric() for name in ("l1", "psnr", "ssim")}
        self.generative = generative

    def to(self, device: torch.device | str) -> TranslationMetrics:
        for metric in self.means.values():
            metric.to(device)
        if self.generative is not None:
            self.generative.to(device)
        return self

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Valid rows only; called on every rank for every batch, also with no rows (each rank
        takes part in the reduction)."""
        for name, values in paired_scores(output, target).items():
            self.means[name].update(values)
        if self.generative is not None:
            self.generative.update(target, output, labels=None)

    def compute(self) -> dict[str, float]:
        """Metrics over everything updated on all ranks since the last reset (a collective call)."""
        out = {name: float(metric.compute()) for name, metric in self.means.items()}
        if self.generative is not None:
            out.update(self.generative.compute())
        return out

    def reset(self) -> None:
        for metric in self.means.values():
            metric.reset()
        if self.generative is not None:
            self.generative.reset()
