"""Collapse checks on an evaluation pass's figures: a console warning that says what to try.

A collapsed model still logs plausible losses: a captioner that writes one caption for every image,
a VAE whose posterior ignores the input (no active latent unit), a GAN whose samples are all one
image, a GAN whose "samples" are high-frequency noise that its metrics' small classifiers read
kindly. Each rule reads figures the task computed over the whole split (reduced over ranks, so every
rank decides alike) and returns a one-line warning; ``warn_if_collapsed`` logs them on rank zero.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("xmodal")

MIN_CAPTION_SPREAD = 0.2
"""Collapse when the distinct generated captions are fewer than this share of the distinct first
references (and fewer than 2 of them at all); a healthy greedy captioner writes one phrasing per
scene kind, e.g. 10 on MNIST where the references hold 30."""
MIN_FEATURE_SPREAD = 0.1
"""Collapse when generated images spread less than this share of the real images' spread
(trace of the feature covariance, in the FID feature space)."""

MIN_PIXEL_SPREAD = 0.1
"""... and, where measured (images), less than this share in pixels too: varied samples that a weak
feature net maps to one point are not collapse (BENCHMARKS.md "Collapse warnings")."""

MAX_ROUGHNESS = 2.5
"""Noise when generated images' mean |Laplacian| is more than this many times the real images'.
Measured on shapes (32 px): 4.0 for a generator that learnt to draw adversarial high-frequency
patterns for the class head, against ~1 for one that draws shapes (BENCHMARKS.md)."""


def caption_collapse(values: Mapping[str, float]) -> str | None:
    generated, references = values.get("distinct_captions"), values.get("distinct_references")
    if generated is None or references is None or references < 2:
        return None
    if generated >= max(2.0, MIN_CAPTION_SPREAD * references):
        return None
    return (
        f"captioner collapse: {generated:.0f} distinct caption(s) for inputs whose references hold "
        f"{references:.0f}; it ignores its input. Try: check the inputs differ (xmodal-shards inspect), "
        "train longer, lower model.lr, raise model.dropout, or more / more varied data"
    )


def posterior_collapse(values: Mapping[str, float]) -> str | None:
    active = values.get("active_units")
    if active is None or math.isnan(active) or active > 0:
        return None
    return (
        "VAE posterior collapse: 0 active latent units (the decoder ignores z, samples look alike). "
        "Try: model.vae.kl_warmup_steps (e.g. 2000), model.vae.free_bits (e.g. 0.5), a lower model.vae.beta"
    )


def sample_collapse(values: Mapping[str, float]) -> str | None:
    spread = values.get("sample_spread")
    if spread is None or math.isnan(spread) or spread >= MIN_FEATURE_SPREAD:
        return None
    pixels = values.get("sample_pixel_spread")
    if pixels is not None and not math.isnan(pixels) and pixels >= MIN_PIXEL_SPREAD:
        return None
    in_pixels = "" if pixels is None or math.isnan(pixels) else f" and {pixels:.2g}x in pixels"
    return (
        f"GAN mode collapse: generated images spread {spread:.2g}x as much as real ones in feature "
        f"space{in_pixels} (all samples nearly identical). Try: lower model.gan.g_lr, model.gan.r1_weight (e.g. 1), "
        "model.gan.n_critic 2, or resume from an earlier checkpoint"
    )


def noise_samples(values: Mapping[str, float]) -> str | None:
    roughness = values.get("sample_roughness")
    if roughness is None or math.isnan(roughness) or roughness <= MAX_ROUGHNESS:
        return None
    return (
        f"GAN samples are noise: {roughness:.1f}x as rough as real images in pixels (high-frequency "
        "patterns, not drawn content; they can fool the classifiers behind FID and the judges, so "
        "read those figures with care). Try: a lower model.gan.aux_weight or model.gan.aux_warmup_steps=0, "
        "model.gan.diffaugment=[translation,cutout], or an earlier checkpoint"
    )


RULES = (caption_collapse, posterior_collapse, sample_collapse, noise_samples)


def collapse_warnings(values: Mapping[str, float]) -> list[str]:
    """The warnings ``values`` (one split's figures, names without the stage prefix) call for."""
    return [message for rule in RULES if (message := rule(values)) is not None]


def warn_if_collapsed(task: Any, stage: str, values: Mapping[str, float]) -> list[str]:
    """Log each collapse warning once (rank zero) naming the stage and step; returns them (all ranks)."""
    trainer = getattr(task, "_trainer", None)
    if trainer is not None and trainer.sanity_checking:
        return []  # the sanity pass scores an untrained model: collapsed by construction
    messages = collapse_warnings(values)
    if getattr(task, "global_rank", 0) == 0:
        step = getattr(task, "sample_step", None)
        where = f"{stage} at step {step}" if step is not None else stage
        for message in messages:
            log.warning("%s: %s", where, message)
    return messages
