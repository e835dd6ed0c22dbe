"""``model.fusion`` on the conditional VAE's 2-D decoder: concat (as it was), FiLM, cross-attention.

concat keeps the decoder's parameters and numbers; film and cross_attention start as the
unconditional decoder (zero output layers) and learn to read the caption in a few steps of a tiny
text → image VAE; cross-attention never reads caption padding; bad choices are one config line.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from tests.test_fusion import (
    BLUE,
    DATA,
    RED,
    VOCAB,
    ColourCaptions,
    assert_decoder_never_reads_caption_padding,
    captions,
)
from tests.test_vae import vae_model
from xmodal.config import compose_config
from xmodal.config.validate import config_problems
from xmodal.nn.condition import Encoded, TextCondition, encode_condition
from xmodal.nn.vae import ConvDecoder
from xmodal.tasks.gan.config import GanModelConfig
from xmodal.tasks.vae.task import VaeTask

PLAIN_KEYS = {
    *(f"stem.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
    *(f"body.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")),
    "out.weight",
    "out.bias",
}
"""The 32 px decoder's state_dict before ``model.fusion`` (3 upsampling blocks)."""


pytestmark = pytest.mark.usefixtures("one_thread")


def decoder(fusion: str, cond_dim: int = 16) -> ConvDecoder:
    torch.manual_seed(0)
    return ConvDecoder(3, 32, 32, 8, 8, cond_dim, likelihood="logistic", fusion=fusion, heads=2)


def test_concat_is_the_decoder_as_it_was():
    dec = decoder("concat")
    assert set(dec.state_dict()) == PLAIN_KEYS and dec.stem[0].in_features == 8 + 16
    z, c = torch.randn(4, 8), torch.randn(4, 16)
    # The forward of the decoder before model.fusion, written out: z ⊕ c → stem → body → out.
    old = dec.out(dec.body(dec.stem(torch.cat([z, c], 1)).view(-1, *dec.bottom)))  # [4, 6, 32, 32]
    location, log_scale = dec(z, c)
    assert torch.equal(location, torch.tanh(old[:, :3])) and torch.equal(log_scale, old[:, 3:].clamp(min=-7))
    # Encoded views of the same condition read as its pooled vector.
    tokens = Encoded(c, torch.randn(4, 5, 16), torch.ones(4, 5, dtype=torch.bool))
    assert torch.equal(dec(z, tokens)[0], location)


@pytest.mark.parametrize(
    ("fusion", "extra"),
    [("film", {"film.0", "film.1", "film.2"}), ("cross_attention", {"attend.0", "attend.1"})],
)
def test_film_and_cross_attention_start_as_the_unconditional_decoder(fusion, extra):
    fused, plain = decoder(fusion), decoder("concat", cond_dim=0)
    added = {".".join(k.split(".")[:2]) for k in set(fused.state_dict()) - PLAIN_KEYS}
    assert added == extra and fused.stem[0].in_features == 8  # z only: no concat
    # Same seed, same plain layers: the fusion layers are drawn after them.
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in plain.state_dict().items())
    z = torch.randn(4, 8)
    text = TextCondition(len(VOCAB), 0, cond_dim=16, d_model=16, heads=2, max_len=4)
    red = encode_condition(text, {"text": captions([RED] * 4)})
    blue = encode_condition(text, {"text": captions([BLUE] * 4)})
    with torch.no_grad():
        assert torch.equal(fused(z, red)[0], plain(z)[0]) and torch.equal(fused(z, blue)[0], plain(z)[0])


def test_cross_attention_decoder_never_reads_caption_padding():
    assert_decoder_never_reads_caption_padding(decoder("cross_attention"))


def vae_task(fusion: str) -> VaeTask:
    model = {**vae_model("text", likelihood="logistic", z_dim=4, width=8), "fusion": fusion}
    model.update(cond_dim=16, d_model=16, heads=2)
    torch.manual_seed(0)
    return VaeTask(model, VOCAB, DATA)


def colour_gap(task: VaeTask) -> float:
    """How much redder (R − B of the decoded means) the same prior draws are under "red" than "blue"."""
    with torch.no_grad():
        red, blue = (task.sample(16, task.conditioning({"text": captions([w] * 16)})) for w in (RED, BLUE))
    return float((red[:, 0] - red[:, 2]).mean() - (blue[:, 0] - blue[:, 2]).mean())


@pytest.mark.parametrize(("fusion", "least"), [("film", 0.3), ("cross_attention", 0.05)])
def test_a_tiny_cvae_with_each_fusion_learns_to_read_the_caption(fusion, least):
    task = vae_task(fusion)
    assert colour_gap(task) == 0.0  # starts unconditional
    data = ColourCaptions(64)
    batch = task.on_after_batch_transfer(default_collate([data[i] for i in range(64)]), 0)
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    for _ in range(20):
        terms = task.elbo_terms(batch)
        loss = (terms["kl_dims"].sum(1) - terms["recon"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # seed 0, 20 steps: film 0.79, cross_attention 0.12 (it reads the caption through a transformer's
    # tokens and starts slower; at lr 1e-2 it does not move in 20 steps)
    assert colour_gap(task) > least
    # IWAE evaluation repeats the condition per importance sample (tokens and mask too).
    iwae = task.evaluate_batch({**batch, "__key__": [f"k{i}" for i in range(64)]}, k=3)
    assert iwae["log_likelihood"].shape == (64,) and bool(torch.isfinite(iwae["log_likelihood"]).all())


def test_vae_fusion_choices_are_refused_in_one_line(tmp_path):
    composed: dict[str, object] = {}

    def problems(experiment: str, fusion: str) -> list[str]:
        # One compose per experiment (composing is the slow part); the fusion is set on it.
        if experiment not in composed:
            composed[experiment] = compose_config([f"experiment={experiment}", f"paths.data_dir={tmp_path}"])
        cfg = composed[experiment].copy()
        cfg.model.fusion = fusion
        return [p for p in config_problems(cfg) if p.startswith("model.fusion")]

    vae = "shapes_text2image_vae"
    assert problems(vae, "concat") == [] and composed[vae].model.fusion == "concat"  # the VAE's default
    assert GanModelConfig.fusion == "cbn"  # the GAN's default is its own
    assert problems(vae, "cbn") == [
        "model.fusion: the vae decoder has no batch norm; must be one of "
        "('concat', 'film', 'cross_attention') (got 'cbn')"
    ]
    assert problems(vae, "xattn") == [
        "model.fusion: must be one of ('concat', 'film', 'cross_attention') (got 'xattn')"
    ]
    assert problems("shapes_vae", "film") == [
        "model.fusion: fuses a condition; model.condition is none (got 'film')"
    ]
    # The 3-D video decoder takes every choice too (tests/test_video_fusion.py; it was concat only).
    assert problems("moving_shapes_text2video_vae", "cross_attention") == []
    assert problems(vae, "film") == problems(vae, "cross_attention") == []
