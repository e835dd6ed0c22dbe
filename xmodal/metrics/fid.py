"""FID, KID and conditional accuracy of generated images, offline, exact over ranks.

torchmetrics keeps FID as summed moments and KID as feature lists, both reduced over ranks at
``compute()``, so 2 ranks scoring halves of the validation split give the 1-rank value (up to the
order of float64 sums). The feature extractor is the cached domain classifier of
:mod:`xmodal.metrics.features` or, given a weights file, torch-fidelity's InceptionV3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from xmodal.metrics.features import DomainClassifier
from xmodal.metrics.judge import JudgeScore
from xmodal.metrics.provenance import FAMILIES, scorer_record


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 (2048-d pool features) from a local weights file: no download.

    Takes our ``[-1, 1]`` images (grey ones repeated to RGB) and hands Inception ``[0, 1]`` floats.
    """

    def __init__(self, weights_path: str):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as err:  # pragma: no cover - depends on the optional extra
            raise ImportError(
                "model.gan.inception_weights needs torch-fidelity (pip install torch-fidelity)"
            ) from err
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
        )
        self.num_features = 2048
        self.weights_path = str(weights_path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2  # [B, C, H, W] in [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x * 255).byte()).float()  # [B, 2048]


def feature_spread(total: torch.Tensor, outer_total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Trace of the feature covariance from FID's running sums (Σx ``[F]``, Σxxᵀ ``[F, F]``, n)."""
    n = n.double()
    mean = total.double() / n  # [F]
    return (torch.trace(outer_total.double()) - n * mean.dot(mean)) / (n - 1).clamp(min=1)


class SpreadFID(FrechetInceptionDistance):
    """FID that also measures how far generated features spread compared with real ones
    (``spread_ratio``: trace of the fake covariance / trace of the real one), from the same running
    sums inside ``compute()``, where torchmetrics has them reduced over ranks: exact for any rank
    count, no second pass over the features. ~1 for a healthy generator, ~0 when it collapsed."""

    spread_ratio: float = math.nan

    def compute(self) -> torch.Tensor:
        real = feature_spread(
            self.real_features_sum, self.real_features_cov_sum, self.real_features_num_samples
        )
        fake = feature_spread(
            self.fake_features_sum, self.fake_features_cov_sum, self.fake_features_num_samples
        )
        self.spread_ratio = float(fake / real) if float(real) > 0 else math.nan
        return super().compute()


class PixelSpread(Metric):
    """Trace of the pixel covariance of images ``[N, C, H, W]`` (summed per-pixel variance), from
    running sums reduced over ranks: exact for any rank count. The collapse check's second
    opinion: a weak feature net can map varied images to one point (measured: 64 px shapes, samples
    at different places and colours spread 0.05× in its features, 0.53× in pixels), but samples
    that are nearly identical are so in pixels too."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        # Per-pixel sums: sized at the first update (every rank updates, even with no rows).
        self.add_state("total", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor) -> None:
        flat = images.detach().flatten(1).double()  # [N, C·H·W]
        if self.total.numel() == 0:
            self.total = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
        self.total += flat.sum(0)
        self.squares += flat.pow(2).sum()
        self.count += flat.shape[0]

    def compute(self) -> torch.Tensor:
        if self.count < 2:
            return torch.tensor(math.nan, dtype=torch.float64)
        mean = self.total / self.count  # [C·H·W]
        return (self.squares - self.count * mean.dot(mean)) / (self.count - 1)


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def pixel_roughness(images: torch.Tensor) -> torch.Tensor:
    """Mean |4-neighbour Laplacian| per image ``[N, C, H, W]`` → ``[N]``: high where pixels jump
    from their neighbours everywhere (noise), low on flat regions with few edges (drawn shapes)."""
    channels = images.shape[1]
    kernel = LAPLACIAN.to(images.device, images.dtype).view(1, 1, 3, 3).repeat(channels, 1, 1, 1)
    return F.conv2d(images, kernel, groups=channels).abs().flatten(1).mean(1)


class GenerativeMetrics:
    """FID + KID between real and generated images, and the classifier's accuracy on generated
    images against the labels of the rows whose conditions made them.

    A plain object, not an ``nn.Module``: the task keeps it outside its module tree so neither the
    feature extractor nor the metric states enter checkpoints, DDP's parameter set or FSDP2's shards.
    """

    def __init__(
        self,
        classifier: DomainClassifier,
        features: nn.Module | None = None,
        conditional: bool = False,
        kid_subset_size: int = 100,
        judge: nn.Module | None = None,
        attribute_judges: dict[str, nn.Module] | None = None,
    ):
        features = features if features is not None else classifier
        self.classifier = classifier.eval().requires_grad_(False)
        # The independent judges (xmodal/metrics/judge.py): conditional accuracy by nets that are
        # not the FID feature space, so the generator cannot have been graded by what it was fit
        # to. ``judge`` reads the class label; ``attribute_judges`` other label roles (colour).
        self.judges = [JudgeScore(judge)] if judge is not None else []
        self.judges += [JudgeScore(net, role) for role, net in (attribute_judges or {}).items()]
        self.conditional = conditional
        self.fid = SpreadFID(feature=features, reset_real_features=True)
        self.kid = KernelInceptionDistance(
            feature=features, subset_size=kid_subset_size, reset_real_features=True
        )
        self.kid_subset_size = kid_subset_size
        self.cond_acc = MeanMetric()
        self.real_acc = MeanMetric()
        # Pixel roughness of generated / real images (sample_roughness): noise that fools the
        # small classifiers behind FID and the judges shows here, in pixels, whatever they read.
        self.real_roughness = MeanMetric()
        self.fake_roughness = MeanMetric()
        # Pixel spread of generated / real images (sample_pixel_spread): collapse's second opinion.
        self.real_pixels = PixelSpread()
        self.fake_pixels = PixelSpread()
        self.features = features
        # Rows behind the last compute(), over all ranks: (real, generated) for FID and each judge.
        self.counts: dict[str, tuple[int, int]] = {"features": (0, 0)}
        self.counts.update({j.family: (0, 0) for j in self.judges})

    @property
    def judge(self) -> nn.Module | None:
        """The class label's judge net (None without one)."""
        return next((j.net for j in self.judges if j.label_role == "label"), None)

    def to(self, device: torch.device | str) -> GenerativeMetrics:
        for metric in self._metrics():
            metric.to(device)
        self.classifier.to(device)
        for judge in self.judges:
            judge.to(device)
        return self

    def _metrics(self) -> tuple[Metric, ...]:
        return (
            self.fid,
            self.kid,
            self.cond_acc,
            self.real_acc,
            self.real_roughness,
            self.fake_roughness,
            self.real_pixels,
            self.fake_pixels,
        )

    @torch.no_grad()
    def update(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        labels: torch.Tensor | None,
        attributes: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """``real``/``fake`` ``[N, C, H, W]`` in [-1, 1] (valid rows only); ``labels`` ``[N]`` (-1 = none);
        ``attributes``: the other judges' labels by role, ``[N]`` each (a missing role: none known)."""
        # Also with no rows (a rank may hold only padding rows): torchmetrics needs one update per rank.
        real, fake = real.float(), fake.float()
        self.fid.update(real, real=True)
        self.fid.update(fake, real=False)
        self.kid.update(real, real=True)
        self.kid.update(fake, real=False)
        if real.dim() == 4 and real.shape[-1] >= 3 and real.shape[-2] >= 3:  # images, not points
            self.real_roughness.update(pixel_roughness(real))
            self.fake_roughness.update(pixel_roughness(fake))
            self.real_pixels.update(real)
            self.fake_pixels.update(fake)
        if labels is not None:
            # Updated on every rank, even with no rows, so every rank takes part in the reduction.
            known = labels >= 0  # [N]
            hits_real = self.classifier.classify(real[known]).argmax(1) == labels[known]
            self.real_acc.update(hits_real.float())
            if self.conditional:
                hits = self.classifier.classify(fake[known]).argmax(1) == labels[known]
                self.cond_acc.update(hits.float())
        for judge in self.judges:
            # Updated on every rank, even with no rows or labels, so every rank takes part in the reduction.
            role_labels = labels if judge.label_role == "label" else (attributes or {}).get(judge.label_role)
            if role_labels is None:
                role_labels = torch.full((len(real),), -1, dtype=torch.long, device=real.device)
            judge.update(real, fake if self.conditional else None, role_labels)

    def compute(self) -> dict[str, float]:
        """Metrics over everything updated on all ranks since the last reset (a collective call)."""
        out: dict[str, float] = {}
        # Sample counts over all ranks (generated, real; the judge's generated, real): every rank
        # takes the same branch, and the provenance records how many rows each score saw.
        fid = self.fid
        device = fid.fake_features_num_samples.device
        counts = torch.cat(
            [
                torch.stack(
                    [
                        fid.real_features_num_samples.detach().double(),
                        fid.fake_features_num_samples.detach().double(),
                    ]
                ),
                *(judge.weights().to(device) for judge in self.judges),
            ]
        )  # [2 + 2 × judges]: (real, generated) per family
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        pairs = [(int(round(float(r))), int(round(float(g)))) for r, g in counts.view(-1, 2)]
        self.counts = {"features": pairs[0]}
        self.counts.update({judge.family: pair for judge, pair in zip(self.judges, pairs[1:], strict=True)})
        n_real, n_all = pairs[0]
        if n_all >= 2:
            out["fid"] = float(self.fid.compute())
            # KID's subsets must not be larger than the sample.
            self.kid.subset_size = min(self.kid_subset_size, n_all)
            out["kid"] = float(self.kid.compute()[0])
            out["sample_spread"] = self.fid.spread_ratio
        else:
            out["fid"] = out["kid"] = math.nan
        if self.real_roughness.update_called:  # alike on every rank: the same shapes were scored
            real_rough, fake_rough = (
                float(self.real_roughness.compute()),
                float(self.fake_roughness.compute()),
            )
            if real_rough > 0 and not math.isnan(fake_rough):
                out["sample_roughness"] = fake_rough / real_rough
            real_spread, fake_spread = float(self.real_pixels.compute()), float(self.fake_pixels.compute())
            if real_spread > 0 and not math.isnan(fake_spread):
                out["sample_pixel_spread"] = fake_spread / real_spread
        real_acc = float(self.real_acc.compute())
        if not math.isnan(real_acc):
            out["real_acc"] = real_acc
        if self.conditional:
            out["cond_acc"] = float(self.cond_acc.compute())
        for judge in self.judges:
            out.update(judge.results(self.conditional))
        return out

    def reset(self) -> None:
        for metric in self._metrics():
            metric.reset()
        for judge in self.judges:
            judge.reset()

    def provenance(self, split: str, image_size: int | None, image_fit: str | None) -> dict[str, dict]:
        """Per family (``features``; ``judge`` with one): what the last :meth:`compute` scored with
        (:mod:`xmodal.metrics.provenance`): the net and its weights' hash, the image size and fit,
        ``split`` as the reference set, and the rows counted over all ranks."""
        names = [m for m in FAMILIES["features"] if m != "cond_acc" or self.conditional]
        real, fake = self.counts["features"]
        weights = getattr(self.features, "weights_path", None)
        out = {
            "features": scorer_record(self.features, names, split, real, fake, image_size, image_fit, weights)
        }
        for judge in self.judges:
            real, fake = self.counts[judge.family]
            out[judge.family] = judge.record(split, real, fake, image_size, image_fit, self.conditional)
        return out
