"""VAE task: likelihood maths, KL schedules, convergence on tiny data, β / CVAE effects, exact
resume, text→audio (log-mel target, padded frames masked), and 2-rank DDP / FSDP2 runs of the
shapes VAE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import distributions as D
from torch.utils.data import DataLoader

from tests.conftest import TINY, run_cli
from xmodal.codecs.audio import log_mel_to_unit, unit_to_log_mel
from xmodal.metrics.likelihood import (
    ActiveUnits,
    bernoulli_log_prob,
    bits_per_dim,
    discretized_logistic_log_prob,
    gaussian_kl_per_dim,
    gaussian_log_prob,
    iwae_log_likelihood,
    laplace_log_prob,
    log_normal_diag,
    log_standard_normal,
)
from xmodal.tasks.vae.task import VaeTask, kl_weight

# ----------------------------------------------------------------------------- likelihood maths


def test_log_probs_match_torch_distributions_summed_per_sample():
    g = torch.Generator().manual_seed(0)
    x01 = torch.rand(3, 2, 4, 4, generator=g).round()
    loc = torch.randn(3, 2, 4, 4, generator=g)
    log_scale = torch.randn(3, 2, 4, 4, generator=g) * 0.3
    x = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1

    def per_sample(t):
        return t.flatten(1).sum(1)

    expected = per_sample(D.Bernoulli(logits=loc).log_prob(x01))
    torch.testing.assert_close(bernoulli_log_prob(loc, x01), expected)
    expected = per_sample(D.Normal(loc, log_scale.exp()).log_prob(x))
    torch.testing.assert_close(gaussian_log_prob(loc, log_scale, x), expected)
    expected = per_sample(D.Laplace(loc, log_scale.exp()).log_prob(x))
    torch.testing.assert_close(laplace_log_prob(loc, log_scale, x), expected)
    # bf16 inputs (autocast) are promoted: same result as their fp32 values.
    torch.testing.assert_close(
        bernoulli_log_prob(loc.bfloat16(), x01), bernoulli_log_prob(loc.bfloat16().float(), x01)
    )

    mu, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    q = D.Normal(mu, (0.5 * logvar).exp())
    torch.testing.assert_close(gaussian_kl_per_dim(mu, logvar), D.kl_divergence(q, D.Normal(0.0, 1.0)))
    z = torch.randn(5, 3, generator=g)
    torch.testing.assert_close(log_normal_diag(z, mu, logvar), q.log_prob(z).sum(-1))
    torch.testing.assert_close(log_standard_normal(z), D.Normal(0.0, 1.0).log_prob(z).sum(-1))
    assert bits_per_dim(math.log(2) * 784, 784) == pytest.approx(1.0)


def test_discretized_logistic_is_a_distribution_over_256_levels():
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1  # every pixel value in [-1, 1]
    for mean, log_scale in [(0.0, -2.0), (0.7, -4.0), (-1.0, -6.0), (0.3, 0.5)]:
        m = torch.full((256, 1), mean)
        s = torch.full((256, 1), log_scale)
        log_p = discretized_logistic_log_prob(m, s, levels[:, None])  # [256] one pixel each
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=2e-3)
        # An interior level's mass is the logistic CDF difference over its bin.
        cdf = D.TransformedDistribution(
            D.Uniform(0.0, 1.0),
            [D.transforms.SigmoidTransform().inv, D.transforms.AffineTransform(mean, math.exp(log_scale))],
        ).cdf
        i = 100
        mass = cdf(levels[i] + 1 / 255) - cdf(levels[i] - 1 / 255)
        if mass > 1e-5:
            assert log_p[i].item() == pytest.approx(math.log(mass.item()), rel=1e-3)


def test_iwae_bound_is_elbo_at_k1_and_tightens_with_k():
    log_w = torch.randn(64, 5, generator=torch.Generator().manual_seed(1)) * 2
    torch.testing.assert_close(iwae_log_likelihood(log_w[:1]), log_w[0])
    bound = iwae_log_likelihood(log_w)
    assert (bound >= log_w.mean(0)).all()  # Jensen: IWAE-k ≥ the mean one-sample ELBO
    torch.testing.assert_close(bound, torch.logsumexp(log_w, 0) - math.log(64))


def test_active_units_are_split_level_sums():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(100, 4, generator=g) * torch.tensor([1.0, 0.05, 0.2, 0.0])
    au = ActiveUnits(4)
    for part in mu.split(30):  # any split into batches gives the same result
        au.update(part)
    torch.testing.assert_close(au.variances().float(), mu.var(0, unbiased=False), rtol=1e-5, atol=1e-7)
    assert au.compute().item() == 2  # variances ≈ 1, 0.0025, 0.04, 0 → two above 0.01


def test_kl_weight_linear_and_cyclical_schedules():
    assert [kl_weight(s, 1.0, 0) for s in (0, 5)] == [1.0, 1.0]
    assert [kl_weight(s, 2.0, 10) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]
    # 100 steps, 4 cycles of 25; ramp over 10 steps then hold β.
    cyc = [kl_weight(s, 1.0, 10, "cyclical", 4, 100) for s in (0, 5, 10, 24, 25, 30, 99)]
    assert cyc == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0]
    # No ramp length given: half of each period.
    assert kl_weight(6, 1.0, 0, "cyclical", 2, 50) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- tiny-data training


def random_bars(n: int, seed: int) -> list[dict]:
    """8×8 binary images: horizontal or vertical, each of the 8 lines on with p=½.

    Entropy ≈ ln 2 + 8 ln 2 = 6.2 nats per image: the best possible NLL. The label (16 classes)
    names the orientation and the first three lines: ≈ 4 ln 2 = 2.8 nats a CVAE need not model.
    """
    g = torch.Generator().manual_seed(seed)
    vertical = torch.randint(0, 2, (n,), generator=g)
    lines = torch.randint(0, 2, (n, 8), generator=g).float()
    rows = lines[:, :, None].expand(n, 8, 8)
    images = torch.where(vertical[:, None, None].bool(), rows.transpose(1, 2), rows)
    label = vertical * 8 + (lines[:, :3].long() * torch.tensor([4, 2, 1])).sum(1)  # [n] in 0..15
    return [
        {"image": images[i][None] * 2 - 1, "label": label[i], "key": f"bars-{seed}-{i}"} for i in range(n)
    ]


def collate(rows: list[dict]) -> dict:
    return {
        "image": torch.stack([r["image"] for r in rows]),  # [B, 1, 8, 8]
        "label": torch.stack([r["label"] for r in rows]),  # [B]
        "valid": torch.ones(len(rows), dtype=torch.bool),
        "__key__": [r["key"] for r in rows],
        "captions": [[f"label {int(r['label'])}"] for r in rows],
    }


BARS_DATA = {"image_size": 8, "image_channels": 1, "audio_mels": 8, "audio_frames": 8, "max_text_len": 8}


def vae_model(condition: str = "none", target: str = "image", **vae) -> dict:
    """A small ``model`` node as the task receives it (plain dicts)."""
    return {
        "task": "vae",
        "target": target,
        "condition": condition,
        "num_classes": 16,
        "cond_dim": 8,
        "d_model": 16,
        "heads": 2,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "warmup_steps": 10,
        "vae": {
            "z_dim": 8,
            "width": 16,
            "likelihood": "bernoulli",
            "learn_sigma": False,
            "sigma": 0.1,
            "binarize": False,
            "beta": 1.0,
            "kl_warmup_steps": 0,
            "kl_schedule": "linear",
            "kl_cycles": 4,
            "free_bits": 0.0,
            "iwae_k": 32,
            "logvar_clamp": 10.0,
            **vae,
        },
    }


def bars_task(condition: str = "none", **vae) -> VaeTask:
    torch.manual_seed(0)
    return VaeTask(vae_model(condition, **vae), ["<pad>", "<bos>", "<eos>", "<unk>"], BARS_DATA)


def fit(task: VaeTask, epochs: int, root: Path, resume: str | None = None, **trainer) -> dict[str, float]:
    """Train on 2,048 bars (32 batches/epoch), validate on 512 held-out ones."""
    train = DataLoader(random_bars(2048, 0), batch_size=64, collate_fn=collate)
    val = DataLoader(random_bars(512, 1), batch_size=128, collate_fn=collate)
    t = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing="callbacks" in trainer,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs,
        default_root_dir=str(root),
        **trainer,
    )
    t.fit(task, train, val, ckpt_path=resume)
    return {k: float(v) for k, v in t.callback_metrics.items() if v.numel() == 1}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets: one intra-op thread is ~10× faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain_vae(tmp_path_factory) -> dict[str, float]:
    return fit(bars_task(), 8, tmp_path_factory.mktemp("vae"))


def test_vae_learns_tiny_bars_and_iwae_bound_is_tighter(plain_vae):
    m = plain_vae
    # Measured: −ELBO 11.9, IWAE-32 NLL 10.3 after 8 epochs (44.4 = 64·ln 2 at chance; entropy 6.2).
    assert m["val/neg_elbo"] < 20.0
    assert m["val/nll"] <= m["val/neg_elbo"]  # IWAE-32 bound is tighter than the ELBO
    assert m["val/nll"] > 6.0  # and never below the data's entropy
    assert m["val/kl"] > 1.0  # the posterior is used (no collapse)
    assert m["val/active_units"] >= 2
    assert m["val/neg_elbo"] == pytest.approx(m["val/recon"] + m["val/kl"], rel=1e-5)
    assert m["val/nll_bpd"] == pytest.approx(m["val/nll"] / (64 * math.log(2)), rel=1e-5)
    assert sum(m[f"val/kl_dim/{i:02d}"] for i in range(8)) == pytest.approx(m["val/kl"], rel=1e-4)


def test_beta_4_gives_much_smaller_kl_than_beta_1(plain_vae, tmp_path):
    m = fit(bars_task(beta=4.0), 8, tmp_path)
    assert m["val/kl"] < plain_vae["val/kl"] / 4


def test_label_cvae_beats_the_vae_on_the_same_data(plain_vae, tmp_path):
    m = fit(bars_task(condition="label"), 8, tmp_path)
    # Measured: 6.4 vs 11.9 nats (the label carries ≈ 2.8 nats of each image).
    assert m["val/neg_elbo"] < plain_vae["val/neg_elbo"] - 3.0
    assert m["val/nll"] < plain_vae["val/nll"]


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    """Training noise is keyed by (seed, step, rank): a resumed run draws what the original drew."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    # Cyclical KL weight and free bits make the loss depend on the restored step too.
    vae = {"kl_schedule": "cyclical", "kl_warmup_steps": 8, "kl_cycles": 2, "free_bits": 0.05}
    every_epoch = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        filename="{epoch}",
        save_top_k=-1,
        monitor=None,
        save_on_train_epoch_end=True,
    )
    straight = bars_task(**vae)
    fit(straight, 2, tmp_path / "a", callbacks=[every_epoch])
    resumed = bars_task(**vae)
    torch.manual_seed(123)  # the global RNG must not matter
    fit(resumed, 2, tmp_path / "b", resume=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["decoder.out.weight"], bars_task(**vae).state_dict()["decoder.out.weight"])


