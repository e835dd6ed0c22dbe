"""Metric provenance: what a FID/KID, judge or cycle score was measured with, and whether two are comparable.

A FID is a distance in one feature space, between one reference set and one sample of generated
images: 12.3 under the shapes domain classifier and 40.1 under InceptionV3 say nothing about which
generator is better, and neither do two FIDs of one extractor whose cache was retrained (other
weights, another space), nor two over 48 vs 512 samples (FID's bias shrinks with the sample). So
every scored family carries a record of exactly those things (:data:`PROVENANCE_KEYS`), stored in
the run dir (``metrics_provenance.json``, xmodal/callbacks/metrics_file.py), in ``xmodal-eval``'s
JSON and in the loggers' hyperparameters; :func:`comparable` says why two records differ, and the
best-checkpoint tracker (xmodal/callbacks/best_checkpoint.py) and the sweep table (xmodal/sweep.py)
refuse to rank scores across such a difference.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

PROVENANCE_KEYS = (
    "metrics",
    "extractor",
    "weights_sha256",
    "weights_file",
    "feature_dim",
    "image_size",
    "image_fit",
    "scorer_resize",
    "reference_split",
    "reference_samples",
    "generated_samples",
)
"""Every record's keys, in this order."""

COMPARED = tuple(key for key in PROVENANCE_KEYS if key not in ("metrics", "weights_file"))
"""What makes two scores comparable. Not ``metrics`` (what the family logged) nor ``weights_file``
(where the weights lay: the same weights moved to another disk score alike)."""

FAMILIES: dict[str, tuple[str, ...]] = {
    "features": ("fid", "kid", "sample_spread", "cond_acc", "real_acc"),
    "judge": ("judge_acc", "judge_real_acc"),
    "cycle": ("cycle_cider", "cycle_bleu4"),
}
"""Metric names by the net that scored them: the FID feature extractor (whose logits also give
cond_acc), the independent judge (xmodal/metrics/judge.py), the cycle captioner (xmodal/metrics/cycle.py)."""

PROVENANCE_FILE = "metrics_provenance.json"

_LABELS = {
    "extractor": "feature extractor",
    "weights_sha256": "extractor weights",
    "feature_dim": "feature dim",
    "image_size": "data.image_size",
    "image_fit": "data.image_fit",
    "scorer_resize": "resize before the scorer",
    "reference_split": "reference split",
    "reference_samples": "reference samples",
    "generated_samples": "generated samples",
}


_ATTRIBUTE_JUDGE = re.compile(r"^judge_([a-z0-9_]+?)(_real)?_acc$")
"""``judge_colour_acc``, ``judge_colour_real_acc``: a judge of another attribute (``judge_labels``)."""


def judge_names(label_role: str) -> tuple[str, str]:
    """(generated, real) accuracy names of the judge of ``label_role``: ``judge_acc`` and
    ``judge_real_acc`` for the class label, ``judge_<role>_acc`` and ``judge_<role>_real_acc`` else."""
    infix = "" if label_role == "label" else f"_{label_role}"
    return f"judge{infix}_acc", f"judge{infix}_real_acc"


def judge_family(label_role: str) -> str:
    """The provenance family of the judge of ``label_role`` (``judge``, ``judge_colour``)."""
    return "judge" if label_role == "label" else f"judge_{label_role}"


def family_of(metric: str) -> str | None:
    """The family of a logged metric name (``val/fid``, ``best test/judge_acc``, ``kid``), or None."""
    name = metric.rsplit("/", 1)[-1]
    found = next((family for family, names in FAMILIES.items() if name in names), None)
    if found is None and (attribute := _ATTRIBUTE_JUDGE.match(name)) is not None:
        return judge_family(attribute.group(1))
    return found


def stage_of(metric: str) -> str | None:
    """The split a logged name was scored on (``val/fid`` → ``val``; ``best val/fid`` → ``val``)."""
    head = metric.removeprefix("best ").split("/", 1)
    return head[0] if len(head) == 2 else None


def net_sha256(net: nn.Module) -> str:
    """sha256 over a net's state_dict (names, dtypes, shapes, bytes, in name order): the same weights
    hash alike wherever they were loaded from; one retrained value changes it."""
    digest = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            continue
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_sha256(net: nn.Module) -> str:
    """:func:`net_sha256`, computed once per net (frozen scorers: Inception's 95 MB hash once)."""
    known = getattr(net, "_xmodal_sha256", None)
    if known is None:
        known = net_sha256(net)
        object.__setattr__(net, "_xmodal_sha256", known)
    return known


def pooled_to_32(image_size: int) -> str:
    """What the domain classifier and the judge do to their input (they average-pool above 32 px)."""
    return f"average-pooled {image_size} → 32 px" if image_size > 32 else f"none ({image_size} px)"


