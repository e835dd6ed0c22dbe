"""Metric provenance (xmodal/metrics/provenance.py): the record of every FID/KID/judge score, hashes
that follow the weights, the best-checkpoint restart on a changed extractor, the sweep table's marks."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from xmodal.callbacks.best_checkpoint import BestCheckpoint, restart_message
from xmodal.callbacks.metrics_file import MetricsFile
from xmodal.metrics.features import DomainClassifier
from xmodal.metrics.fid import GenerativeMetrics
from xmodal.metrics.judge import JudgeNet
from xmodal.metrics.provenance import PROVENANCE_KEYS, comparable, net_sha256, provenance_id
from xmodal.sweep import csv_text, job_row, markdown_table

pytestmark = pytest.mark.usefixtures("one_thread")


def classifier(seed: int = 0) -> DomainClassifier:
    torch.manual_seed(seed)
    return DomainClassifier(channels=3, num_classes=4)


def scored(net: DomainClassifier, n: int = 12, judge: nn.Module | None = None) -> dict[str, dict]:
    """Provenance of one val pass over ``n`` random 32 px images, FID/KID and the judge."""
    metrics = GenerativeMetrics(net, conditional=True, kid_subset_size=4, judge=judge)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, n, 3, 32, 32, generator=gen) * 2 - 1  # [2, N, C, H, W]: real, fake
    metrics.update(images[0], images[1], torch.arange(n) % 4)
    values = metrics.compute()
    assert {"fid", "kid", "cond_acc"} | ({"judge_acc"} if judge else set()) <= set(values)
    return metrics.provenance("val", 32, "resize")


def test_records_hold_exactly_the_provenance_keys():
    torch.manual_seed(3)
    records = scored(classifier(), judge=JudgeNet(3, 4))
    assert set(records) == {"features", "judge"}
    features = records["features"]
    assert tuple(features) == PROVENANCE_KEYS
    assert features == {
        "metrics": ["fid", "kid", "sample_spread", "cond_acc", "real_acc"],
        "extractor": "DomainClassifier",
        "weights_sha256": net_sha256(classifier()),
        "weights_file": None,
        "feature_dim": 64,
        "image_size": 32,
        "image_fit": "resize",
        "scorer_resize": "none (32 px)",
        "reference_split": "val",
        "reference_samples": 12,
        "generated_samples": 12,
    }
    judge = records["judge"]
    assert (judge["extractor"], judge["feature_dim"], judge["metrics"]) == (
        "JudgeNet",
        4,
        ["judge_acc", "judge_real_acc"],
    )
    assert (judge["reference_samples"], judge["generated_samples"]) == (12, 12)
    json.dumps(records)  # stored as JSON in the run dir, eval output and logger config


def test_same_weights_hash_alike_and_a_retrained_extractor_is_refused():
    a, b = scored(classifier(0))["features"], scored(copy.deepcopy(classifier(0)))["features"]
    assert a["weights_sha256"] == b["weights_sha256"] and len(a["weights_sha256"]) == 64
    assert comparable(a, b) is None and provenance_id(a) == provenance_id(b)
    retrained = classifier(0)
    with torch.no_grad():
        retrained.head.bias[0] += 1e-3  # one value of the cache changed
    c = scored(retrained)["features"]
    assert comparable(a, c) == (
        f"extractor weights differ (sha256 {a['weights_sha256'][:12]} vs {c['weights_sha256'][:12]})"
    )
    assert provenance_id(a) != provenance_id(c)
    fewer = scored(classifier(0), n=8)["features"]
    assert comparable(a, fewer) == "reference samples differ (12 vs 8); generated samples differ (12 vs 8)"
    assert comparable(a, None) is None  # a run from before provenance: nothing known to differ


class Scored(L.LightningModule):
    """Logs ``val/fid`` from a list, one value per validation, under a given provenance record."""

    def __init__(self, fids: list[float], record: dict):
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.fids = fids
        self.metric_provenance = {"val": {"features": record}}

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/fid", self.fids[self.global_step - 1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(module: Scored, run_dir: Path, steps: int, resume: Path | None = None) -> BestCheckpoint:
    best = BestCheckpoint(dirpath=str(run_dir), filename="best", monitor="val/fid", mode="min", save_top_k=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[best, MetricsFile(run_dir / "metrics.jsonl")],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, loader, ckpt_path=str(resume) if resume else None)
    trainer.save_checkpoint(run_dir / "last.ckpt")
    return best


def xmodal_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "xmodal" and r.levelno >= logging.WARNING]


def test_resume_under_a_changed_extractor_restarts_best_tracking_with_one_warning(tmp_path, caplog):
    old = scored(classifier(0))["features"]
    retrained = classifier(0)
    with torch.no_grad():
        retrained.head.bias[0] += 1e-3
    new = scored(retrained)["features"]
    best = fit(Scored([5.0, 3.0], old), tmp_path, steps=2)
    assert float(best.best_model_score) == 3.0 and best.best_provenance == old
    saved = json.loads((tmp_path / "metrics_provenance.json").read_text())
    assert saved == {"val": {"features": old}}

    # Same provenance: 4.0 does not beat 3.0.
    same = tmp_path / "same"
    same.mkdir()
    (same / "last.ckpt").write_bytes((tmp_path / "last.ckpt").read_bytes())
    with caplog.at_level(logging.WARNING, logger="xmodal"):
        best = fit(Scored([5.0, 3.0, 4.0], old), tmp_path, steps=3, resume=same / "last.ckpt")
    assert float(best.best_model_score) == 3.0 and not xmodal_warnings(caplog)

    # Another extractor: 3.0 was a distance in another space, so 4.0 is the new best, said once.
    with caplog.at_level(logging.WARNING, logger="xmodal"):
        best = fit(Scored([5.0, 3.0, 4.0], new), tmp_path, steps=3, resume=same / "last.ckpt")
    assert float(best.best_model_score) == 4.0 and best.best_provenance == new
    reason = f"extractor weights differ (sha256 {old['weights_sha256'][:12]} vs {new['weights_sha256'][:12]})"
    assert xmodal_warnings(caplog) == [restart_message("val/fid", 3.0, reason)]
    assert restart_message("val/fid", 3.0, reason) == (
        f"val/fid: the best score so far (3) was measured with another metric provenance ({reason}); "
        "scores are not comparable, so best-checkpoint tracking restarts at this validation "
        "(best.ckpt is replaced by its checkpoint)"
    )
    assert json.loads((tmp_path / "metrics_provenance.json").read_text()) == {"val": {"features": new}}


def sweep_job(root: Path, job: int, fid: float, record: dict) -> dict:
    """A finished job of a sweep: its pointer, run summary and provenance file, read by job_row."""
    job_dir, run_dir = root / str(job), root / f"run{job}"
    job_dir.mkdir()
    run_dir.mkdir()
    (job_dir / "run_dir.txt").write_text(f"{run_dir}\n")
    summary = {"status": "COMPLETED", "monitor": "val/fid", "best_score": fid, "best_checkpoint": None}
    (run_dir / "summary.json").write_text(json.dumps({**summary, "test": {"test/fid": fid + 1}}))
    test_record = {**record, "reference_split": "test"}
    (run_dir / "metrics_provenance.json").write_text(
        json.dumps({"val": {"features": record}, "test": {"features": test_record}})
    )
    return job_row(str(job), [f"model.gan.feature_steps={job}"], "COMPLETED", job_dir)


def test_sweep_table_marks_fids_of_differing_provenance(tmp_path):
    old = scored(classifier(0))["features"]
    new = {**old, "weights_sha256": "f" * 64}
    rows = [sweep_job(tmp_path, 0, 12.5, old), sweep_job(tmp_path, 1, 9.25, old)]
    assert "[a]" not in markdown_table(rows) and "note:" not in markdown_table(rows)
    rows.append(sweep_job(tmp_path, 2, 7.0, new))
    table = markdown_table(rows).splitlines()
    body = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:5]}
    assert body["0"][1:3] == ["12.5 [a]", "13.5 [a]"]  # best val/fid, test/fid
    assert body["2"][1:3] == ["7 [b]", "8 [b]"]
    reason = f"extractor weights differ (sha256 {old['weights_sha256'][:12]} vs ffffffffffff)"
    assert table[5:] == [
        "",
        f"note: best val/fid of different metric provenance, not comparable: [a] (jobs 0, 1) vs [b] (jobs 2): {reason}",
        f"note: test/fid of different metric provenance, not comparable: [a] (jobs 0, 1) vs [b] (jobs 2): {reason}",
    ]
    header = csv_text(rows).splitlines()[0].split(",")
    assert "provenance" not in header and {"provenance test/features", "provenance val/features"} <= set(
        header
    )
