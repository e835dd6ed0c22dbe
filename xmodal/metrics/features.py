"""Offline FID/KID features: a small domain classifier trained on the dataset's train split.

InceptionV3 weights are a download (torch-fidelity fetches them on first use) and were trained on
photos, not on 32 px digits or procedural shapes. A classifier trained on the dataset's own labels
needs nothing from the network, takes seconds on a CPU, and its penultimate layer is a feature
space where the dataset's classes are separated; its logits also score generated samples against
their conditions (conditional accuracy). FID values are therefore comparable only between runs
with the same feature extractor (same data and settings): the cache key records exactly that.

It reads the run's own splits (``ShardDataModule.data``: its carving, ``data.val_shards``, every
source of ``data.sources``), never a default view of one directory: trained on a bounded sample of
the run's train split, in which every source of a mix gets an equal share (capped at its size, the
rest given to the others: a small source's classes are learnt too), and checked on its val split.
The real images FID compares with are the val loader's batches (the task's evaluation steps), i.e.
that same val split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.data.carve import kept
from xmodal.data.datamodule import DecodeSpec, decode_sample
from xmodal.data.shards import iter_shard
from xmodal.data.splits import DataSplits, SplitSettings, resolve_splits

log = logging.getLogger("xmodal")

FEATURES_VERSION = 2
"""2: keyed by the run's splits (every source's shards and counts), a mix sampled per source."""
MAX_TRAIN_SAMPLES = 5000
PROGRESS_S = 10.0
"""Seconds between progress lines while the classifier trains (a first run on new data trains it
before the GAN's first step, for minutes on a CPU: silence there looks like a hang)."""


class DomainClassifier(nn.Module):
    """Images ``[B, C, H, W]`` in [-1, 1] → features ``[B, num_features]`` (``forward``, what
    torchmetrics' FID/KID call) and class logits ``[B, K]`` (``classify``).

    No batch norm: the same weights give the same features in train and eval mode, and the
    metric's ``.train()``/``.eval()`` calls cannot change them.
    """

    def __init__(self, channels: int, num_classes: int, width: int = 16, num_features: int = 64):
        super().__init__()
        self.num_features = num_features
        # Images above 32 px are average-pooled to 32 first: class evidence (digit, shape kind,
        # colour) survives and a step costs ~15x less on a CPU.
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(4 * width, num_features, 3, padding=1),
            nn.GELU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()  # [B, C, H, W]
        if x.shape[-1] > 32:
            x = F.adaptive_avg_pool2d(x, 32)  # [B, C, 32, 32]
        return self.net(x).mean(dim=(2, 3))  # [B, F]

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))  # [B, K]