@pytest.mark.parametrize(
    "vae",
    [
        {"likelihood": "bernoulli", "binarize": True},
        {"likelihood": "gaussian", "sigma": 0.2},
        {"likelihood": "gaussian", "learn_sigma": True},
        {"likelihood": "laplace", "learn_sigma": True},
        {"likelihood": "logistic"},
    ],
    ids=lambda v: "-".join(str(x) for x in v.values()),
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_likelihood_trains_with_finite_fp32_loss(vae, dtype):
    """Under autocast, as bf16-mixed and (on GPU) 16-mixed run it: fp16 with the loss scaler."""
    task = bars_task(**vae)
    task.log = lambda *args, **kwargs: None  # no Trainer attached
    batch = collate(random_bars(32, 3))
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-3)
    # 2^8: where GradScaler settles on these nets (from its default 2^16 it first halves past steps
    # whose fp16 gradients overflow, as it should)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=dtype == torch.float16)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=dtype):  # loss still computed in fp32
            loss = task.training_step(batch, 0)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert scaler.get_scale() == (256.0 if dtype == torch.float16 else 1.0)  # no step skipped as non-finite
    if vae.get("learn_sigma"):
        assert task.decoder.log_sigma.grad is not None and task.decoder.log_sigma.grad.abs().sum() > 0
    out = task.evaluate_batch(batch, k=4)
    assert torch.isfinite(out["log_likelihood"]).all() and out["recon"].shape == (32,)


