"""An independent judge of conditional generation: a classifier that never served as FID features.

Conditional accuracy scored by the FID feature classifier (:mod:`xmodal.metrics.features`) grades
the generator with the very net whose feature space FID is measured in; a generator can learn that
net's quirks. The judge is a second classifier with its own architecture (strided convs, flattened
features, dropout), its own training recipe (random shifts, longer schedule) and its own seed, trained
on the train split's labels and checked on the *test* split (``real_acc``: the ceiling of
``judge_acc``). It is cached like the feature classifier, keyed by everything its weights depend on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from xmodal.data.datamodule import DecodeSpec
from xmodal.metrics.features import (
    DEFAULT_LABEL_ROLE,
    DEFAULT_ROLE,
    RunData,
    accuracy,
    cache_dir,
    cache_key,
    label_counts,
    load_cached_net,
    load_split,
    run_splits,
    save_cached_net,
)
from xmodal.metrics.provenance import judge_family, judge_names, scorer_record

log = logging.getLogger("xmodal")

JUDGE_VERSION = 1
JUDGE_SEED = 7919
"""Not the feature classifier's seed (0): its init and batches differ too."""


class JudgeNet(nn.Module):
    """Images ``[B, C, H, W]`` in [-1, 1] → class logits ``[B, K]`` (strided convs: ~25 ms a step on one CPU thread)."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 5, stride=2, padding=2),  # 16 px
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # 8 px
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),  # 4 px
            nn.ReLU(),
            # Flattened, not pooled: where a stroke sits tells digits (and shape kinds) apart.
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(2 * width * 16, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()  # [B, C, H, W]
        if x.shape[-1] > 32:
            x = F.adaptive_avg_pool2d(x, 32)  # [B, C, 32, 32]: class evidence survives, 4x cheaper
        return self.net(x)  # [B, K]

    classify = forward


def random_shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Each image ``[B, C, H, W]`` moved by up to ``pixels`` in x and y (edge-padded)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * pixels + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pixels + 1, (b,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def train_judge(
    images: torch.Tensor, labels: torch.Tensor, channels: int, num_classes: int, steps: int
) -> JudgeNet:
    """AdamW with a cosine schedule on labelled rows of uint8 ``images [N, C, H, W]``; own RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(JUDGE_SEED)
        net = JudgeNet(channels, num_classes)
    keep = (labels >= 0) & (labels < num_classes)
    x_all, y_all = images[keep], labels[keep]
    gen = torch.Generator().manual_seed(JUDGE_SEED)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    net.train()
    started = last_report = time.monotonic()
    for step in range(steps):
        idx = torch.randint(len(x_all), (64,), generator=gen)
        x = random_shift(x_all[idx].float() / 127.5 - 1.0, 2, gen)  # [64, C, H, W]
        loss = F.cross_entropy(net(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if time.monotonic() - last_report > 15:  # a first GAN run otherwise looks frozen here
            last_report = time.monotonic()
            log.info(
                "judge classifier: step %d/%d, loss %.3f (%.0f s)",
                step,
                steps,
                float(loss.detach()),
                last_report - started,
            )
    return net.eval()


def judge_path(
    data: RunData,
    spec: DecodeSpec,
    num_classes: int,
    steps: int,
    role: str,
    label_role: str = DEFAULT_LABEL_ROLE,
) -> Path:
    key = cache_key(data, spec, num_classes, steps, JUDGE_SEED, role, label_role)
    return cache_dir() / f"judge-v{JUDGE_VERSION}-{key}.pt"


def judge_classifier(
    data: RunData,
    spec: DecodeSpec,
    num_classes: int,
    steps: int,
    allow_pipe: bool = False,
    train_if_missing: bool = True,
    role: str = DEFAULT_ROLE,
    label_role: str = DEFAULT_LABEL_ROLE,
) -> tuple[JudgeNet, dict[str, Any]] | None:
    """The cached judge and its record (``real_acc`` on the test split, or on val without one),
    trained and cached atomically on a miss; None on a miss with ``train_if_missing=False``, or
    when the train split has no labels (nothing to judge against). ``data``: the run's splits
    (every source of a mix, its explicit val/test shards), or a data dir with default settings.
    ``label_role``: the attribute judged (``label``: the class; ``colour``: a role of the label
    modality in ``spec.roles``)."""
    splits = run_splits(data, allow_pipe)
    path = judge_path(splits, spec, num_classes, steps, role, label_role)
    net = JudgeNet(spec.image_channels, num_classes)
    cached = load_cached_net(path, net)
    if cached is not None:
        return net, cached
    if not train_if_missing:
        return None
    images, labels = load_split(
        splits, "train", spec, allow_pipe=allow_pipe, role=role, label_role=label_role
    )
    if not bool((labels >= 0).any()):
        return None
    log.info("training the %s judge classifier (%d steps, cached at %s)", label_role, steps, path)
    net = train_judge(images, labels, spec.image_channels, num_classes, steps)
    info: dict[str, Any] = {
        "steps": steps,
        "labelled": int((labels >= 0).sum()),
        "labels": label_counts(labels),
    }
    for split in ("test", "val"):
        try:
            held_images, held_labels = load_split(
                splits, split, spec, allow_pipe=allow_pipe, role=role, label_role=label_role
            )
        except (ValueError, KeyError, OSError):
            continue
        info.update(real_acc=accuracy(net, held_images, held_labels), real_acc_split=split)
        break
    log.info("%s judge classifier trained on %s: %s", label_role, splits.spec, info)
    save_cached_net(path, net, info)
    return net, info


class JudgeScore:
    """One judge's accuracies over an evaluation pass, exact over ranks: each generated row's
    class (``judge_acc``, or ``judge_<label_role>_acc``) and each real row's (its ceiling) against
    the row's label of ``label_role``. A plain object: the net and states stay out of checkpoints."""

    def __init__(self, net: nn.Module, label_role: str = DEFAULT_LABEL_ROLE):
        self.net = net.eval().requires_grad_(False)
        self.label_role = label_role
        self.names = judge_names(label_role)
        self.family = judge_family(label_role)
        self.acc = MeanMetric()
        self.real_acc = MeanMetric()

    def to(self, device: torch.device | str) -> JudgeScore:
        self.net.to(device)
        self.acc.to(device)
        self.real_acc.to(device)
        return self

    @torch.no_grad()
    def update(self, real: torch.Tensor | None, fake: torch.Tensor | None, labels: torch.Tensor) -> None:
        """``real``/``fake`` ``[N, C, H, W]`` in [-1, 1] (either may be None: not scored), ``labels``
        ``[N]`` (-1 = none). Call it on every rank, even with no rows: the reduction needs every rank."""
        known = labels >= 0  # [N]
        for images, metric in ((real, self.real_acc), (fake, self.acc)):
            if images is not None:
                metric.update((self.net(images[known].float()).argmax(1) == labels[known]).float())

    def weights(self) -> torch.Tensor:
        """Rows scored so far on this rank: (real, generated), float64 ``[2]``."""
        return torch.stack([self.real_acc.weight.detach().double(), self.acc.weight.detach().double()])

    def results(self, conditional: bool = True) -> dict[str, float]:
        """The accuracies over every rank (a collective call); the generated one only when ``conditional``."""
        out = {self.names[1]: float(self.real_acc.compute())}
        if conditional:
            out[self.names[0]] = float(self.acc.compute())
        return out

    def record(
        self,
        split: str,
        real: int,
        fake: int,
        image_size: int | None,
        image_fit: str | None,
        conditional: bool = True,
    ) -> dict[str, Any]:
        """This judge's provenance record (:mod:`xmodal.metrics.provenance`) on a split's counts."""
        names = list(self.names) if conditional else [self.names[1]]
        return scorer_record(self.net, names, split, real, fake, image_size, image_fit)

    def reset(self) -> None:
        self.acc.reset()
        self.real_acc.reset()
