"""``model.vae.prior=conditional``: p(z|c) learnt from the condition (Sohn et al. 2015's prior network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tests.test_vae import bars_task, collate, fit, random_bars
from xmodal.config import ConfigError, compose_config, validate
from xmodal.metrics.likelihood import gaussian_kl_per_dim

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_to_a_diagonal_gaussian_prior_is_the_closed_form_of_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mu, logvar, prior_mu, prior_logvar = (torch.randn(4, 6, generator=gen) for _ in range(4))
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(prior_mu, (0.5 * prior_logvar).exp()))
    got = gaussian_kl_per_dim(mu, logvar, (prior_mu, prior_logvar))  # [4, 6]
    assert torch.allclose(got, expected, atol=1e-5)
    zeros = torch.zeros_like(mu)
    assert torch.allclose(gaussian_kl_per_dim(mu, logvar, (zeros, zeros)), gaussian_kl_per_dim(mu, logvar))


def test_a_conditional_prior_starts_as_the_standard_normal_and_adds_only_its_own_weights():
    standard, conditional = bars_task("label"), bars_task("label", prior="conditional")
    extra = set(conditional.state_dict()) - set(standard.state_dict())
    assert (
        extra
        and {k.split(".")[0] for k in extra} == {"prior"}
        and set(standard.state_dict()) < set(conditional.state_dict())
    )
    conditional.load_state_dict(standard.state_dict(), strict=False)  # same weights, prior untrained
    batch = collate(random_bars(16, 5))
    a, b = standard.eval().evaluate_batch(batch, k=4), conditional.eval().evaluate_batch(batch, k=4)
    # Equal up to float rounding: the general KL and log-density forms meet the standard ones at 0.
    assert torch.allclose(a["kl_dims"], b["kl_dims"], rtol=1e-4, atol=1e-7)
    assert torch.allclose(a["log_likelihood"], b["log_likelihood"], rtol=1e-6)


def test_the_conditional_prior_learns_where_each_labels_posteriors_lie(tmp_path: Path):
    task = bars_task("label", prior="conditional")
    metrics = fit(task, 8, tmp_path)
    task.eval()
    batch = collate(random_bars(512, 1))
    with torch.no_grad():
        cond = task.conditioning(batch)
        mu, logvar = task.encode(batch["image"], cond)  # Bernoulli bars: the encoder sees [-1, 1]
        prior_mu, prior_logvar = task.prior_params(cond)  # [B, Z] each
        to_learnt = gaussian_kl_per_dim(mu, logvar, (prior_mu, prior_logvar)).sum(1).mean()
        to_standard = gaussian_kl_per_dim(mu, logvar).sum(1).mean()
    # The learnt prior sits nearer the posteriors than N(0, I) does, and differs by label.
    assert float(to_learnt) < 0.9 * float(to_standard)
    per_label = torch.stack([prior_mu[batch["label"] == y].mean(0) for y in batch["label"].unique()])
    assert float(per_label.std(0).mean()) > 0.1
    assert metrics["val/kl"] == pytest.approx(float(to_learnt), rel=0.05)  # what the run logs is this KL


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["experiment=shapes_vae", "model.vae.prior=conditional"],
            "model.vae.prior: a conditional prior needs a condition (model.condition is none) "
            "(got 'conditional')",
        ),
        (
            ["experiment=shapes_text2image_vae", "model.vae.prior=learnt"],
            "model.vae.prior: must be one of ('standard', 'conditional') (got 'learnt')",
        ),
        (
            ["experiment=shapes_vae", "model.vae.prior_recon_weight=1"],
            "model.vae.prior_recon_weight: decodes prior draws under their condition: set model.condition "
            "(got 1.0)",
        ),
        (
            ["experiment=shapes_text2image_vae", "model.vae.prior_recon_weight=-0.5"],
            "model.vae.prior_recon_weight: must be >= 0 (0 = off) (got -0.5)",
        ),
    ],
)
def test_the_prior_setting_is_checked_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert message in [line.strip() for line in str(err.value).splitlines()]
