"""Generative quality a user can see: the AC-GAN head renders the asked class, the independent
judge, matching-aware pairs, and collapse warnings that fire on collapsed models only."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tests.conftest import fit_gan, tiny_gan_model
from xmodal.callbacks.ema import EMAWeights
from xmodal.config import ConfigError, compose_config, validate
from xmodal.data.tokenizer import SPECIALS
from xmodal.factory import build_task
from xmodal.metrics.collapse import collapse_warnings
from xmodal.metrics.features import DomainClassifier, accuracy
from xmodal.metrics.fid import GenerativeMetrics
from xmodal.metrics.judge import train_judge
from xmodal.nn.diffaugment import diff_augment
from xmodal.tasks.adversarial import class_loss, rolled_conditions
from xmodal.tasks.gan.task import AdversarialTask
from xmodal.tokenizers.word import WordTokenizer

CENTRES = torch.tensor([[2.0, -1.0], [-2.0, 1.0]])  # class 0, class 1


class LabelledPoints(Dataset):
    """Two 2-D Gaussians, one per class, as batches of the task's contract."""

    def __init__(self, n: int = 2048):
        gen = torch.Generator().manual_seed(0)
        self.label = torch.randint(0, 2, (n,), generator=gen)
        self.x = CENTRES[self.label] + 0.3 * torch.randn(n, 2, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.label[i], "valid": torch.tensor(True)}


class LabelG(nn.Module):
    """z + a label embedding → a point; the label only enters through the embedding."""

    def __init__(self, z_dim: int = 8, hidden: int = 32):
        super().__init__()
        self.embed = nn.Embedding(2, hidden)
        self.inp = nn.Linear(z_dim, hidden)
        self.net = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, z: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.net(self.inp(z) + self.embed(batch["label"]))  # [B, 2]