def test_bf16_mixed_training_gives_finite_metrics(tmp_path):
    m = fit(bars_task(), 1, tmp_path, precision="bf16-mixed")
    assert math.isfinite(m["val/nll"]) and m["val/nll"] < 64 * math.log(2)


def test_config_refuses_inconsistent_vae_settings(tiny):
    from xmodal.config import ConfigError, compose_config, validate

    cfg = compose_config([*tiny, "experiment=shapes_vae", "model.vae.binarize=true", "model.vae.kl_cycles=0"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "model.vae.binarize" in str(err.value) and "model.vae.kl_cycles" in str(err.value)


# ----------------------------------------------------------------------------- text → audio

AUDIO_DATA = {**BARS_DATA, "audio_mels": 32, "audio_frames": 32}


def test_log_mel_affine_maps_the_floor_to_minus_one_and_inverts():
    mels = torch.tensor([math.log(1e-6), 8.0, -3.0])
    torch.testing.assert_close(log_mel_to_unit(mels)[:2], torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(unit_to_log_mel(log_mel_to_unit(mels)), mels)


def audio_batch(mels: torch.Tensor, mask: torch.Tensor) -> dict:
    n = mels.shape[0]
    return {
        "audio": mels,  # [B, 1, M, T] natural-log mel power
        "audio_mask": mask,  # [B, T] True on real frames
        "valid": torch.ones(n, dtype=torch.bool),
        "__key__": [f"clip-{i}" for i in range(n)],
        "captions": [[""] for _ in range(n)],
    }


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_padded_audio_frames_cost_nothing(likelihood):
    """Whatever padded frames hold, a sample's ELBO, IWAE bound and KL do not move; a real frame does."""
    torch.manual_seed(0)
    model = vae_model(target="audio", likelihood=likelihood, learn_sigma=True)
    task = VaeTask(model, ["<pad>", "<bos>", "<eos>", "<unk>"], AUDIO_DATA).eval()
    g = torch.Generator().manual_seed(4)
    mels = torch.randn(3, 1, 32, 32, generator=g) * 4 - 6  # [B, 1, M, T]
    mask = torch.ones(3, 32, dtype=torch.bool)  # [B, T]
    mask[0, 20:] = False
    mask[1, 28:] = False  # sample 2 is unpadded
    padded = ~mask[:, None, None, :]  # [B, 1, 1, T]
    noise = torch.randn(mels.shape, generator=g) * 100
    changed = torch.where(padded, noise, mels)

    evaluate = [task.evaluate_batch(audio_batch(x, mask), k=4) for x in (mels, changed)]
    train = [task.elbo_terms(audio_batch(x, mask)) for x in (mels, changed)]
    for a, b in (evaluate, train):
        for key in ("recon", "kl_dims") + (("log_likelihood",) if "log_likelihood" in a else ()):
            assert torch.equal(a[key], b[key]), key
    assert evaluate[0]["dims"].tolist() == [32 * 20, 32 * 28, 32 * 32]  # bits/dim over real dims

    louder = mels.clone()
    louder[0, :, :, 5] += 3.0  # a real frame of sample 0
    moved = task.evaluate_batch(audio_batch(louder, mask), k=4)
    assert moved["recon"][0] != evaluate[0]["recon"][0]
    assert torch.equal(moved["recon"][1:], evaluate[0]["recon"][1:])

    # The masked sum is the plain sum over real frames.
    loc, log_scale = torch.randn(3, 1, 32, 32, generator=g), torch.randn(3, 1, 32, 32, generator=g) * 0.3
    dist = D.Normal if likelihood == "gaussian" else D.Laplace
    expected = (dist(loc, log_scale.exp()).log_prob(mels) * ~padded).flatten(1).sum(1)
    log_prob = gaussian_log_prob if likelihood == "gaussian" else laplace_log_prob
    torch.testing.assert_close(log_prob(loc, log_scale, mels, ~padded), expected)


AUDIO_RUN = [
    "experiment=shapes_text2audio_vae",
    "model.lr=3e-3",
    "model.warmup_steps=5",
    # KL at full weight from the start: what the caption says costs nothing through the condition
    # but KL nats through z, so the decoder learns to read the caption within a few dozen steps.
    "model.vae.kl_warmup_steps=0",
    "model.vae.iwae_k=4",
    "trainer.max_steps=48",
]


@pytest.fixture(scope="module")
def text2audio(data_dir) -> dict:
    """A text→audio CVAE trained 48 steps (3 epochs of 192 clips), validated before and after."""
    from xmodal.config import compose_config
    from xmodal.factory import build_datamodule, build_task, prepare_data

    cfg = compose_config([*TINY, f"paths.data_dir={data_dir}", *AUDIO_RUN])
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    datamodule.setup("fit")
    torch.manual_seed(0)
    task = build_task(cfg, datamodule.tokenizer)

    def trainer(**kwargs) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            **kwargs,
        )

    before = trainer().validate(task, datamodule=datamodule, verbose=False)[0]
    fit = trainer(
        max_steps=cfg.trainer.max_steps, limit_val_batches=0, gradient_clip_val=cfg.trainer.gradient_clip_val
    )
    fit.fit(task, datamodule=datamodule)
    after = trainer().validate(task, datamodule=datamodule, verbose=False)[0]
    return {"task": task.eval(), "datamodule": datamodule, "before": before, "after": after}


def test_text_to_audio_cvae_learns_on_tiny_shapes(text2audio):
    before, after = text2audio["before"], text2audio["after"]
    # Measured: held-out −ELBO 65,734 → 28,241 nats per clip after 48 steps (0.43×; IWAE-4 NLL
    # 27,901). A density over 3,264 real dims in model units with σ ≈ 0.1: big numbers, early days.
    assert after["val/neg_elbo"] < 0.6 * before["val/neg_elbo"]
    assert after["val/nll"] <= after["val/neg_elbo"]
    assert after["val/kl"] > 0.0
    # Every shapes clip is 0.5 s: 51 real frames of 64, so bits/dim count 64 mels × 51 frames.
    assert after["val/nll_bpd"] == pytest.approx(after["val/nll"] / (64 * 51 * math.log(2)), rel=1e-4)


def test_text_to_audio_cvae_reads_the_caption(text2audio):
    """Held-out NLL with each clip's own caption vs its neighbour's: equal if the condition were ignored."""
    task, batch = text2audio["task"], text2audio["datamodule"].sample_batch(48)  # the val split
    shifted = {**batch, "text": batch["text"].roll(1, 0), "text_mask": batch["text_mask"].roll(1, 0)}
    true = -task.evaluate_batch(batch)["log_likelihood"]  # [48] nats
    wrong = -task.evaluate_batch(shifted)["log_likelihood"]
    # Measured: 27,901 vs 33,734 nats per clip (5,832 apart); the true caption wins on 42 of 48.
    assert (wrong - true).mean() > 2000.0
    assert (true < wrong).float().mean() >= 0.75


def test_text_to_audio_experiment_writes_spectrogram_samples(tiny, tmp_path):
    args = [*tiny, "experiment=shapes_text2audio_vae", "data.audio_mels=32", "model.vae.iwae_k=2"]
    args += ["trainer.max_steps=2", "trainer.val_check_interval=2", "logger=none", "run.id=t2a"]
    result = run_cli(["xmodal-train", *args], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "shapes_text2audio_vae" / "t2a"
    samples = run_dir / "samples"
    assert (samples / "table_step0000002.md").is_file()
    with Image.open(samples / "conditional_step0000002.png") as grid:
        assert grid.size == (4 * 136, 64 + 58 + 8)  # 4 spectrograms of 2·64 × 2·32 px, captions below
    with Image.open(samples / "reconstruction_step0000002.png") as grid:
        pixels = np.asarray(grid.convert("RGB"))
    # Inputs above reconstructions: 4 tiles of 2·T = 128 px across, 2·M = 64 px high, grey.
    assert pixels.shape == (2 * 66 + 2, 4 * 130 + 2, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    first_input = pixels[2:66, 2:130, 0]  # [2·M, 2·T]: time runs across
    assert first_input[:, : 2 * 51].max() > 100  # the clip's tones
    assert (first_input[:, 2 * 51 :] == 0).all()  # frames 51..63 are padding: silence, black
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(summary["test"]["test/nll_bpd"])


# ----------------------------------------------------------------------------- 2-rank runs (CLI)

DISTRIBUTED = [
    "experiment=shapes_vae",
    "data.shapes.image_size=32",
    "data.shapes.n_val=47",  # odd: one rank gets a padding row, which must not count
    "data.shapes.n_test=45",
    "model.vae.iwae_k=4",
    "model.vae.kl_warmup_steps=4",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "logger=csv",
    "callbacks.rank_checksums=true",
]


def rank_checksums(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / "checksums" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def vae_ddp_run(tmp_path_factory, data_dir):
    """One 2-rank CPU DDP run (gloo) of the shapes VAE, shared by the DDP and FSDP2 tests."""
    root = tmp_path_factory.mktemp("vae_ddp")
    overrides = [*TINY, f"paths.data_dir={data_dir}", *DISTRIBUTED]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # 2 ranks × 1 thread on 2 cores
        result = run_cli(
            ["xmodal-train", *overrides, f"paths.output_dir={root}", "trainer=ddp_cpu", "run.id=ddp"], root
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "shapes_vae" / "ddp", overrides


def test_vae_ddp_two_ranks_identical_and_metrics_equal_one_rank(vae_ddp_run):
    run_dir, overrides = vae_ddp_run
    ranks = rank_checksums(run_dir)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    assert ranks[0]["start"] == ranks[1]["start"]
    assert ranks[0]["end"] == ranks[1]["end"] != ranks[0]["start"]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["monitor"] == "val/nll" and summary["test"]["test/nll"] > 0
    assert summary["val"]["val/nll"] <= summary["val"]["val/neg_elbo"] + 1.0
    for name in ("reconstruction", "prior"):
        assert (run_dir / "samples" / f"{name}_latest.png").is_file()

    # Evaluation noise is keyed by sample, and sums are synced: 1 rank gives the 2-rank numbers.
    from xmodal.config import compose_config
    from xmodal.factory import build_datamodule, prepare_data

    cfg = compose_config(overrides)
    task = VaeTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    datamodule = build_datamodule(cfg, prepare_data(cfg), tokenizer=task.tokenizer)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    one = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    two = summary["val"]
    for key in ("val/nll", "val/neg_elbo", "val/kl", "val/active_units", "val/kl_dim/00"):
        assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-5), key


def test_vae_fsdp2_two_ranks_train_match_ddp_and_resume(vae_ddp_run, tmp_path):
    ddp_dir, overrides = vae_ddp_run
    args = ["xmodal-train", *overrides, f"paths.output_dir={tmp_path}", "trainer=fsdp2", "run.id=f"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        result = run_cli(args, tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        run_dir = tmp_path / "shapes_vae" / "f"
        ranks = rank_checksums(run_dir)
        assert ranks[0]["end"] == ranks[1]["end"] != ranks[0]["start"]
        assert (run_dir / "checkpoints" / "last.ckpt").is_dir()  # a sharded (distributed) checkpoint
        fsdp = json.loads((run_dir / "metrics.json").read_text())
        ddp = json.loads((ddp_dir / "metrics.json").read_text())
        for key in ("val/nll", "val/neg_elbo", "val/kl"):
            assert fsdp["val"][key] == pytest.approx(ddp["val"][key], rel=1e-4), key
        # Same run id, more steps: resumes from the distributed last.ckpt.
        result = run_cli([*args, "trainer.max_steps=9", "test_after_fit=false"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 9
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9]
    ranks = rank_checksums(run_dir)
    assert ranks[0]["end"] == ranks[1]["end"]


# ------------------------------------------------------------------- what every task shares


@pytest.mark.parametrize("progress_bar", [True, False])
def test_training_scalars_are_logged_on_the_logger_s_steps_and_none_is_lost(tmp_path, progress_bar):
    """self.log costs ~0.3 ms a call: step scalars the logger would never write are not logged,
    yet every row the logger writes holds all of them."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    task = bars_task()
    calls: dict[str, int] = {}
    log = task.log

    def counting_log(name, *args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return log(name, *args, **kwargs)

    task.log = counting_log
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=7,
        log_every_n_steps=3,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(task, DataLoader(random_bars(7 * 16, 0), batch_size=16, collate_fn=collate))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    scalars = ("train/loss", "train/neg_elbo", "train/recon", "train/kl", "train/kl_weight")
    written = {name: [int(r["step"]) for r in rows if r.get(name)] for name in scalars}
    assert all(steps == [2, 5] for steps in written.values()), written  # every 3rd step, all five
    assert calls == {**dict.fromkeys(scalars, 2), "train/loss": 7 if progress_bar else 2}


def test_batches_move_tensors_and_leave_per_row_metadata_alone():
    batch = {
        **collate(random_bars(4, 0)),
        "extra": {"nested": torch.zeros(2)},  # anything else goes through Lightning's mover
    }
    moved = bars_task().transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert list(moved) == list(batch)
    assert all(moved[k].device.type == "meta" for k in ("image", "label", "valid"))
    assert moved["extra"]["nested"].device.type == "meta"
    assert moved["captions"] is batch["captions"] and moved["__key__"] is batch["__key__"]
