"""2-rank CPU runs (gloo) of the default experiment: DDP, FSDP2, uneven shards, two nodes started
by the multi-node sbatch script; weights equal across ranks and to one rank's metrics."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest

from tests.conftest import TINY, run_cli
from xmodal.config import compose_config
from xmodal.factory import build_datamodule, prepare_data
from xmodal.tasks.caption.task import CaptionTask

DISTRIBUTED = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "logger=csv",
    "callbacks.rank_checksums=true",
]


def rank_checksums(run_dir):
    return [json.loads((run_dir / "checksums" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_dir):
    """One 2-rank CPU DDP run (gloo), shared by the DDP and FSDP2 tests."""
    root = tmp_path_factory.mktemp("ddp")
    # Odd split sizes: one rank gets a padding row, which must not count.
    odd = ["data.shapes.n_val=47", "data.shapes.n_test=45"]
    overrides = [
        *TINY,
        *odd,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={root / 'outputs'}",
        *DISTRIBUTED,
    ]
    result = run_cli(["xmodal-train", *overrides, "trainer=ddp_cpu", "run.id=ddp"], root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, overrides


def test_ddp_cpu_two_ranks_end_with_identical_weights(ddp_run):
    root, _ = ddp_run
    runs = list((root / "outputs" / "shapes_caption").iterdir())
    assert [r.name for r in runs] == ["ddp"]  # both ranks used the launcher's run dir
    ranks = rank_checksums(runs[0])
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    assert ranks[0]["start"] == ranks[1]["start"]  # same init on both ranks
    assert ranks[0]["end"] == ranks[1]["end"]  # bit-identical after training
    assert ranks[0]["end"] != ranks[0]["start"]  # and training did change them
    assert not list(root.glob("**/multirun"))  # rank 1 did not start a sweep of its own


def test_metrics_on_two_ranks_equal_one_rank_on_the_same_weights(ddp_run):
    root, overrides = ddp_run
    run_dir = root / "outputs" / "shapes_caption" / "ddp"
    two_ranks = json.loads((run_dir / "metrics.json").read_text())["val"]
    cfg = compose_config(overrides)
    task = CaptionTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    datamodule = build_datamodule(cfg, prepare_data(cfg), tokenizer=task.tokenizer)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    one_rank = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    assert one_rank["val/loss"] == pytest.approx(two_ranks["val/loss"], rel=1e-5)
    assert one_rank["val/bleu1"] == pytest.approx(two_ranks["val/bleu1"], abs=1e-6)
    assert one_rank["val/bleu4"] == pytest.approx(two_ranks["val/bleu4"], abs=1e-6)
    # CIDEr's IDF spans the whole split: only right if every rank's rows are gathered first.
    assert one_rank["val/cider"] == pytest.approx(two_ranks["val/cider"], abs=1e-6)
    assert one_rank["val/rougeL"] == pytest.approx(two_ranks["val/rougeL"], abs=1e-6)


def test_fsdp2_two_cpu_ranks_match_ddp_and_resume_from_a_distributed_checkpoint(ddp_run, tmp_path):
    root, overrides = ddp_run
    overrides = [o for o in overrides if not o.startswith("paths.output_dir")] + [
        f"paths.output_dir={tmp_path}"
    ]
    result = run_cli(["xmodal-train", *overrides, "trainer=fsdp2", "run.id=f"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "shapes_caption" / "f"
    ranks = rank_checksums(run_dir)
    assert ranks[0]["end"] == ranks[1]["end"] != ranks[0]["start"]
    # Sharded checkpoints: one directory per checkpoint, one shard file per rank.
    assert sorted(p.name for p in (run_dir / "checkpoints" / "last.ckpt").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    ]
    # Same data, same init, same optimizer: FSDP2 reproduces DDP's numbers.
    fsdp = json.loads((run_dir / "metrics.json").read_text())
    ddp = json.loads((root / "outputs" / "shapes_caption" / "ddp" / "metrics.json").read_text())
    for key in ("val/loss", "val/bleu1", "val/cider"):
        assert fsdp["val"][key] == pytest.approx(ddp["val"][key], rel=1e-4, abs=1e-6)
    assert fsdp["test"]["test/loss"] == pytest.approx(ddp["test"]["test/loss"], rel=1e-4)

    # The resumed segment runs compiled (dynamo's eager backend: traced graphs, no C++ build), so
    # this also checks torch.compile under FSDP2 and that compile is harmless on resume.
    result = run_cli(
        [
            "xmodal-train",
            *overrides,
            "trainer=fsdp2",
            "run.id=f",
            "trainer.max_steps=9",
            "test_after_fit=false",
            "trainer.compile=true",
            "trainer.compile_backend=eager",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "config changed on resume: trainer.compile: False → True" in result.stdout + result.stderr
    resumed = rank_checksums(run_dir)
    assert resumed[0]["end"] == resumed[1]["end"] != ranks[0]["end"]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 9
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        3,
        6,
        9,
    ]


def test_a_two_rank_run_resumes_mid_epoch_on_one_rank_finishing_the_epoch_then_the_next(
    ddp_run, tmp_path, caplog
):
    """A requeued job that gets fewer devices: no run.allow_changes, the rest of epoch 0 over one rank."""
    import shutil

    import torch

    from xmodal.train import train

    root, overrides = ddp_run
    shutil.copytree(root / "outputs" / "shapes_caption" / "ddp", tmp_path / "shapes_caption" / "ddp")
    overrides = [o for o in overrides if not o.startswith(("paths.output_dir", "callbacks.rank_checksums"))]
    resume = [
        *overrides,
        f"paths.output_dir={tmp_path}",
        "run.id=ddp",
        "trainer=ddp_cpu",
        "trainer.devices=1",
    ]
    resume += ["trainer.strategy=auto", "trainer.max_steps=13", "test_after_fit=false"]
    with caplog.at_level(logging.INFO, logger="xmodal"):
        train(compose_config(resume))
    # Epoch 0 on 2 ranks (8 rows each of the global 16): 3 shards of 64 over 2 slots (128 | 64
    # samples) = 16 batches per rank. At step 6: 48 + 48 of 192 consumed; the other 96 are 6
    # batches of 16 on one rank (steps 7-12), and step 13 is the first batch of epoch 1.
    assert "elastic resume of exact epoch 0: 96 of 192 samples consumed on 2 rank(s)" in caplog.text
    assert "the world size changes on resume (trainer.devices: 2 → 1; trainer.strategy: 'ddp' → 'auto')" in (
        caplog.text
    )
    run_dir = tmp_path / "shapes_caption" / "ddp"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 13
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    stream = next(v["train_stream"] for v in state.values() if isinstance(v, dict) and "train_stream" in v)
    assert (stream["epoch"], stream["batches_consumed"], stream["topology"]["world_size"]) == (1, 1, 1)
    assert stream["plan_base"] is None and stream["plan_batches"] == 12  # epoch 1 whole, on one rank


def test_ddp_over_uneven_shards_runs_three_exact_epochs_without_hanging(tiny, tmp_path):
    """Shards of 7, 3, 5, 2 and 4 samples over 2 ranks: equal batch counts per rank, so no hang;
    the nets compiled (dynamo under DDP, whose buckets split the graphs)."""
    from xmodal.data.epoch_plan import ShardInfo, Topology, plan_epoch
    from xmodal.data.shapes import ShapesSpec, make_sample
    from xmodal.data.shards import write_sizes, write_tar_shard

    spec, shards_dir, sizes = ShapesSpec(), tmp_path / "shards", {}
    for split, counts in {"train": (7, 3, 5, 2, 4), "val": (5, 4), "test": (3,)}.items():
        (shards_dir / split).mkdir(parents=True)
        sizes[split], index = {}, 0
        for number, count in enumerate(counts):
            name = f"shard-{number:06d}.tar"
            write_tar_shard(
                shards_dir / split / name, [make_sample(spec, split, index + i) for i in range(count)]
            )
            sizes[split][name], index = count, index + count
    write_sizes(shards_dir, {"splits": sizes})

    overrides = [o for o in tiny if not o.startswith("data.batch_size")]
    args = [*overrides, f"data.shards={shards_dir}", "data.batch_size=4", "trainer=ddp_cpu", "run.id=uneven"]
    args += ["trainer.max_steps=-1", "trainer.max_epochs=3", "trainer.val_check_interval=null", "logger=none"]
    args += ["trainer.compile=true", "trainer.compile_backend=eager"]  # and torch.compile under DDP
    result = run_cli(["xmodal-train", *args], tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shards = [ShardInfo(str(shards_dir / "train" / n), c) for n, c in sizes["train"].items()]
    expected = sum(
        plan_epoch(shards, "exact", 0, epoch, Topology(0, 2, 0), batch_size=2).batches_per_rank
        for epoch in range(3)
    )
    summary = json.loads((tmp_path / "outputs" / "caption_shards" / "uneven" / "metrics.json").read_text())
    assert summary["global_step"] == expected
    assert summary["data_skipped"] == {}


FAKE_SRUN = """#!/usr/bin/env python3
# srun on one machine: SLURM_JOB_NUM_NODES x SLURM_NTASKS_PER_NODE tasks, each with the per-task
# environment real srun sets (global, local and node ranks); exits with the first failing status.
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)  # --kill-on-bad-exit=1 and the like
nodes, per_node = int(os.environ["SLURM_JOB_NUM_NODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
tasks = []
for node in range(nodes):
    for local in range(per_node):
        env = {**os.environ, "SLURM_PROCID": str(node * per_node + local), "SLURM_LOCALID": str(local),
               "SLURM_NODEID": str(node), "SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_ID": "0"}
        tasks.append(subprocess.Popen(args, env=env))
sys.exit(next((code for code in (t.wait() for t in tasks) if code), 0))
"""


def test_two_nodes_started_by_the_multinode_sbatch_script_train_like_one_node_with_two_devices(
    ddp_run, tmp_path
):
    """``trainer.num_nodes=2`` × 1 CPU device, started by the rendered sbatch script through an
    srun that sets each task's SLURM ranks (MASTER_ADDR from ``scontrol show hostnames``): the same
    weights, bit for bit, as the 1 node × 2 devices run of the same data and seed."""
    import os
    import socket
    import subprocess

    from xmodal.cluster.slurm import render_sbatch

    root, overrides = ddp_run
    overrides = [o for o in overrides if not o.startswith("paths.output_dir")]
    overrides += [f"paths.output_dir={tmp_path / 'outputs'}", "trainer=ddp_cpu", "trainer.devices=1"]
    overrides += ["trainer.num_nodes=2", "test_after_fit=false"]
    script = render_sbatch(
        compose_config(overrides), overrides, submit_dir=tmp_path, log_dir=tmp_path / "logs"
    )
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf '127.0.0.1\\n127.0.0.1\\n'\n")  # the 2 "nodes"
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "job.sbatch").write_text(script)
    with socket.socket() as probe:  # the script derives MASTER_PORT from the job id: pick a free one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job_id = str(10_000 * 700 + (port - 15000) % 10_000) if 15000 <= port < 25000 else "7000101"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": job_id}
    env |= {"SLURM_JOB_NAME": "xmodal", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2"}
    env |= {"SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_NODELIST": "node[1-2]"}
    for var in ("MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    result = subprocess.run(
        ["bash", "job.sbatch"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "shapes_caption" / job_id  # the run id is the SLURM job id
    nodes = rank_checksums(run_dir)
    one_node = rank_checksums(root / "outputs" / "shapes_caption" / "ddp")
    assert [r["world_size"] for r in nodes] == [2, 2] and nodes[0]["global_step"] == 6
    assert nodes[0]["end"] == nodes[1]["end"] == one_node[0]["end"] != nodes[0]["start"]