def cache_dir() -> Path:
    """``$XMODAL_CACHE_DIR/features`` or ``~/.cache/xmodal/features`` (never the data dir: user
    shards may be read-only)."""
    root = os.environ.get("XMODAL_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "xmodal") / "features"


DEFAULT_ROLE = "image"
DEFAULT_LABEL_ROLE = "label"
"""The class every classifier learns unless told otherwise (a judge of ``judge_labels`` reads another)."""

RunData: TypeAlias = "DataSplits | str | os.PathLike[str]"
"""What the classifiers read: the run's resolved splits, or a data dir read with default settings."""


def run_splits(data: RunData, allow_pipe: bool = False) -> DataSplits:
    """``data`` as splits: the run's own (a :class:`DataSplits`, e.g. ``ShardDataModule.data``) as
    they are, a path resolved with the default settings."""
    if isinstance(data, DataSplits):
        return data
    return resolve_splits(os.fspath(data), SplitSettings(allow_pipe=allow_pipe))


def data_identity(data: DataSplits) -> list[Any]:
    """Every shard of the train, val and test splits as [split, url, file bytes (local files),
    samples, carved key range]: another source, shard, count or carve is another identity."""
    rows: list[Any] = []
    for split in ("train", "val", "test"):
        for sh in data.splits.get(split, []):
            local = "://" not in sh.url and not sh.url.startswith("pipe:")
            url = os.path.abspath(sh.url) if local else sh.url
            size = os.stat(sh.url).st_size if local and os.path.isfile(sh.url) else None
            rows.append([split, url, size, sh.num_samples, list(sh.keep) if sh.keep else None])
    return rows


def cache_key(
    data: RunData,
    spec: DecodeSpec,
    num_classes: int,
    steps: int,
    seed: int,
    role: str = DEFAULT_ROLE,
    label_role: str = DEFAULT_LABEL_ROLE,
) -> str:
    """Digest of everything the classifier's weights depend on: the data (every shard of every
    split and source the run reads, with its size and count), the image role and decoded shape,
    the label role and classes, the training length and seed, and this code's version."""
    identity = json.dumps(data_identity(run_splits(data))).encode()
    payload = {
        "data": hashlib.sha256(identity).hexdigest(),
        "image": [spec.image_size, spec.image_channels, spec.image_fit],
        "classes": num_classes,
        "steps": steps,
        "seed": seed,
        "version": FEATURES_VERSION,
    }
    if role != DEFAULT_ROLE:
        payload["role"] = role
    if label_role != DEFAULT_LABEL_ROLE:  # absent for the kind label: cached nets keep their keys
        payload["label_role"] = label_role
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def even_shares(limit: int, sizes: list[int]) -> list[int]:
    """``limit`` split as evenly as ``sizes`` allow: a group smaller than its share gives all it
    has and the rest goes to the others (sum = min(limit, sum(sizes)))."""
    shares = [0] * len(sizes)
    left = limit
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for done, i in enumerate(order):
        shares[i] = min(sizes[i], left // (len(sizes) - done))
        left -= shares[i]
    if left and order:  # the floor's remainder, where there is room
        for i in reversed(order):
            extra = min(left, sizes[i] - shares[i])
            shares[i] += extra
            left -= extra
    return shares


def load_split(
    data: RunData,
    split: str,
    spec: DecodeSpec,
    limit: int = MAX_TRAIN_SAMPLES,
    allow_pipe: bool = False,
    role: str = DEFAULT_ROLE,
    label_role: str = DEFAULT_LABEL_ROLE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``limit`` decodable samples of a split: uint8 images ``[N, C, H, W]`` of ``role``
    (``tgt`` of paired data, through ``spec.roles``), labels ``[N]`` of ``label_role`` (``label``,
    or another role of the label modality in ``spec.roles``, e.g. ``colour``). One source: its first
    samples in shard order; several (``data.sources``): each source's first samples, the limit
    shared evenly over the sources (``even_shares``)."""
    images, labels = load_split_labels(data, split, spec, (label_role,), limit, allow_pipe, role)
    return images, labels[label_role]


def load_split_labels(
    data: RunData,
    split: str,
    spec: DecodeSpec,
    label_roles: tuple[str, ...],
    limit: int = MAX_TRAIN_SAMPLES,
    allow_pipe: bool = False,
    role: str = DEFAULT_ROLE,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``load_split`` with a label per role of ``label_roles`` for the same images, in one pass
    over the shards: uint8 images ``[N, C, H, W]`` and role → labels ``[N]``."""
    spec = DecodeSpec(
        image_size=spec.image_size,
        image_channels=spec.image_channels,
        required=(role,),
        optional=tuple(r for r in label_roles if r != DEFAULT_LABEL_ROLE),
        max_pixels=spec.max_pixels,
        image_fit=spec.image_fit,
        roles=spec.roles,
    )
    splits = run_splits(data, allow_pipe)
    shards = splits.shards(split)
    groups = splits.groups.get(split) or (len(shards),)
    starts = [sum(groups[:g]) for g in range(len(groups))]
    members = [shards[start : start + n] for start, n in zip(starts, groups, strict=True)]
    shares = even_shares(limit, [sum(sh.num_samples for sh in group) for group in members])
    images: list[torch.Tensor] = []
    labels: dict[str, list[int]] = {r: [] for r in label_roles}
    for group, share in zip(members, shares, strict=True):
        taken = 0
        for shard in group:
            if taken >= share:
                break
            for raw in kept(iter_shard(shard.url, allow_pipe), shard.keep):
                try:
                    sample = decode_sample(raw, spec, train=False)
                except ValueError:
                    continue
                images.append(sample[role])
                for r in label_roles:
                    labels[r].append(sample[r])
                taken += 1
                if taken >= share:
                    break
    if not images:
        raise ValueError(f"split {split!r} of {splits.spec} has no decodable image for the FID classifier")
    return torch.stack(images), {r: torch.tensor(v, dtype=torch.long) for r, v in labels.items()}


def label_counts(labels: torch.Tensor) -> dict[str, int]:
    """Samples per label (``-1``: none), for the classifiers' records."""
    return {str(k): v for k, v in sorted(Counter(labels.tolist()).items())}


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    channels: int,
    num_classes: int,
    steps: int,
    seed: int,
    progress_s: float = PROGRESS_S,
) -> tuple[DomainClassifier, dict[str, Any]]:
    """Adam on cross-entropy over labelled rows, own RNG (the global one is the training run's).
    Logs a progress line (step, loss) at most every ``progress_s`` seconds.

    Without labels (user shards with none) the classifier stays at its seeded random init: random
    conv features still rank FID sensibly, but conditional accuracy is then meaningless.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DomainClassifier(channels, num_classes)
    labelled = (labels >= 0) & (labels < num_classes)
    info: dict[str, Any] = {"labelled": int(labelled.sum()), "steps": 0}
    if not bool(labelled.any()):
        log.warning("no labels in the train split: FID/KID use an untrained (random) feature extractor")
        return net.eval(), info
    x_all, y_all = images[labelled], labels[labelled]
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    last = time.monotonic()
    for step in range(1, steps + 1):
        idx = torch.randint(len(x_all), (64,), generator=rng)
        x = x_all[idx].float() / 127.5 - 1.0  # [64, C, H, W]
        # Light noise so features react smoothly to off-manifold (generated) images.
        x = x + 0.05 * torch.randn(x.shape, generator=rng)
        loss = F.cross_entropy(net.classify(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if time.monotonic() - last >= progress_s and step < steps:
            last = time.monotonic()
            log.info("FID feature classifier: step %d/%d, loss %.3f", step, steps, float(loss.detach()))
    info["steps"] = steps
    info["final_loss"] = float(loss.detach())
    return net.eval(), info


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of labelled uint8 ``images`` that ``net.classify`` gives their label (NaN: no labels)."""
    keep = labels >= 0
    if not bool(keep.any()):
        return float("nan")
    correct = 0
    for start in range(0, int(keep.sum()), 256):
        x = images[keep][start : start + 256].float() / 127.5 - 1.0
        correct += int((net.classify(x).argmax(1) == labels[keep][start : start + 256]).sum())
    return correct / int(keep.sum())


def domain_classifier(
    data: RunData,
    spec: DecodeSpec,
    num_classes: int,
    steps: int,
    seed: int = 0,
    allow_pipe: bool = False,
    train_if_missing: bool = True,
    role: str = DEFAULT_ROLE,
    progress_s: float = PROGRESS_S,
) -> DomainClassifier | None:
    """The cached classifier for this data (the run's splits, ``run_splits``), image role and
    settings, trained (and cached atomically) on a miss.

    With ``train_if_missing=False`` a miss returns None (other ranks wait for rank zero's file).
    """
    splits = run_splits(data, allow_pipe)
    path = cache_dir() / f"{cache_key(splits, spec, num_classes, steps, seed, role)}.pt"
    net = DomainClassifier(spec.image_channels, num_classes)
    if load_cached_net(path, net) is not None:
        return net
    if not train_if_missing:
        return None
    log.info("training the FID feature classifier: %d steps, cached at %s", steps, path)
    start = time.monotonic()
    images, labels = load_split(splits, "train", spec, allow_pipe=allow_pipe, role=role)
    net, info = train_classifier(images, labels, spec.image_channels, num_classes, steps, seed, progress_s)
    info["samples"] = len(labels)
    info["labels"] = label_counts(labels)
    try:
        val_images, val_labels = load_split(splits, "val", spec, limit=1000, allow_pipe=allow_pipe, role=role)
        info["val_accuracy"] = accuracy(net, val_images, val_labels)
    except ValueError:
        info["val_accuracy"] = None
    accuracy_text = (
        "none (no labelled val data)" if info["val_accuracy"] is None else f"{info['val_accuracy']:.3f}"
    )
    log.info(
        "FID feature classifier trained in %.0f s: val accuracy %s (%s; %s)",
        time.monotonic() - start,
        accuracy_text,
        splits.spec,
        info,
    )
    save_cached_net(path, net, info)
    return net


def load_cached_net(path: Path, net: nn.Module) -> dict[str, Any] | None:
    """Load a cached net's weights into ``net`` (left in eval mode) and return its training record,
    or None when ``path`` does not exist."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state["weights"])
    net.eval()
    return json.loads(state["info"])


def save_cached_net(path: Path, net: nn.Module, info: dict[str, Any]) -> None:
    """Write a trained net and its record atomically (a temporary file renamed into place), so a
    rank reading the cache never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"weights": net.state_dict(), "info": json.dumps(info)}, tmp)
    os.replace(tmp, path)