def describe_scorer(net: nn.Module) -> dict[str, Any]:
    """``extractor``, ``feature_dim`` and a ``resize(image_size) -> str`` of a known scoring net."""
    from xmodal.metrics.features import DomainClassifier
    from xmodal.metrics.judge import JudgeNet

    if isinstance(net, DomainClassifier):
        return {"extractor": "DomainClassifier", "feature_dim": net.num_features, "resize": pooled_to_32}
    if isinstance(net, JudgeNet):
        classes = net.net[-1].out_features
        return {"extractor": "JudgeNet", "feature_dim": classes, "resize": pooled_to_32}
    if type(net).__name__ == "InceptionFeatures":
        return {
            "extractor": "InceptionV3 (torch-fidelity inception-v3-compat)",
            "feature_dim": 2048,
            "resize": lambda size: f"bilinear {size} → 299 px (torch-fidelity)",
        }
    return {
        "extractor": f"{type(net).__module__}.{type(net).__qualname__}",
        "feature_dim": getattr(net, "num_features", None),
        "resize": lambda size: f"as the net does it ({size} px given)",
    }


def provenance_record(
    metrics: list[str],
    extractor: str,
    weights_sha256: str,
    feature_dim: int | None,
    image_size: int | None,
    image_fit: str | None,
    scorer_resize: str,
    reference_split: str,
    reference_samples: int,
    generated_samples: int,
    weights_file: str | None = None,
) -> dict[str, Any]:
    """One family's record, with exactly :data:`PROVENANCE_KEYS` (JSON-ready)."""
    record = {
        "metrics": list(metrics),
        "extractor": extractor,
        "weights_sha256": weights_sha256,
        "weights_file": weights_file,
        "feature_dim": feature_dim,
        "image_size": image_size,
        "image_fit": image_fit,
        "scorer_resize": scorer_resize,
        "reference_split": reference_split,
        "reference_samples": int(reference_samples),
        "generated_samples": int(generated_samples),
    }
    assert tuple(record) == PROVENANCE_KEYS
    return record


def scorer_record(
    net: nn.Module,
    metrics: list[str],
    split: str,
    reference_samples: int,
    generated_samples: int,
    image_size: int | None,
    image_fit: str | None,
    weights_file: str | None = None,
) -> dict[str, Any]:
    """The record of a scoring net (:func:`describe_scorer`) on one split's counts."""
    info = describe_scorer(net)
    return provenance_record(
        metrics,
        info["extractor"],
        cached_sha256(net),
        info["feature_dim"],
        image_size,
        image_fit,
        info["resize"](image_size) if image_size is not None else "unknown",
        split,
        reference_samples,
        generated_samples,
        weights_file,
    )


def provenance_id(record: Mapping[str, Any]) -> str:
    """8 hex digits naming what makes a record comparable (equal ids ⇔ :func:`comparable` is None)."""
    payload = json.dumps({k: record.get(k) for k in COMPARED}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def _difference(key: str, a: Any, b: Any) -> str:
    """``extractor weights differ (sha256 1a2b3c4d5e6f vs 0f9e8d7c6b5a)``, ``feature dim differs (64 vs 2048)``."""
    label = _LABELS[key]
    verb = "differ" if label.endswith("s") else "differs"
    if key == "weights_sha256":
        return f"{label} {verb} (sha256 {str(a)[:12]} vs {str(b)[:12]})"
    return f"{label} {verb} ({a!r} vs {b!r})"


def comparable(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> str | None:
    """None when scores under records ``a`` and ``b`` may be compared, else why not, in one line
    (``"extractor weights differ (sha256 1a2b3c4d5e6f vs 0f9e8d7c6b5a)"``). A missing record (a run
    from before provenance) is comparable to anything: nothing is known to differ."""
    if a is None or b is None:
        return None
    reasons = [_difference(k, a.get(k), b.get(k)) for k in COMPARED if a.get(k) != b.get(k)]
    return "; ".join(reasons) or None


def task_data(task: Any) -> tuple[int | None, str | None]:
    """(image size, image fit) the scored images were decoded at: the data module's decode spec,
    else the task's saved data shape (no fit known)."""
    trainer = getattr(task, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    decode = getattr(datamodule, "decode", None)
    if decode is not None:
        return int(decode.image_size), str(decode.image_fit)
    data = dict(task.hparams.get("data", {}) or {})
    return data.get("image_size"), None


def record_provenance(task: Any, stage: str, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge one evaluation's family records into ``task.metric_provenance[stage]`` (a plain dict,
    never in the state_dict; the same on every rank: hashes of the same weights, counts reduced)."""
    store = getattr(task, "metric_provenance", None)
    if store is None:
        store = {}
        task.metric_provenance = store
    store[stage] = {**store.get(stage, {}), **{k: dict(v) for k, v in records.items()}}


def read_provenance(run_dir: Path) -> dict[str, Any]:
    """``<run dir>/metrics_provenance.json`` (``{split: {family: record}}``), or {} without one."""
    path = Path(run_dir) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe(record: Mapping[str, Any]) -> str:
    """One human line: ``DomainClassifier sha256 1a2b3c4d5e6f (64-d, none (32 px), fit resize): val 48 real vs 48 generated``."""
    return (
        f"{record.get('extractor')} sha256 {str(record.get('weights_sha256'))[:12]} "
        f"({record.get('feature_dim')}-d, {record.get('scorer_resize')}, fit {record.get('image_fit')}): "
        f"{record.get('reference_split')} {record.get('reference_samples')} real vs "
        f"{record.get('generated_samples')} generated"
    )
