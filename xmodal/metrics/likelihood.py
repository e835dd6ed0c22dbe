"""Log-likelihoods, KL terms, the IWAE bound and active units for latent-variable models.

Every log-probability is *per sample*: summed over all data (or latent) dimensions, shape ``[B]``,
so an ELBO is in nats per example (the unit of the VAE literature, e.g. 86.76 nats on binarised
MNIST in Burda et al. 2015) and a mean over the batch is taken only at the very end. All functions
compute in fp32 whatever the autocast dtype of their inputs (bf16 log-probs summed over 1,024+
pixels lose whole nats).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric

LOG_2PI = math.log(2 * math.pi)


def _per_sample(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, ...]`` → ``[B]`` sum over every non-batch dimension, counting only entries where
    ``mask`` (broadcastable to ``values``) is True: padding then costs nothing, whatever it holds
    (``where``, not a product, so even an inf/NaN there cannot leak into the sum)."""
    if mask is not None:
        values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values.flatten(1).sum(1)


def bernoulli_log_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(targets | sigmoid(logits)) per sample ``[B]``; from logits (autocast-safe,
    unlike ``F.binary_cross_entropy`` which refuses autocast)."""
    nll = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return -_per_sample(nll)


def gaussian_log_prob(
    mean: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log N(x | mean, exp(log_scale)²) per sample ``[B]`` (a density: continuous data), summed
    over the entries where ``mask`` (broadcastable to ``x``, e.g. real audio frames) is True."""
    mean, log_scale, x = mean.float(), log_scale.float(), x.float()
    z = (x - mean) * torch.exp(-log_scale)
    return _per_sample(-0.5 * z * z - log_scale - 0.5 * LOG_2PI, mask)


def laplace_log_prob(
    loc: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log Laplace(x | loc, exp(log_scale)) per sample ``[B]`` (a density), over ``mask`` like
    :func:`gaussian_log_prob`."""
    loc, log_scale, x = loc.float(), log_scale.float(), x.float()
    return _per_sample(-(x - loc).abs() * torch.exp(-log_scale) - log_scale - math.log(2.0), mask)


def discretized_logistic_log_prob(
    mean: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor, bins: int = 256
) -> torch.Tensor:
    """log P(x) per sample ``[B]`` for x in [-1, 1] quantised to ``bins`` levels (PixelCNN++ with
    one mixture component): the logistic's mass over each level's bin, the edge bins open-ended.

    A probability (not a density), so its bits/dim compare directly with other discrete models.
    """
    mean, log_scale, x = mean.float(), log_scale.float(), x.float()
    half_bin = 1.0 / (bins - 1)  # bins span [-1, 1] in steps of 2 / (bins - 1)
    inv_s = torch.exp(-log_scale)
    centred = x - mean
    plus = inv_s * (centred + half_bin)
    minus = inv_s * (centred - half_bin)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus), for the lowest bin
    log_one_minus_cdf_minus = -F.softplus(minus)  # log(1 - sigmoid(minus)), for the highest bin
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    # Where the bin mass underflows, use the density at the centre times the bin width.
    mid = inv_s * centred
    log_pdf_mid = mid - log_scale - 2.0 * F.softplus(mid)
    log_mass = torch.where(
        cdf_delta > 1e-5,
        torch.log(cdf_delta.clamp(min=1e-12)),
        log_pdf_mid + math.log(2 * half_bin),
    )
    log_probs = torch.where(
        x < -1 + 1e-3, log_cdf_plus, torch.where(x > 1 - 1e-3, log_one_minus_cdf_minus, log_mass)
    )
    return _per_sample(log_probs)


def gaussian_kl_per_dim(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || p) per latent dimension ``[B, Z]``, in nats (closed form); p is
    N(0, I), or the diagonal Gaussian ``prior`` = (mean, log variance) ``[B, Z]`` each."""
    mu, logvar = mu.float(), logvar.float()
    if prior is None:
        return 0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar)
    prior_mu, prior_logvar = prior[0].float(), prior[1].float()
    return 0.5 * (
        prior_logvar - logvar + (torch.exp(logvar) + (mu - prior_mu) ** 2) * torch.exp(-prior_logvar) - 1.0
    )


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z | mu, diag exp(logvar)) summed over the last dimension: ``[..., Z]`` → ``[...]``."""
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    return (-0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z | 0, I) summed over the last dimension: ``[..., Z]`` → ``[...]``."""
    z = z.float()
    return (-0.5 * (z * z + LOG_2PI)).sum(-1)


def iwae_log_likelihood(log_weights: torch.Tensor) -> torch.Tensor:
    """The IWAE lower bound on log p(x) from ``log_weights [K, B]`` = log p(x,z_k) − log q(z_k|x):
    logsumexp over K minus log K, ``[B]``. K=1 is the ELBO; the bound tightens as K grows."""
    k = log_weights.shape[0]
    return torch.logsumexp(log_weights.double(), dim=0).float() - math.log(k)


def bits_per_dim(nats: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Nats per sample → bits per data dimension."""
    return nats / (dims * math.log(2.0))


class ActiveUnits(Metric):
    """Active latent units (Burda et al. 2015): dimension u is active when Cov_x(E_q[z_u|x]) > 10⁻².

    Keeps Σμ, Σμ² and N in float64 with sum reduction, so the variance over a split is the same
    on any number of ranks. ``compute`` returns the count; :meth:`variances` the per-unit values.
    """

    full_state_update = False

    def __init__(self, dims: int, threshold: float = 1e-2, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("total", torch.zeros(dims, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", torch.zeros(dims, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, posterior_means: torch.Tensor) -> None:
        mu = posterior_means.detach().double()  # [N, Z]
        self.total += mu.sum(0)
        self.squares += (mu * mu).sum(0)
        self.count += mu.shape[0]

    def variances(self) -> torch.Tensor:
        n = self.count.clamp(min=1)
        mean = self.total / n
        return (self.squares / n - mean * mean).clamp(min=0)  # [Z], population variance

    def compute(self) -> torch.Tensor:
        return (self.variances() > self.threshold).sum().float()
