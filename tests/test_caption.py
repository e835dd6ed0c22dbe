"""Captioning: metrics against reference implementations, decoding (cache, beam), masks, audio CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.conftest import TINY
from xmodal.config import compose_config
from xmodal.data.shapes import ShapesSpec, make_sample
from xmodal.data.tokenizer import WordTokenizer
from xmodal.factory import build_task
from xmodal.metrics.caption import caption_scores, cider_d, corpus_bleu, rouge_l
from xmodal.nn.attention import padding_bias
from xmodal.nn.audio import LogMelEncoder
from xmodal.nn.image import FactorizedImageEncoder, saturated_value
from xmodal.nn.text import TransformerTextDecoder
from xmodal.train import train

# ---------------------------------------------------------------------------------------------
# Metrics. Reference values were computed once (not at test time) with pycocoevalcap 1.2
# (Cider().compute_score, Rouge().compute_score on {i: refs} / {i: [hyp]}) and sacrebleu 2.6.0
# (BLEU(tokenize="none", max_ngram_order=n).corpus_score(hyps, ref_streams).score / 100), installed
# from PyPI into a scratch directory; neither is a dependency of xmodal.
HYPS = [
    "a small red circle in the top left",
    "a large blue square at the bottom and a green triangle",
    "a white diamond on the right",
    "a purple circle",
    "a yellow square in the center of the image",
]
REFS = [
    ["a small red circle in the top left", "there is a small red circle top left", "a red circle"],
    [
        "a large blue square at the bottom and a small green triangle on the left",
        "a blue square and a green triangle",
        "two shapes a blue square and a green triangle",
    ],
    ["a white diamond", "a large white diamond on the right", "on the right a white diamond"],
    ["a small purple circle at the top", "a purple circle at the top", "one purple circle"],
    [
        "a yellow square in the center",
        "the center holds a yellow square",
        "a large yellow square in the middle",
    ],
]
SACREBLEU = {1: 0.9189189189189192, 2: 0.9125624747217417, 3: 0.9046020411771681, 4: 0.8696604755869868}
PYCOCO_CIDER, PYCOCO_ROUGE = 4.666425014755764, 0.9204167743046586

# No 4-gram of the hypotheses matches (sacrebleu counts [11, 6, 2, 0] of [12, 10, 8, 6]): torchmetrics'
# bleu_score(n_gram=4, smooth=True) gives exactly 0 here; sacrebleu's exp smoothing does not.
NO4_HYPS = ["red circle at top left", "a blue square on the left side"]
NO4_REFS = [
    ["a red circle at the top left", "red circle top left"],
    ["a square that is blue on the left", "blue square"],
]
NO4_SACREBLEU = {1: 0.9166666666666667, 2: 0.7416198487095662, 3: 0.5161400577281836, 4: 0.3271751898023586}
NO4_PYCOCO_CIDER, NO4_PYCOCO_ROUGE = 3.2044310562477, 0.9295774647887325


def test_bleu_matches_sacrebleu_including_smoothed_orders():
    for order, expected in SACREBLEU.items():
        assert corpus_bleu(HYPS, REFS, order) == pytest.approx(expected, abs=1e-12)
    for order, expected in NO4_SACREBLEU.items():
        assert corpus_bleu(NO4_HYPS, NO4_REFS, order) == pytest.approx(expected, abs=1e-12)
    assert NO4_SACREBLEU[4] > 0


def test_cider_d_and_rouge_l_match_pycocoevalcap():
    assert cider_d(HYPS, REFS) == pytest.approx(PYCOCO_CIDER, abs=1e-12)
    assert rouge_l(HYPS, REFS) == pytest.approx(PYCOCO_ROUGE, abs=1e-12)
    assert cider_d(NO4_HYPS, NO4_REFS) == pytest.approx(NO4_PYCOCO_CIDER, abs=1e-12)
    assert rouge_l(NO4_HYPS, NO4_REFS) == pytest.approx(NO4_PYCOCO_ROUGE, abs=1e-12)
    # CIDEr's IDF comes from the evaluated references: a single sample scores 0 (why it is a corpus metric).
    assert cider_d(HYPS[:1], REFS[:1]) == 0.0


def test_caption_scores_are_order_independent():
    forward = caption_scores(HYPS, REFS)
    backward = caption_scores(HYPS[::-1], REFS[::-1])
    assert set(forward) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rougeL"}
    assert forward == pytest.approx(backward, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Masks under low precision.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_padding_masks_are_finite_and_safe_in_low_precision(dtype):
    keep = torch.tensor([[True, True, False, False], [True, False, False, False]])
    bias = padding_bias(keep, dtype)
    assert bias.dtype == dtype and torch.isfinite(bias).all()
    assert bias[0, 0, 0, 2] == torch.finfo(dtype).min  # not -1e9 (overflows fp16) nor -inf (NaN rows)

    torch.manual_seed(0)
    decoder = TransformerTextDecoder(12, 32, 2, 4, 2, 0.0, 16, pad_id=0).to(dtype)
    memory = (torch.randn(2, 4, 32) * 4).to(dtype)
    tokens = torch.randint(4, 12, (2, 6))
    logits = decoder(tokens, memory, keep)
    assert torch.isfinite(logits).all()
    # Masked memory tokens have no influence at all.
    changed = memory.clone()
    changed[~keep] = 1000.0
    torch.testing.assert_close(decoder(tokens, changed, keep), logits)


def test_audio_token_mask_hides_padded_frames_from_the_decoder():
    torch.manual_seed(0)
    encoder = LogMelEncoder([8, 16], 32, n_mels=16, frames=16)
    frame_mask = torch.zeros(1, 16, dtype=torch.bool)
    frame_mask[:, :9] = True
    assert encoder.token_mask(frame_mask).tolist() == [[True, True, True, False]]  # 4 frames per token


# ---------------------------------------------------------------------------------------------
# Decoding on a tiny learned task: copy 4 "region" symbols (given as shuffled memory tokens with
# position codes) into a caption in position order.
SYMBOLS, SLOTS, BOS, EOS, PAD = 8, 4, 1, 2, 0
OFFSET = 3  # token id of symbol 0


class RegionEncoder(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.symbol = nn.Embedding(SYMBOLS, d_model)
        self.slot = nn.Embedding(SLOTS, d_model)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:  # [B, SLOTS, 2] (symbol, slot)
        return self.symbol(regions[..., 0]) + self.slot(regions[..., 1])  # [B, SLOTS, D]


def copy_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    symbols = torch.randint(0, SYMBOLS, (n, SLOTS), generator=generator)
    order = torch.argsort(torch.rand(n, SLOTS, generator=generator), dim=1)
    regions = torch.stack([symbols.gather(1, order), order], dim=-1)  # shuffled (symbol, slot) pairs
    bos, eos = torch.full((n, 1), BOS), torch.full((n, 1), EOS)
    return regions, torch.cat([bos, symbols + OFFSET, eos], dim=1)  # [B, SLOTS, 2], [B, SLOTS + 2]


@pytest.fixture(scope="module")
def copier() -> tuple[RegionEncoder, TransformerTextDecoder, torch.Tensor, torch.Tensor]:
    """150 AdamW steps (~1.5 s): 1.000 exact copies on 128 fresh samples when measured."""
    threads = torch.get_num_threads()
    # Tiny matrices: one thread is ~20x faster than two on a busy 2-core machine (no contention).
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        encoder, decoder = (
            RegionEncoder(32),
            TransformerTextDecoder(OFFSET + SYMBOLS, 32, 2, 4, 2, 0.0, 12, PAD),
        )
        optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=3e-3)
        for _ in range(150):
            regions, tokens = copy_batch(32, generator)
            logits = decoder(tokens[:, :-1], encoder(regions))
            loss = nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    encoder.eval(), decoder.eval()
    regions, tokens = copy_batch(128, torch.Generator().manual_seed(1))
    return encoder, decoder, encoder(regions).detach(), tokens


def test_tiny_captioner_converges_to_exact_copies(copier):
    _, decoder, memory, tokens = copier
    ids = decoder.greedy(memory, BOS, EOS, max_len=12)
    exact = (ids[:, : SLOTS + 1] == tokens[:, 1:]).all(1).float().mean()
    assert exact > 0.9


def test_cached_and_uncached_decoding_give_identical_tokens(copier):
    _, decoder, memory, _ = copier
    for decode in (decoder.greedy, lambda *a, **k: decoder.beam_search(*a, beam=5, alpha=0.6, **k)):
        cached = decode(memory, BOS, EOS, 12, use_cache=True)
        uncached = decode(memory, BOS, EOS, 12, use_cache=False)
        assert torch.equal(cached, uncached)


def test_beam_of_one_is_greedy_and_wider_beams_keep_the_best_score(copier):
    _, decoder, memory, _ = copier
    greedy = decoder.greedy(memory, BOS, EOS, 12, min_len=6)  # forced past EOS: a harder search
    assert torch.equal(decoder.beam_search(memory, BOS, EOS, 12, beam=1, min_len=6), greedy)
    beam = decoder.beam_search(memory, BOS, EOS, 12, beam=4, min_len=6)
    assert (beam[:, :6] != EOS).all() and (greedy[:, :6] != EOS).all()  # min length respected
    assert not (beam == BOS).any() and not (beam[:, :6] == PAD).any()  # never generated

    def log_prob(ids: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([torch.full((len(ids), 1), BOS), ids], dim=1)
        logp = decoder(tokens[:, :-1], memory).log_softmax(-1).gather(2, tokens[:, 1:, None])[..., 0]
        real = torch.cumsum(tokens[:, :-1] == EOS, 1) == 0  # up to and including the first EOS
        return (logp * real).sum(1)

    # Beam search (no length penalty) never finds a less likely caption than greedy.
    assert (log_prob(beam) >= log_prob(greedy) - 1e-4).all()


# ---------------------------------------------------------------------------------------------
# Audio → text end to end: a few training steps, then the generate CLI on a wav file.
def test_generate_prints_a_caption_for_an_audio_file(data_dir, tmp_path, capsys):
    overrides = [*TINY, f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path}", "logger=none"]
    overrides += [
        "experiment=shapes_audio_caption",
        "run.id=a",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
    ]
    overrides += ["model.beam_size=2", "test_after_fit=false"]
    metrics = train(compose_config(overrides))
    assert {"val/cider", "val/bleu4", "val/rougeL"} <= set(metrics)
    run_dir = tmp_path / "shapes_audio_caption" / "a"
    wav = tmp_path / "clip.wav"
    wav.write_bytes(make_sample(ShapesSpec(), "test", 0)["wav"])
    from xmodal.generate import main  # in-process (tests/test_cli.py runs the console script)

    capsys.readouterr()  # the training's own output
    assert main([str(run_dir / "checkpoints" / "last.ckpt"), "--audio", str(wav), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    vocab = set(json.loads((run_dir / "tokenizer.json").read_text())["vocab"])
    assert row["audio"] == str(wav) and row["caption"] and set(row["caption"].split()) <= vocab


def test_compositional_experiment_also_tests_the_unseen_pairs(tiny, tmp_path):
    cfg = compose_config([*tiny, "experiment=shapes_caption_compositional", "debug=fdr", "logger=none"])
    assert len(cfg.data.shapes.holdout) == 4
    metrics = train(cfg)
    assert {"holdout/bleu4", "holdout/cider", "holdout/loss", "test/bleu4"} <= set(metrics)
    run_dir = next((tmp_path / "outputs" / cfg.experiment_name).iterdir())
    assert "holdout/cider" in json.loads((run_dir / "metrics.json").read_text())["test"]


def test_factorized_encoder_sees_shape_without_colour_and_colour_without_outline():
    torch.manual_seed(0)
    encoder = FactorizedImageEncoder([16, 32], d_model=32, image_size=32, patch=4)
    background = torch.full((1, 3, 32, 32), -0.86)  # [1, 3, H, W] dark, as the shapes background
    green, blue = background.clone(), background.clone()
    green[:, 1, 9:20, 9:20] = 190 / 127.5 - 1  # the palette's green square (peak 190)...
    blue[:, 2, 9:20, 9:20] = 235 / 127.5 - 1  # ...and a blue one, brighter: value alone differs
    assert not torch.equal(green.amax(dim=1), blue.amax(dim=1))
    shape_path = lambda x: encoder.stem(saturated_value(x))  # noqa: E731
    assert torch.equal(shape_path(green), shape_path(blue))  # shape features ignore colour
    assert not torch.allclose(encoder(green), encoder(blue))  # ...but the tokens still say which
    assert encoder(green).shape == (1, encoder.num_tokens, 32) == (1, 16, 32)  # [B, N, D] as the conv one
    # The colour path takes the max over pixels: it says which colours are in and near a patch,
    # not where in it or over how much of it (the area of a shape differs by kind).
    speck = background.clone()
    speck[:, 1, 12, 12] = 190 / 127.5 - 1  # one green pixel where the square covers 49 of 64
    in_patch = lambda x: encoder.colour(x)[:, :, 1, 1]  # noqa: E731  [1, Cc] of pixels 8..15 × 8..15
    assert torch.allclose(in_patch(speck), in_patch(green), atol=1e-6)
    assert not torch.allclose(in_patch(speck), in_patch(background), atol=1e-3)
    # ...and colour reaches the neighbouring tokens (a blurred footprint), no further.
    colour_of = lambda x, row, col: encoder.colour(x)[:, :, row, col]  # noqa: E731
    assert torch.allclose(colour_of(speck, 2, 2), in_patch(speck), atol=1e-6)
    assert torch.allclose(colour_of(speck, 3, 3), colour_of(background, 3, 3), atol=1e-6)
    with torch.no_grad():  # silence the colour path: what is left of the tokens is colour-blind
        encoder.colour_proj.weight.zero_()
        encoder.colour_proj.bias.zero_()
    assert torch.equal(encoder(green), encoder(blue))


def test_word_dropout_hides_only_words_only_in_training_and_is_seeded_by_step(tiny):
    cfg = compose_config([*tiny, "model.token_dropout=0.5"])
    task = build_task(cfg, WordTokenizer.fit(["a red circle on the left"]))
    pad, bos, unk = task.tokenizer.pad_id, task.tokenizer.bos_id, task.tokenizer.unk_id
    inputs = torch.tensor([[bos, 4, 5, 6, 7, 8, pad, pad]] * 64)  # [B, T]
    task.train()
    dropped = task.drop_input_tokens(inputs)
    hidden = dropped == unk
    assert not hidden[:, 0].any() and not hidden[:, 6:].any()  # BOS and padding are never hidden
    assert 0.4 < float(hidden[:, 1:6].float().mean()) < 0.6  # about the configured rate of words
    assert torch.equal(dropped, task.drop_input_tokens(inputs))  # same step, rank, seed: same words
    task.eval()
    assert torch.equal(task.drop_input_tokens(inputs), inputs)  # evaluation sees every word