class AuxD(nn.Module):
    """An unconditional D with an AC-GAN class head: the class can only reach G through the head."""

    def __init__(self, hidden: int = 32, classes: int = 2):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, 1)
        self.classes = nn.Linear(hidden, classes)

    def score(self, x: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.nn.functional.leaky_relu(self.body(x), 0.2)  # [B, H]
        return self.head(h).squeeze(1), self.classes(h)  # [B], [B, classes]

    def forward(self, x: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.score(x, batch)[0]


def label_task(
    num_classes: int = 10, discriminator: Callable[[], nn.Module] | None = None, **gan: object
) -> AdversarialTask:
    """LabelG against ``discriminator()`` (built after seeding; default AuxD) under ``model.gan`` overrides."""
    model = {**tiny_gan_model(**gan), "num_classes": num_classes}
    L.seed_everything(0, verbose=False)
    data = {"image_size": 32, "image_channels": 1, "audio_mels": 8, "audio_frames": 8, "max_text_len": 8}
    classes = 4 if gan.get("aux_mode") == "adc" else 2  # ADC-GAN: a real and a fake logit per class
    g = LabelG()  # before D: the seeded draws of both nets are as they always were
    d = discriminator() if discriminator is not None else AuxD(classes=classes)
    return AdversarialTask(model, list(SPECIALS), data, nets=(g, d))


def asked_class_accuracy(task: AdversarialTask) -> float:
    """Share of generated points nearest the centre of the class they were asked for."""
    labels = torch.arange(2).repeat(512)  # [1024]
    with torch.no_grad():
        points = task.generator(
            torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(1)), {"label": labels}
        )
    nearest = torch.cdist(points, CENTRES).argmin(1)  # [1024]
    return float((nearest == labels).float().mean())


def fit(task: AdversarialTask, iterations: int, optimizer_steps: int | None = None) -> L.Trainer:
    loader = DataLoader(
        LabelledPoints(), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    return fit_gan(task, loader, iterations, optimizer_steps=optimizer_steps)


def test_aux_classifier_head_makes_g_render_the_asked_class(one_thread):
    # D is unconditional: only the AC-GAN head tells G which class a label means. Without it G
    # still learns both modes but names them at random (measured, seed 0: 0.00, the two swapped).
    task = label_task(aux_weight=1.0)
    fit(task, 250)
    assert asked_class_accuracy(task) > 0.95  # measured 1.00


class PlainD(nn.Module):
    """An unconditional D without a class head: it cannot tell G which class a label means."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.net(x).squeeze(1)  # [B]


def recorded_train_scalars(task: AdversarialTask) -> set[str]:
    """The names the task's training steps log from now on, gathered as they pass to Lightning."""
    names: set[str] = set()
    log_scalars = task.log_train_scalars

    def record(scalars: dict, *args: object, **kwargs: object) -> None:
        names.update(scalars)
        log_scalars(scalars, *args, **kwargs)

    task.log_train_scalars = record  # type: ignore[method-assign]
    return names


@pytest.mark.parametrize("recon_loss", ["l1", "l2"])
def test_paired_reconstruction_makes_g_render_the_rows_own_class(one_thread, recon_loss):
    # D sees no label and has no class head, so the adversarial loss alone cannot name the modes;
    # only the recon term ties a row's label to that row's real point.
    accuracy_by_weight = {}
    for weight in (0.0, 1.0):
        task = label_task(2, PlainD, recon_weight=weight, recon_loss=recon_loss)
        logged = recorded_train_scalars(task)
        fit(task, 150)
        accuracy_by_weight[weight] = asked_class_accuracy(task)
        assert ("train/g_recon" in logged) == (weight > 0)
    assert accuracy_by_weight[1.0] > 0.95  # measured 1.00 (l1 and l2)
    assert accuracy_by_weight[0.0] < 0.75  # measured 0.50: the label is ignored


@pytest.mark.parametrize("gan_iterations", [0, 10])
def test_recon_warmup_trains_g_alone_then_hands_over_to_the_gan_at_g_lr(one_thread, gan_iterations):
    task = label_task(2, PlainD, recon_warmup_steps=100, recon_warmup_lr=1e-2)
    d_before = {k: v.clone() for k, v in task.discriminator.state_dict().items()}
    steps = 100 + gan_iterations * (task.gan.n_critic + 1)
    logged = recorded_train_scalars(task)
    trainer = fit(task, 0, optimizer_steps=steps)
    if gan_iterations == 0:
        assert logged == {"train/g_loss", "train/g_recon", "train/g_grad_norm", "train/skipped_steps"}
    else:
        assert {"train/d_loss", "train/g_recon"} <= logged  # recon_weight 0: the warm-up's own
    assert task.iteration == 100 + gan_iterations and trainer.global_step == steps
    d_moved = any(not torch.equal(v, d_before[k]) for k, v in task.discriminator.state_dict().items())
    assert d_moved == (gan_iterations > 0)  # D idles through the warm-up
    g_lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert g_lr == (1e-2 if gan_iterations == 0 else task.gan.g_lr)
    assert asked_class_accuracy(task) > 0.95  # regression alone names the classes (measured 1.00)


def test_factory_counts_a_warmup_iteration_as_one_optimizer_step():
    from xmodal.factory import lightning_max_steps

    base = ["experiment=shapes_text2image_gan", "trainer.max_steps=600"]
    assert lightning_max_steps(compose_config([*base, "model.gan.recon_warmup_steps=100"])) == 100 + 500 * 2
    assert lightning_max_steps(compose_config([*base, "model.gan.recon_warmup_steps=0"])) == 1200


def test_recon_weight_needs_a_condition_and_a_known_distance_in_one_line():
    base = ["experiment=mnist_gan"]
    with pytest.raises(ConfigError, match=r"model.gan.recon_weight: pulls each row's image toward its pair"):
        validate(
            compose_config(
                [*base, "model.condition=none", "model.gan.aux_weight=0", "model.gan.recon_weight=1"]
            )
        )
    with pytest.raises(ConfigError, match=r"model.gan.recon_loss"):
        validate(compose_config([*base, "model.gan.recon_weight=1", "model.gan.recon_loss=huber"]))
    with pytest.raises(ConfigError, match=r"model.gan.recon_weight: must be >= 0"):
        validate(compose_config([*base, "model.gan.recon_weight=-1"]))
    with pytest.raises(
        ConfigError, match=r"model.gan.recon_warmup_steps: regresses each row's image on its condition"
    ):
        validate(
            compose_config(
                [*base, "model.condition=none", "model.gan.aux_weight=0", "model.gan.recon_warmup_steps=5"]
            )
        )
    with pytest.raises(
        ConfigError, match=r"model.gan.recon_warmup_steps: cannot follow the class-head warm-up under DDP"
    ):
        validate(
            compose_config(
                [*base, "trainer=ddp_cpu", "model.gan.recon_warmup_steps=5", "model.gan.aux_warmup_steps=5"]
            )
        )
    with pytest.raises(ConfigError, match=r"model.gan.recon_warmup_lr: must be > 0"):
        validate(compose_config([*base, "model.gan.recon_warmup_steps=5", "model.gan.recon_warmup_lr=0"]))
    validate(
        compose_config(
            [*base, "model.gan.recon_weight=1", "model.gan.recon_loss=l2", "model.gan.recon_warmup_steps=5"]
        )
    )


def test_aux_weight_needs_a_discriminator_with_a_class_head():
    model = OmegaConf.to_container(compose_config(["model=gan"]).model, resolve=True)
    model["gan"]["aux_weight"] = 1.0
    data = {"image_size": 32, "image_channels": 1, "audio_mels": 8, "audio_frames": 8, "max_text_len": 8}
    no_head = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"model.gan.aux_weight > 0 needs a discriminator with a class head"):
        AdversarialTask(model, list(SPECIALS), data, nets=(LabelG(), no_head))


def test_adc_head_learns_fakes_as_classes_of_their_own_and_g_still_renders_the_asked_class(one_thread):
    """model.gan.aux_mode=adc (ADC-GAN): D's head has a real and a fake logit per class; D learns
    G's samples of class k as fake k, G is pushed toward real k."""
    task = label_task(aux_weight=1.0, aux_mode="adc", num_classes=2)
    assert task.aux_slices == [("label", 0, 4)]
    batch = {"label": torch.tensor([0, 1, -1]), "image": torch.zeros(3, 2)}
    logits = torch.full((3, 4), -50.0)
    logits[0, 2] = logits[1, 3] = 50.0  # sure that row 0 is fake class 0 and row 1 fake class 1
    weights = torch.ones(3)
    assert float(task.class_losses(logits, batch, weights, fake=True)) == pytest.approx(0.0, abs=1e-6)
    assert float(task.class_losses(logits, batch, weights)) == pytest.approx(
        100.0, rel=1e-4
    )  # as real: wrong
    past = {"label": torch.tensor([2, 3, 2]), "image": torch.zeros(3, 2)}  # beyond num_classes: unknown
    assert float(task.class_losses(logits, past, weights)) == 0.0  # not read as fake classes 0, 1
    fit(task, 250)
    assert asked_class_accuracy(task) > 0.95  # measured 1.00
    with torch.no_grad():  # D reads G's points as fake, the real ones as real
        real = LabelledPoints().x[:512]
        fake = task.generator(torch.randn(512, 8), {"label": torch.arange(2).repeat(256)})
        says_fake = [
            float((task.discriminator.score(x, {})[1].argmax(1) >= 2).float().mean()) for x in (real, fake)
        ]
    assert says_fake[1] > says_fake[0] + 0.2, says_fake  # measured 0.59 of real, 0.97 of G's
    with pytest.raises(ConfigError, match=r"model.gan.aux_mode: must be one of \('ac', 'adc'\)"):
        validate(compose_config(["experiment=shapes_text2image_gan", "model.gan.aux_mode=tac"]))


def test_a_separate_class_head_has_its_own_features_and_learning_rate():
    """model.gan.aux_head=separate: D's class logits from a classifier that shares nothing with its
    adversarial features, in its own parameter group of D's optimizer at model.gan.aux_lr."""
    from xmodal.nn.gan import Discriminator

    shared = Discriminator(8, 32, 3, None, 16, num_classes=4)
    separate = Discriminator(8, 32, 3, None, 16, num_classes=4, aux_head="separate")
    assert shared.has_classes and separate.has_classes and separate.classes is None
    images = torch.randn(5, 3, 32, 32, requires_grad=True)
    logits, classes = separate.score(images, {})
    assert logits.shape == (5,) and classes.shape == (5, 4)
    classes.sum().backward()  # the class loss reaches none of the adversarial weights
    assert all(p.grad is None for p in [*separate.features.parameters(), *separate.head.parameters()])
    assert all(p.grad is not None for p in separate.classifier.parameters())

    cfg = compose_config(
        ["experiment=shapes_text2image_gan", "model.gan.aux_head=separate", "model.gan.aux_lr=0.003"]
    )
    model = OmegaConf.to_container(cfg.model, resolve=True)
    data = {"image_size": 32, "image_channels": 3, "audio_mels": 8, "audio_frames": 8, "max_text_len": 8}
    task = AdversarialTask(model, list(SPECIALS), data)
    _, d_opt = task.configure_optimizers()
    head = {id(p) for p in task.discriminator.classifier.parameters()}
    assert [g["lr"] for g in d_opt.param_groups] == [cfg.model.gan.d_lr, 0.003]
    assert {id(p) for p in d_opt.param_groups[1]["params"]} == head
    assert not head & {id(p) for p in d_opt.param_groups[0]["params"]}
    with pytest.raises(ConfigError, match=r"model.gan.aux_head: must be one of \('shared', 'separate'\)"):
        validate(compose_config(["experiment=shapes_text2image_gan", "model.gan.aux_head=own"]))


def left_right_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """64 uint8 images ``[64, 3, 32, 32]``: the label says which half is bright, a second
    attribute (3 classes) which of three grey levels it is."""
    labels, levels = torch.arange(64) % 2, torch.arange(64) % 3
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    for i in range(64):
        half = slice(0, 16) if labels[i] == 0 else slice(16, 32)
        images[i, :, :, half] = 85 * (1 + int(levels[i]))
    return images, labels, levels


def test_the_class_head_warms_on_real_images_and_bad_settings_are_one_line():
    """model.gan.aux_warmup_steps: the class head learns the real classes before G first asks it:
    the separate head alone, or the shared head with D's features under it; every aux label too."""
    from xmodal.nn.gan import Discriminator
    from xmodal.tasks.gan.task import warm_start_class_head

    images, labels, levels = left_right_images()
    task = label_task(aux_weight=1.0)
    task.aux_slices = [("label", 0, 2), ("level", 2, 5)]
    targets = {"label": labels, "level": levels}
    x = images.float() / 127.5 - 1
    for head in ("separate", "shared"):
        torch.manual_seed(0)
        d = Discriminator(8, 32, 3, None, 0, num_classes=5, aux_head=head)
        adversarial = [*d.head.parameters(), *(() if head == "shared" else d.features.parameters())]
        untouched = [p.detach().clone() for p in adversarial]
        with torch.no_grad():
            before = float(task.class_losses(d.class_logits(x), targets, torch.ones(64)))
        after = warm_start_class_head(
            d.class_logits, d.class_parameters(), images, targets, task.class_losses, 40, 1e-2, 0
        )
        assert after < 0.1 < before, head
        logits = d.class_logits(x)
        assert (logits[:, :2].argmax(1) == labels).all() and (logits[:, 2:].argmax(1) == levels).all(), head
        assert all(torch.equal(a, b) for a, b in zip(untouched, adversarial, strict=True)), head
    unlabelled = {"label": torch.full((64,), -1)}
    no_labels = warm_start_class_head(d.class_logits, [], images, unlabelled, task.class_losses, 1, 1e-2, 0)
    assert math.isnan(no_labels)

    base = ["experiment=shapes_text2image_gan", "model.gan.aux_warmup_steps=100"]
    validate(compose_config(base))  # the shared head and its colour slice, on one device: fine
    validate(compose_config([*base, "model.gan.aux_head=separate"]))
    validate(compose_config([*base, "model.gan.aux_weight=0", "trainer=fsdp2"]))  # no head: nothing to warm
    with pytest.raises(ConfigError, match=r"model.gan.aux_warmup_steps: must be >= 0"):
        validate(compose_config([*base, "model.gan.aux_warmup_steps=-1"]))
    with pytest.raises(ConfigError, match=r"model.gan.aux_warmup_steps: runs outside the training loop"):
        validate(compose_config([*base, "trainer=fsdp2"]))


def test_flatten_pool_gives_every_head_the_4x4_layout_and_a_bad_pool_is_one_line():
    """model.gan.d_pool=flatten: the adversarial, projection and class heads read D's last 4×4
    map cell by cell, so a swap of two cells changes what they see; sum pooling cannot see it."""
    from xmodal.nn.gan import Discriminator

    torch.manual_seed(0)
    d = {pool: Discriminator(8, 32, 3, None, 0, num_classes=3, pool=pool) for pool in ("sum", "flatten")}
    widths = {pool: (net.head.layer.in_features, net.classes.in_features) for pool, net in d.items()}
    assert widths == {"sum": (32, 32), "flatten": (512, 512)}  # 32 channels, ×16 cells when flattened
    fmap = torch.randn(2, 32, 4, 4)
    swapped = fmap.clone()
    swapped[:, :, [0, 3]] = fmap[:, :, [3, 0]]  # the top row of cells for the bottom one
    for pool, net in d.items():
        net.features = nn.Identity()  # read a map we wrote: the pooling alone is under test
        same = torch.allclose(net.pooled(fmap), net.pooled(swapped))
        assert same == (pool == "sum"), pool
    assert d["flatten"].class_logits(fmap).shape == (2, 3)
    with pytest.raises(ValueError, match=r"pool must be one of \('sum', 'flatten'\), got 'max'"):
        Discriminator(8, 32, 3, None, 0, pool="max")
    validate(compose_config(["experiment=shapes_text2image_gan", "model.gan.d_pool=flatten"]))
    with pytest.raises(ConfigError, match=r"model.gan.d_pool: must be one of \('sum', 'flatten'\)"):
        validate(compose_config(["experiment=shapes_text2image_gan", "model.gan.d_pool=max"]))


def test_aux_head_on_data_without_labels_trains_on_and_says_so_once(caplog):
    # A user's captioned photos under a shipped experiment that turns the head on: no KeyError.
    task = label_task(aux_weight=1.0)
    batch = {"image": torch.zeros(3, 2)}
    with caplog.at_level(logging.WARNING, logger="xmodal"):
        assert task.labels(batch).tolist() == [-1, -1, -1]  # left out of the head's loss
        task.labels(batch)
    warned = [r.getMessage() for r in caplog.records if "AC-GAN head learns nothing" in r.getMessage()]
    assert len(warned) == 1 and warned[0].endswith("set model.gan.aux_weight=0")
    logits = torch.randn(3, 2, requires_grad=True)
    assert float(class_loss(logits, task.labels(batch), torch.ones(3))) == 0.0


def test_mismatched_pairs_keep_each_image_and_take_the_previous_rows_condition():
    batch = {
        "image": torch.arange(3.0)[:, None],
        "label": torch.tensor([0, 1, 2]),
        "text": torch.tensor([[5, 6], [7, 8], [9, 10]]),
        "valid": torch.tensor([True, True, False]),
        "__key__": ["a", "b", "c"],
        "batch_size": 3,
    }
    rolled = rolled_conditions(batch, "image")
    assert torch.equal(rolled["image"], batch["image"]) and torch.equal(rolled["valid"], batch["valid"])
    assert rolled["label"].tolist() == [2, 0, 1] and rolled["text"][0].tolist() == [9, 10]
    assert rolled["__key__"] == ["c", "a", "b"] and rolled["batch_size"] == 3


def bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 32×32 images of a horizontal (class 0) or vertical (class 1) bar at a random place."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    images = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    where = torch.randint(4, 28, (n,), generator=gen)
    for i in range(n):
        if labels[i] == 0:
            images[i, 0, where[i] - 2 : where[i] + 2, 4:28] = 255
        else:
            images[i, 0, 4:28, where[i] - 2 : where[i] + 2] = 255
    return images, labels


def test_judge_learns_classes_it_was_never_shown_these_images_of(one_thread):
    train_images, train_labels = bars(256, seed=0)
    held_images, held_labels = bars(128, seed=1)
    judge = train_judge(train_images, train_labels, channels=1, num_classes=2, steps=60)
    assert accuracy(judge, held_images, held_labels) > 0.95
    # Unlabelled rows (-1) are not scored; none labelled at all → NaN, not a made-up figure.
    assert math.isnan(accuracy(judge, held_images, torch.full_like(held_labels, -1)))


def test_generative_metrics_report_the_judges_accuracy_beside_the_feature_classifiers(one_thread):
    images, labels = bars(64, seed=2)
    judge = train_judge(*bars(256, seed=0), channels=1, num_classes=2, steps=60)
    metrics = GenerativeMetrics(DomainClassifier(1, 2), conditional=True, judge=judge)
    real = images.float() / 127.5 - 1
    metrics.update(real, real.flip(-1).transpose(-1, -2), labels)  # every bar turned the other way
    values = metrics.compute()
    assert values["judge_real_acc"] > 0.95 and values["judge_acc"] < 0.05


def test_sample_spread_warns_on_identical_samples_only():
    torch.manual_seed(0)
    real = torch.rand(64, 1, 32, 32) * 2 - 1
    labels = torch.randint(0, 10, (64,))
    metrics = GenerativeMetrics(DomainClassifier(1, 10), conditional=True)
    metrics.update(real, real.flip(0), labels)
    healthy = metrics.compute()
    metrics.reset()
    metrics.update(real, real[:1].expand(64, -1, -1, -1) + 1e-3 * torch.randn(64, 1, 32, 32), labels)
    collapsed = metrics.compute()
    assert healthy["sample_spread"] == pytest.approx(1.0)
    assert collapsed["sample_spread"] < 0.01
    assert healthy["sample_pixel_spread"] == pytest.approx(1.0) and collapsed["sample_pixel_spread"] < 0.01
    assert collapse_warnings(healthy) == []
    assert [w.split(":")[0] for w in collapse_warnings(collapsed)] == ["GAN mode collapse"]


def test_pixel_spread_is_the_summed_pixel_variance_and_overrules_a_feature_net_that_sees_one_point():
    from xmodal.metrics.fid import PixelSpread

    images = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    spread = PixelSpread()
    spread.update(images[:3])  # in pieces, as batches (and ranks) arrive
    spread.update(images[3:])
    assert float(spread.compute()) == pytest.approx(float(images.flatten(1).double().var(0).sum()))
    # Measured on 64 px shapes: samples at different places and colours spread 0.043x in a weak
    # feature net's space and 0.53x in pixels; the grid was varied, so no warning.
    assert collapse_warnings({"sample_spread": 0.043, "sample_pixel_spread": 0.53}) == []
    (warning,) = collapse_warnings({"sample_spread": 0.043, "sample_pixel_spread": 0.02})
    assert warning.startswith(
        "GAN mode collapse: generated images spread 0.043x as much as real ones in feature space "
        "and 0.02x in pixels (all samples nearly identical)"
    )
    (points,) = collapse_warnings({"sample_spread": 0.043})  # no pixels (2-D points): features alone
    assert "feature space (all samples" in points


def test_noise_that_fools_the_classifiers_is_called_noise_and_drawn_images_are_not():
    images, labels = bars(64, seed=2)
    real = images.float() / 127.5 - 1
    metrics = GenerativeMetrics(DomainClassifier(1, 2), conditional=True)
    metrics.update(real, real.flip(-1).transpose(-1, -2), labels)  # bars, turned: as smooth as real
    drawn = metrics.compute()
    metrics.reset()
    noise = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    metrics.update(real, noise, labels)  # pixel noise, as a G fitted to a class head draws
    noisy = metrics.compute()
    assert drawn["sample_roughness"] == pytest.approx(1.0)
    assert noisy["sample_roughness"] > 2.5
    assert collapse_warnings(drawn) == []
    warnings = {w.split(":")[0]: w for w in collapse_warnings(noisy)}
    assert warnings["GAN samples are noise"].startswith(
        f"GAN samples are noise: {noisy['sample_roughness']:.1f}x as rough as real images in pixels"
    )


def test_vae_with_no_active_unit_is_called_collapsed():
    assert collapse_warnings({"active_units": 3.0, "nll": 90.0}) == []
    (warning,) = collapse_warnings({"active_units": 0.0})
    assert warning.startswith("VAE posterior collapse: 0 active latent units")


@pytest.mark.parametrize("collapsed", [True, False])
def test_captioner_collapse_warning_fires_on_one_caption_for_every_image(tiny, caplog, collapsed):
    task = build_task(compose_config(tiny), WordTokenizer.fit(["a red circle on the left"]))
    scenes = [f"a {c} {k}" for c in ("red", "green", "blue") for k in ("circle", "square", "diamond")]
    task.eval_rows = [
        (f"k{i}", "a red circle" if collapsed else scenes[i % 9], [scenes[i % 9], "another phrasing"])
        for i in range(36)
    ]
    with caplog.at_level(logging.WARNING, logger="xmodal"):
        task._log_caption_metrics("val")
    warnings = [r.getMessage() for r in caplog.records if "collapse" in r.getMessage()]
    if collapsed:
        assert warnings == [
            "val at step 0: captioner collapse: 1 distinct caption(s) for inputs whose references hold 9; "
            "it ignores its input. Try: check the inputs differ (xmodal-shards inspect), train longer, "
            "lower model.lr, raise model.dropout, or more / more varied data"
        ]
    else:
        assert warnings == []


class Line(L.LightningModule):
    """y = w·x on a fixed target: SGD moves w every step, so raw and EMA weights differ."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen_in_validation: list[float] = []

    def training_step(self, batch, batch_idx):
        return ((self.w * batch[0] - 3 * batch[0]) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(float(self.w))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def line_trainer(tmp_path, ema: EMAWeights, steps: int) -> tuple[L.Trainer, ModelCheckpoint]:
    # Saved at the end of each validation, as best.ckpt and last.ckpt are.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="v", save_on_train_epoch_end=False)
    trainer = L.Trainer(
        max_steps=steps,
        val_check_interval=4,
        callbacks=[ema, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return trainer, checkpoint


def line_data() -> DataLoader:
    x = torch.ones(8, 1)
    return DataLoader(torch.utils.data.TensorDataset(x), batch_size=1)


def test_ema_weights_are_what_validation_sees_and_checkpoints_hold_and_resume_trains_the_raw_ones(tmp_path):
    model, ema = Line(), EMAWeights(0.9)
    trainer, _ = line_trainer(tmp_path, ema, steps=8)
    trainer.fit(model, line_data(), line_data())
    raw = float(model.w)
    # Validation ran on the EMA weights, which lag the raw ones; the raw ones are back after it.
    assert model.seen_in_validation[-1] == pytest.approx(float(ema.shadow["w"]))
    assert abs(raw - float(ema.shadow["w"])) > 0.05
    state = torch.load(tmp_path / "v.ckpt", weights_only=False)
    saved = state["callbacks"]["EMAWeights"]
    assert float(state["state_dict"]["w"]) == pytest.approx(float(saved["shadow"]["w"]))  # exported: EMA
    assert float(saved["raw"]["w"]) == pytest.approx(raw)
    # Resume: training goes on from the raw weights (not the EMA ones in the state_dict)...
    resumed, resumed_ema = Line(), EMAWeights(0.9)
    trainer, _ = line_trainer(tmp_path / "r", resumed_ema, steps=12)
    starts: list[float] = []

    class FirstWeights(L.Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(float(pl_module.w))

    trainer.callbacks.append(FirstWeights())
    trainer.fit(resumed, line_data(), line_data(), ckpt_path=tmp_path / "v.ckpt")
    assert starts == [pytest.approx(raw)] and resumed_ema.updates == 12  # ...and the EMA goes on too


def test_ema_decay_is_a_model_key_of_every_task_but_the_gan(tmp_path):
    from xmodal.factory import build_callbacks
    from xmodal.run import RunIdentity

    run = RunIdentity(id="x", dir=tmp_path, fresh=True)
    callbacks, _ = build_callbacks(compose_config(["model.ema_decay=0.999"]), run, has_logger=False)
    assert isinstance(callbacks[-1], EMAWeights)
    with pytest.raises(ConfigError, match=r"model.ema_decay: the GAN averages its generator itself"):
        validate(compose_config(["experiment=mnist_gan", "model.ema_decay=0.9"]))


def test_diffaugment_moves_and_cuts_images_alike_for_a_seed_and_passes_gradients():
    x = torch.zeros(16, 1, 32, 32)
    x[:, :, 16, 16] = 1.0  # one lit pixel per image
    x.requires_grad_(True)
    moved = diff_augment(x, ["translation"], torch.Generator().manual_seed(3))
    where = moved.detach()[:, 0].flatten(1).argmax(1)  # [B] flat index of the lit pixel
    dy, dx = where // 32 - 16, where % 32 - 16
    assert moved.detach().sum(dim=(1, 2, 3)).tolist() == [1.0] * 16  # moved, never lost (4 ≤ 16 px)
    assert int(dy.abs().max()) <= 4 and int(dx.abs().max()) <= 4 and bool((dy != 0).any())
    again = diff_augment(x, ["translation"], torch.Generator().manual_seed(3))
    assert torch.equal(moved, again)  # a seed: the same shifts (a resume augments alike)
    moved.sum().backward()
    assert x.grad is not None and x.grad[:, 0, 16, 16].tolist() == [1.0] * 16  # G's gradient passes through
    cut = diff_augment(torch.ones(8, 3, 32, 32), ["cutout"], torch.Generator().manual_seed(0))
    zeroed = (cut[:, 0] == 0).flatten(1).sum(1)  # [B] pixels cut per image
    assert int(zeroed.max()) == 16 * 16 and int(zeroed.min()) > 0  # a 16 px square, edges clip it
    assert torch.equal(cut[:, 0], cut[:, 2])  # every channel of a pixel alike


def test_diffaugment_ops_are_checked_by_name():
    with pytest.raises(ConfigError, match=r"model.gan.diffaugment: ops must be among \('translation'"):
        validate(compose_config(["experiment=mnist_gan", "model.gan.diffaugment=[flip]"]))


def test_a_text_to_image_vae_is_judged_like_the_gan_and_keeps_the_judge_out_of_its_weights(tiny, tmp_path):
    from xmodal.train import train

    args = [*tiny, "experiment=shapes_text2image_vae", "model.vae.judge_steps=30", "model.vae.iwae_k=2"]
    args += ["trainer.max_steps=2", "trainer.val_check_interval=2", "logger=none", "run.id=j"]
    metrics = train(compose_config(args))
    judged = {k: v for k, v in metrics.items() if "judge" in k}
    # The kind of the first shape, and (model.vae.judge_labels) its colour, by a judge each.
    assert set(judged) == {
        f"{stage}/judge{attribute}_{which}"
        for stage in ("val", "test")
        for attribute in ("", "_colour")
        for which in ("acc", "real_acc")
    }
    assert all(0.0 <= v <= 1.0 for v in judged.values())
    ckpt_dir = tmp_path / "outputs" / "shapes_text2image_vae" / "j" / "checkpoints"
    ckpt = torch.load(
        ckpt_dir / "last.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    assert not [k for k in ckpt["state_dict"] if "judge" in k]  # xmodal-eval loads it strictly
    provenance = json.loads((ckpt_dir.parent / "metrics_provenance.json").read_text())
    assert provenance["test"]["judge_colour"]["metrics"] == ["judge_colour_acc", "judge_colour_real_acc"]
    colour, kind = provenance["test"]["judge_colour"], provenance["test"]["judge"]
    assert colour["weights_sha256"] != kind["weights_sha256"]
    # Without judge_steps (or without a condition) nothing is judged.
    plain = train(compose_config([*args[:-1], "model.vae.judge_steps=0", "run.id=k", "test_after_fit=false"]))
    assert not [k for k in plain if "judge" in k]


def test_attribute_judges_score_beside_the_class_judge_each_with_its_own_labels_and_provenance(one_thread):
    images, labels = bars(64, seed=2)
    judge = train_judge(*bars(256, seed=0), channels=1, num_classes=2, steps=60)
    # The "colour" judge is the bars judge read against the opposite labels, so its figures are
    # the class judge's turned over: what each judge scores is its own role's labels.
    metrics = GenerativeMetrics(
        DomainClassifier(1, 2), conditional=True, judge=judge, attribute_judges={"colour": judge}
    )
    real = images.float() / 127.5 - 1
    flipped = real.flip(-1).transpose(-1, -2)  # every bar turned the other way
    metrics.update(real, flipped, labels, {"colour": 1 - labels})
    values = metrics.compute()
    judged = {k for k in values if k.startswith("judge")}
    assert judged == {"judge_acc", "judge_real_acc", "judge_colour_acc", "judge_colour_real_acc"}
    assert values["judge_real_acc"] > 0.95 and values["judge_acc"] < 0.05
    assert values["judge_colour_real_acc"] < 0.05 and values["judge_colour_acc"] > 0.95
    records = metrics.provenance("val", 32, "resize")
    assert set(records) == {"features", "judge", "judge_colour"}
    assert records["judge_colour"]["metrics"] == ["judge_colour_acc", "judge_colour_real_acc"]
    colour = records["judge_colour"]
    assert (colour["reference_samples"], colour["generated_samples"]) == (64, 64)
    # Rows without the attribute's labels are left out, not counted as misses.
    metrics.reset()
    metrics.update(real, flipped, labels)
    assert math.isnan(metrics.compute()["judge_colour_acc"])
    assert metrics.counts["judge_colour"] == (0, 0) and metrics.counts["judge"] == (64, 64)


def test_the_colour_role_reads_each_shapes_samples_first_colour_from_its_json(tiny):
    import json

    from xmodal.data.shapes import COLOURS
    from xmodal.data.shards import iter_shard
    from xmodal.factory import decode_spec, prepare_data
    from xmodal.metrics.features import load_split, load_split_labels

    cfg = compose_config([*tiny, "experiment=shapes_text2image_gan", "data.image_size=16"])
    data_path = prepare_data(cfg)
    spec = decode_spec(cfg)
    assert "colour" in spec.optional  # model.gan.judge_labels decodes its role, skipping nothing
    _, colours = load_split(data_path, "val", spec, label_role="colour")
    _, kinds = load_split(data_path, "val", spec)
    shards = sorted((data_path / "val").glob("*.tar"))
    metas = [json.loads(raw["json"]) for shard in shards for raw in iter_shard(str(shard))]
    assert colours.tolist() == [list(COLOURS).index(m["shapes"][0]["colour"]) for m in metas]
    assert kinds.tolist() == [m["label"] for m in metas] and len(set(colours.tolist())) > 2
    # The class head's warm-up reads both in one pass: the same images, a label per role.
    images, both = load_split_labels(data_path, "val", spec, ("label", "colour"))
    assert torch.equal(images, load_split(data_path, "val", spec)[0])
    assert torch.equal(both["label"], kinds) and torch.equal(both["colour"], colours)


GAN_T2I = "experiment=shapes_text2image_gan"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [GAN_T2I, "+model.gan.judge_labels.size=2"],
            "model.gan.judge_labels.size: needs data.roles.size: label (read from key.size.cls or 'size' "
            "in each sample's JSON) (got data.roles.size=None)",
        ),
        (
            [GAN_T2I, "model.gan.judge_labels.colour=1"],
            "model.gan.judge_labels.colour: the number of classes must be an integer >= 2 (got 1)",
        ),
        (
            [GAN_T2I, "+model.gan.judge_labels.label=4"],
            "model.gan.judge_labels.label: the class label (model.num_classes) is covered already; list "
            "other label roles here",
        ),
        # A monitored judge metric the run will not log: Lightning's checkpoint callback would
        # refuse it only at the first validation, after the judges' and the model's training.
        (
            [GAN_T2I, "model.gan.judge_steps=0"],
            "callbacks.monitor: val/judge_colour_acc is a judge metric, and the judge is off "
            "(needs model.gan.judge_steps > 0 and a model.condition)",
        ),
        (
            [GAN_T2I, "callbacks.monitor=val/judge_color_acc"],
            "callbacks.monitor: the judges log ['val/judge_acc', 'val/judge_real_acc', "
            "'val/judge_colour_acc', 'val/judge_colour_real_acc'] (got 'val/judge_color_acc')",
        ),
        (
            [
                "experiment=shapes_text2image_vae",
                "callbacks.monitor=val/judge_acc",
                "model.vae.judge_steps=0",
            ],
            "callbacks.monitor: val/judge_acc is a judge metric, and the judge is off "
            "(needs model.vae.judge_steps > 0, a model.condition and an image target)",
        ),
        (
            [
                "experiment=shapes_text2audio_vae",
                "model.vae.judge_steps=10",
                "callbacks.monitor=val/judge_acc",
            ],
            "callbacks.monitor: val/judge_acc is a judge metric, and the judge is off "
            "(needs model.vae.judge_steps > 0, a model.condition and an image target)",
        ),
    ],
)
def test_judge_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert message in [line.strip() for line in str(err.value).splitlines()]


def test_the_shipped_text_to_image_gan_keeps_the_checkpoint_that_draws_the_named_colour_best():
    cfg = compose_config(["experiment=shapes_text2image_gan"])
    validate(cfg)
    assert (cfg.callbacks.monitor, cfg.callbacks.monitor_mode) == ("val/judge_colour_acc", "max")
    vae = [
        "experiment=shapes_text2image_vae",
        "callbacks.monitor=val/judge_colour_acc",
        "callbacks.monitor_mode=max",
    ]
    validate(compose_config(vae))  # the VAE's colour judge is on as shipped


def test_an_attribute_judges_metric_names_belong_to_its_own_provenance_family():
    from xmodal.metrics.provenance import family_of, judge_names

    assert judge_names("label") == ("judge_acc", "judge_real_acc")
    assert judge_names("bg_colour") == ("judge_bg_colour_acc", "judge_bg_colour_real_acc")
    assert family_of("val/judge_real_acc") == "judge" and family_of("best test/judge_acc") == "judge"
    assert family_of("val/judge_colour_real_acc") == family_of("test/judge_colour_acc") == "judge_colour"
    assert family_of("val/judge_bg_colour_acc") == "judge_bg_colour" and family_of("val/loss") is None


def test_a_label_role_reads_its_own_cls_member_or_its_own_json_field():
    from xmodal.data.batch import DecodeSpec, decode_sample

    spec = DecodeSpec(
        required=(), optional=("colour", "style"), roles=(("colour", "label"), ("style", "label"))
    )
    raw = {"__key__": "a", "style.cls": b"3\n", "json": b'{"colour": 2, "label": 1}'}
    sample = decode_sample(raw, spec, train=False)
    assert (sample["style"], sample["colour"], sample["label"]) == (3, 2, 1)
    bare = decode_sample({"__key__": "b", "json": b'{"label": 1}'}, spec, train=False)
    assert (bare["colour"], bare["colour_present"], bare["style_present"]) == (-1, False, False)


def test_aux_labels_give_each_attribute_its_own_slice_of_the_class_head_and_its_own_loss():
    from xmodal.nn.gan import Discriminator, aux_classes, aux_slices
    from xmodal.tasks.gan.config import GanModelConfig

    cfg = compose_config(["experiment=shapes_text2image_gan"])  # the shipped head: kind and colour
    model = GanModelConfig.from_node(cfg.model)
    # model.num_classes (10: the shapes kinds use 4 of them), then the 6 colours.
    assert aux_slices(model) == [("label", 0, 10), ("colour", 10, 16)] and aux_classes(model) == 16
    assert set(model.optional_roles()) == {"colour"}  # decoded for the head (and the colour judge)
    d = Discriminator(8, 32, 3, None, 0, num_classes=aux_classes(model))
    assert d.classes.out_features == 16

    task = label_task(aux_weight=1.0)
    task.aux_slices = [("label", 0, 2), ("colour", 2, 5)]
    weights = torch.ones(4)
    logits = torch.zeros(4, 5)
    logits[torch.arange(4), torch.tensor([0, 1, 0, 1])] = 50.0  # the label slice right and sure
    batch = {
        "label": torch.tensor([0, 1, 0, 1]),
        "colour": torch.tensor([2, 0, 1, -1]),
        "image": torch.zeros(4, 2),
    }
    # The colour slice is uniform over 3: ln 3 on each of the three rows that have a colour.
    assert float(task.class_losses(logits, batch, weights)) == pytest.approx(math.log(3), rel=1e-5)
    logits[torch.arange(3), 2 + torch.tensor([2, 0, 1])] = 50.0
    assert float(task.class_losses(logits, batch, weights)) == pytest.approx(0.0, abs=1e-6)
    del batch["colour"]  # data without the attribute: its loss is 0, the label's remains
    assert float(task.class_losses(logits, batch, weights)) == pytest.approx(0.0, abs=1e-6)


def test_aux_labels_need_label_roles_in_one_line():
    def problems(*overrides: str) -> list[str]:
        with pytest.raises(ConfigError) as err:
            validate(compose_config(["experiment=shapes_text2image_gan", *overrides]))
        return [line.strip() for line in str(err.value).splitlines()]

    assert (
        "model.gan.aux_labels.size: needs data.roles.size: label (read from key.size.cls or 'size' in each "
        "sample's JSON) (got data.roles.size=None)"
    ) in problems("+model.gan.aux_labels.size=2")
