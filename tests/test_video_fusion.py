"""``model.fusion`` on the text → video VAE's 3-D decoder (xmodal/nn/video.py): concat as it was,
FiLM of the pooled caption vector after every upsampling block, cross-attention over the caption
tokens with the block's ``T·H·W`` cells as queries.

film and cross_attention reuse xmodal/nn/fusion.py's :class:`FiLM` and :class:`CrossAttention2d`,
start as the unconditional decoder, and learn from a tiny batch of coloured clips in a few steps.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_fusion import BLUE, RED, VOCAB, assert_decoder_never_reads_caption_padding, captions
from tests.test_vae import vae_model
from xmodal.config import compose_config
from xmodal.config.validate import config_problems
from xmodal.nn.condition import Encoded, TextCondition, encode_condition
from xmodal.nn.fusion import CrossAttention2d, FiLM
from xmodal.nn.video import VideoVaeDecoder
from xmodal.tasks.vae.task import VaeTask

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES, SIDE = 8, 32
DATA = {"image_channels": 3, "video_frames": FRAMES, "video_size": SIDE, "max_text_len": 4}
PLAIN_KEYS = {
    *(f"stem.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
    *(f"body.{i}.{p}" for i in (0, 1, 3, 4, 6, 7) for p in ("weight", "bias")),
    "out.weight",
    "out.bias",
}
"""The 32 px video decoder's state_dict before ``model.fusion`` (3 blocks of up-conv, group norm)."""


def decoder(fusion: str, cond_dim: int = 16) -> VideoVaeDecoder:
    torch.manual_seed(0)
    return VideoVaeDecoder(3, FRAMES, SIDE, SIDE, 8, 8, cond_dim, fusion=fusion, heads=2)


def test_concat_is_the_video_decoder_as_it_was():
    dec = decoder("concat")
    assert set(dec.state_dict()) == PLAIN_KEYS and dec.stem[0].in_features == 8 + 16
    z, c = torch.randn(2, 8), torch.randn(2, 16)
    # The forward of the decoder before model.fusion, written out: z ⊕ c → stem → body → out.
    old = dec.out(dec.body(dec.stem(torch.cat([z, c], 1)).view(-1, *dec.bottom)))  # [2, 6, 8, 32, 32]
    location, log_scale = dec(z, c)
    assert torch.equal(location, torch.tanh(old[:, :3])) and torch.equal(log_scale, old[:, 3:].clamp(min=-7))
    tokens = Encoded(c, torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(dec(z, tokens)[0], location)  # Encoded views read as their pooled vector


@pytest.mark.parametrize(
    ("fusion", "extra", "block"),
    [
        ("film", {"film.0", "film.1", "film.2"}, FiLM),
        ("cross_attention", {"attend.0", "attend.1"}, CrossAttention2d),
    ],
)
def test_film_and_cross_attention_start_as_the_unconditional_video_decoder(fusion, extra, block):
    fused, plain = decoder(fusion), decoder("concat", cond_dim=0)
    added = {".".join(k.split(".")[:2]) for k in set(fused.state_dict()) - PLAIN_KEYS}
    # cross_attention: after the blocks with 8 px and 16 px frames ([B, 16, 2, 8, 8], [B, 8, 4, 16, 16]).
    assert added == extra and fused.stem[0].in_features == 8  # z only: no concat
    assert all(isinstance(m, block) for m in (*fused.film, *fused.attend.values()))
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in plain.state_dict().items())
    text = TextCondition(len(VOCAB), 0, cond_dim=16, d_model=16, heads=2, max_len=4)
    z = torch.randn(2, 8)
    with torch.no_grad():
        red = encode_condition(text, {"text": captions([RED] * 2)})
        location = fused(z, red)[0]  # [2, 3, 8, 32, 32]
        assert location.shape == (2, 3, FRAMES, SIDE, SIDE) and torch.equal(location, plain(z)[0])


def coloured_clips(n: int) -> dict[str, torch.Tensor]:
    """A batch of uint8 clips ``[n, 3, 8, 32, 32]``, red or blue, captioned by the colour."""
    gen = torch.Generator().manual_seed(0)
    red = torch.arange(n) % 2 == 0
    colour = torch.where(red[:, None], torch.tensor([220, 30, 30]), torch.tensor([30, 30, 220]))  # [n, 3]
    noise = torch.randint(-20, 21, (n, 3, FRAMES, SIDE, SIDE), generator=gen)
    clips = (colour[:, :, None, None, None] + noise).clamp(0, 255).to(torch.uint8)  # [n, 3, T, H, W]
    words = [RED if r else BLUE for r in red.tolist()]
    return {"video": clips, "text": captions(words), "valid": torch.ones(n, dtype=torch.bool)}


def video_task(fusion: str) -> VaeTask:
    model = {**vae_model("text", target="video", likelihood="logistic", z_dim=4, width=8), "fusion": fusion}
    model.update(cond_dim=16, d_model=16, heads=2)
    torch.manual_seed(0)
    return VaeTask(model, VOCAB, DATA)


def colour_gap(task: VaeTask) -> float:
    """How much redder (R − B of the decoded means) the same prior draws are under "red" than "blue"."""
    with torch.no_grad():
        red, blue = (task.sample(8, task.conditioning({"text": captions([w] * 8)})) for w in (RED, BLUE))
    return float((red[:, 0] - red[:, 2]).mean() - (blue[:, 0] - blue[:, 2]).mean())  # clips [8, 3, T, H, W]


@pytest.mark.parametrize("fusion", ["film", "cross_attention"])
def test_a_tiny_text_to_video_vae_with_each_fusion_trains(fusion):
    task = video_task(fusion)
    assert colour_gap(task) == 0.0  # starts unconditional
    fused = task.decoder.film if fusion == "film" else task.decoder.attend
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    batch = task.on_after_batch_transfer(coloured_clips(16), 0)  # video [16, 3, 8, 32, 32] in [-1, 1]
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-2)
    losses = []
    for step in range(10):
        terms = task.elbo_terms(batch)
        loss = (terms["kl_dims"].sum(1) - terms["recon"]).mean()  # -ELBO, nats per clip
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # the zero-initialised output layers get a gradient from the first step
            grads = [p.grad for p in fused.parameters()]
            assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        optimizer.step()
        losses.append(float(loss.detach()))
    # seed 0, 10 steps: -ELBO 159.3k → 133.0k (film), → 134.9k (cross_attention) nats per clip
    assert losses[-1] < 0.9 * losses[0]
    changed = [k for k, v in fused.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == list(before)  # every fusion parameter moved
    if fusion == "film":  # measured 0.66 after 10 steps (2.66 after 20); cross-attention: ~0 by 20
        assert colour_gap(task) > 0.3
    # IWAE evaluation repeats the condition per importance sample (tokens and mask too).
    iwae = task.evaluate_batch({**batch, "__key__": [f"k{i}" for i in range(16)]}, k=2)
    assert iwae["log_likelihood"].shape == (16,) and bool(torch.isfinite(iwae["log_likelihood"]).all())


def test_every_vae_fusion_is_taken_by_the_video_experiment(tmp_path):
    cfg = compose_config(["experiment=moving_shapes_text2video_vae", f"paths.data_dir={tmp_path}"])
    assert cfg.model.fusion == "concat"  # the shipped default stays concat

    def problems(fusion: str) -> list[str]:
        node = cfg.copy()
        node.model.fusion = fusion
        return [p for p in config_problems(node) if p.startswith("model.fusion")]

    assert problems("film") == problems("cross_attention") == problems("concat") == []
    assert problems("cbn") == [
        "model.fusion: the vae decoder has no batch norm; must be one of "
        "('concat', 'film', 'cross_attention') (got 'cbn')"
    ]


def test_video_cross_attention_never_reads_caption_padding():
    assert_decoder_never_reads_caption_padding(decoder("cross_attention"))
