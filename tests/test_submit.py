"""xmodal-submit and the SLURM kit, on CPU with fake sbatch / scontrol / srun executables on PATH."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from xmodal.cluster.slurm import SIGNAL_FORWARDING, time_to_seconds
from xmodal.submit import main

REPO = Path(__file__).resolve().parents[1]
WAITING_TOOLS = ("squeue", "sacct", "scontrol")  # what a launcher that waits for its jobs would poll


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin dir of fake SLURM tools that record their calls into ``<bin>/calls/``; cwd = tmp_path."""
    bin_dir = tmp_path / "bin"
    calls = bin_dir / "calls"
    calls.mkdir(parents=True)
    _executable(
        bin_dir / "sbatch",
        f"""#!/bin/sh
printf '%s\\n' "$*" >> {calls}/sbatch
if [ -n "$FAKE_SBATCH_FAIL" ]; then echo "sbatch: error: Invalid account" >&2; exit 1; fi
sleep 0
n=$(wc -l < {calls}/sbatch)
echo "$((4240 + n));fakecluster"
""",
    )
    _executable(
        bin_dir / "scontrol",
        f"""#!/bin/sh
printf '%s\\n' "$*" >> {calls}/scontrol
if [ "$1 $2" = "show hostnames" ]; then printf 'node001\\nnode002\\n'; fi
""",
    )
    _executable(
        bin_dir / "srun",
        f"""#!/bin/sh
printf 'cwd=%s\\nMASTER_ADDR=%s\\nMASTER_PORT=%s\\nSRUN_CPUS_PER_TASK=%s\\n' \\
    "$PWD" "$MASTER_ADDR" "$MASTER_PORT" "$SRUN_CPUS_PER_TASK" > {calls}/srun.env
for a in "$@"; do printf '%s\\0' "$a"; done > {calls}/srun.argv
""",
    )
    for tool in ("squeue", "sacct"):
        _executable(bin_dir / tool, f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {calls}/{tool}\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps error lines at the terminal width
    monkeypatch.delenv("FAKE_SBATCH_FAIL", raising=False)
    monkeypatch.chdir(tmp_path)
    return calls


def _calls(calls: Path, tool: str) -> list[str]:
    path = calls / tool
    return path.read_text().splitlines() if path.exists() else []


def _flat(text: str) -> str:
    return " ".join(text.split())


def _srun_block(script: str) -> list[str]:
    """The command words of the script's srun line (options, program, overrides), shell-split."""
    start = script.index("\nsrun ")
    end = script.index(" &\n", start)  # srun runs in the background (the shell forwards signals)
    return shlex.split(script[start:end].split("srun", 1)[1].replace("\\\n", " "))[1:]


def _run_script(script: Path, calls: Path, job_id: str = "1230089") -> list[str]:
    """Execute an sbatch script as SLURM would (fake srun/scontrol); returns srun's argv."""
    env = {
        **os.environ,
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NODELIST": "node[001-002]",
        "SLURM_CPUS_PER_TASK": "8",
    }
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return (calls / "srun.argv").read_text().split("\0")[:-1]


def test_sweep_renders_one_script_per_point_and_submits_without_waiting(slurm, tmp_path, capsys):
    out = tmp_path / "sb"
    code = main(["-m", "seed=1,2", "trainer.max_steps=5", "--sbatch-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    scripts = sorted(out.glob("*.sbatch"))
    assert len(scripts) == 2
    texts = [s.read_text() for s in scripts]
    for text in texts:
        for line in ("#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert line in text.splitlines()
        assert "#SBATCH --nodes=1" in text and "#SBATCH --ntasks-per-node=1" in text
        assert f"#SBATCH --output={out}/logs/%x-%j.out" in text
        assert "\nsrun " in text and "run.id=" not in text
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert _srun_block(texts[0])[1:3] == ["seed=1", "trainer.max_steps=5"]
    assert _srun_block(texts[1])[1:3] == ["seed=2", "trainer.max_steps=5"]
    assert (out / "logs").is_dir()  # SLURM does not create the --output dir
    # sbatch called once per script, never blocking; nothing polled the queue afterwards.
    assert _calls(slurm, "sbatch") == [f"--parsable {scripts[0]}", f"--parsable {scripts[1]}"]
    assert not any(_calls(slurm, tool) for tool in WAITING_TOOLS)
    lines = captured.out.splitlines()
    assert lines[0].startswith("4241\tseed=1 trainer.max_steps=5 ")
    assert lines[1].startswith("4242\tseed=2 trainer.max_steps=5 ")
    assert [row.split("\t")[0] for row in (out / "jobs.tsv").read_text().splitlines()] == ["4241", "4242"]


def test_script_runs_srun_with_the_overrides_and_rendezvous(slurm, tmp_path, capsys):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    out = tmp_path / "sb"
    overrides = ["data.shapes.holdout=[red circle]", "paths.output_dir=rel_out", "trainer=ddp_cpu"]
    assert main([*overrides, "cluster.gpu_partition=false", "--sbatch-dir", str(out)]) == 0
    script = out / "job_000.sbatch"
    text = script.read_text()
    assert f"cd {tmp_path}" in text
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=2" in text
    argv = _run_script(script, slurm, job_id="1230089")
    # The user's overrides arrive verbatim (shell quoting round-trips), relative paths made absolute.
    assert argv == [
        "--kill-on-bad-exit=1",
        "xmodal-train",
        "data.shapes.holdout=[red circle]",
        "trainer=ddp_cpu",
        "cluster.gpu_partition=false",
        f"paths.output_dir={tmp_path}/rel_out",
        f"paths.data_dir={tmp_path}/data",
    ]
    env = dict(line.split("=", 1) for line in (slurm / "srun.env").read_text().splitlines())
    assert env["cwd"] == str(tmp_path)
    assert env["MASTER_ADDR"] == "node001"
    assert env["SRUN_CPUS_PER_TASK"] == "8"
    assert _calls(slurm, "scontrol") == ["show hostnames node[001-002]"]
    # The same port Lightning's SLURMEnvironment derives (job id "...0089": no octal surprise).
    os.environ.pop("MASTER_PORT", None)
    os.environ["SLURM_JOB_ID"] = "1230089"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "srun is available but not used"
            assert int(env["MASTER_PORT"]) == SLURMEnvironment().main_port == 15089
    finally:
        os.environ.pop("SLURM_JOB_ID", None)
        os.environ.pop("MASTER_PORT", None)


def test_dry_run_prints_every_script_and_submits_nothing(slurm, tmp_path, capsys):
    assert main(["-m", "seed=1,2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 2
    assert "    seed=1 \\" in out and "    seed=2 \\" in out
    assert _calls(slurm, "sbatch") == []
    assert not (tmp_path / "outputs").exists()  # without --sbatch-dir nothing is written


def test_missing_sbatch_is_a_clear_error_suggesting_dry_run(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.chdir(tmp_path)
    assert main(["seed=1"]) == 2
    err = _flat(capsys.readouterr().err)
    assert "sbatch not found on PATH" in err and "--dry-run" in err
    assert not (tmp_path / "outputs").exists()
    assert main(["seed=1", "--dry-run"]) == 0  # printing needs no SLURM


def test_gpu_trainer_on_a_cpu_partition_is_refused_before_any_sbatch(slurm, tmp_path, capsys):
    out = tmp_path / "sb"
    # Only the second point is bad: the first must not be submitted either.
    code = main(["-m", "trainer=gpu", "cluster.gpu_partition=true,false", "--sbatch-dir", str(out)])
    err = _flat(capsys.readouterr().err)
    assert code == 2
    # (Hydra's sweeper renders swept booleans as False/True; the job composes them the same.)
    assert "job 2/2 (trainer=gpu cluster.gpu_partition=False): invalid config:" in err
    assert "trainer.accelerator: is a GPU trainer but cluster.gpu_partition=false" in err
    assert "job 1/2" not in err
    assert _calls(slurm, "sbatch") == [] and not out.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer=ddp", "trainer.devices=16"], "trainer.devices: is the number of GPUs"),
        (["trainer.precision=16-mixed", "cluster.gpu_partition=false"], "trainer.precision: 16-bit"),
        (["trainer=ddp_cpu", "trainer.strategy=ddp_spawn"], "trainer.strategy: srun already starts"),
        (["cluster.time=1:00"], "cluster.signal_seconds: must be shorter than cluster.time (60 s)"),
        (["cluster.time=4h"], "cluster.time: is not a SLURM time"),
        (
            ["cluster.sbatch_args=['--nodes=3']"],
            "cluster.sbatch_args: --nodes is derived from trainer.num_nodes",
        ),
        (["cluster.sbatch_args=['-n 8']"], "cluster.sbatch_args: -n 8 is derived from trainer.devices"),
        (["-m", "seed=1,2", "run.id=mine"], "run.id: one run.id for a sweep of several jobs"),
        (["trainer.devices=0"], "trainer.devices: must be >= 1 (got 0)"),
        (["seed=1,2"], "'seed=1,2' is a sweep; add -m"),
        (["cluster.setup=['if then']"], "cluster.setup: the rendered script is not valid bash"),
    ],
)
def test_config_time_checks_name_the_key(slurm, tmp_path, capsys, overrides, message):
    assert main([*overrides, "--sbatch-dir", str(tmp_path / "sb")]) == 2
    assert message in _flat(capsys.readouterr().err)
    assert _calls(slurm, "sbatch") == [] and not (tmp_path / "sb").exists()


def test_cpu_multiprocess_job_is_fine_on_a_cpu_partition(slurm, capsys):
    assert main(["trainer=ddp_cpu", "cluster.gpu_partition=false", "cluster.partition=cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=2" in out and "#SBATCH --partition=cpu" in out
    assert "--gpus-per-node" not in out


def test_multinode_gpu_job_validates_on_a_host_without_gpus(slurm, capsys):
    # This host has no CUDA device; the job's GPUs come from the partition, so it is accepted.
    overrides = ["trainer.num_nodes=2", "trainer.devices=4", "trainer=ddp", "cluster.mem_per_gpu=64G"]
    assert main([*overrides, "cluster.account=proj", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--mem-per-gpu=64G",
        "--account=proj",
    ):
        assert f"#SBATCH {line}" in lines


def test_sbatch_failure_is_reported_with_its_message(slurm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    assert main(["seed=3", "--sbatch-dir", str(tmp_path / "sb")]) == 1
    err = _flat(capsys.readouterr().err)
    assert "sbatch failed" in err and "Invalid account" in err and "0 of 1 jobs were submitted" in err


def test_console_entry_point_returns_with_job_ids(slurm, tmp_path):
    exe = shutil.which("xmodal-submit")
    cmd = [exe] if exe else [sys.executable, "-m", "xmodal.submit"]
    out = tmp_path / "sb"
    result = subprocess.run(
        [*cmd, "-m", "seed=1,2", "trainer.max_steps=5", "--sbatch-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == ["4241", "4242"]
    assert len(_calls(slurm, "sbatch")) == 2 and len(list(out.glob("*.sbatch"))) == 2


@pytest.mark.parametrize("name", ["train.sbatch", "train_multinode.sbatch"])
def test_hand_editable_templates(slurm, tmp_path, capsys, name):
    text = (REPO / "slurm" / name).read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / name)]).returncode == 0
    for line in ("#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert line in text.splitlines()
    assert "run.id=" not in text
    # The rendezvous lines are the ones xmodal-submit renders.
    assert main(["--dry-run"]) == 0
    rendered = capsys.readouterr().out.splitlines()
    for line in (
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))",
        *(line for line in SIGNAL_FORWARDING if line and not line.startswith("#")),
    ):
        assert line in text.splitlines() and line in rendered
    # sbatch hands the script's arguments to xmodal-train, quoting intact.
    copy = tmp_path / name
    copy.write_text(text)
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1", "SLURM_SUBMIT_DIR": str(tmp_path)}
    subprocess.run(["bash", str(copy), "trainer=ddp", "seed=7 8"], env=env, check=True, capture_output=True)
    argv = (slurm / "srun.argv").read_text().split("\0")[:-1]
    assert argv == ["--kill-on-bad-exit=1", "xmodal-train", "trainer=ddp", "seed=7 8"]
    assert (slurm / "srun.env").read_text().splitlines()[1:3] == ["MASTER_ADDR=node001", "MASTER_PORT=15077"]


def test_usr2_or_term_to_the_batch_shell_reaches_the_training_step(slurm, tmp_path):
    """`--signal=B:USR2` and `scancel --batch` signal only the batch shell: it must forward them,
    and the job ends with the step's own status (here the step checkpoints and exits 3)."""
    script = tmp_path / "sb" / "job_000.sbatch"
    assert main(["cluster.gpu_partition=false", "--sbatch-dir", str(script.parent)]) == 0
    _executable(  # a step that records each signal, and stops (as xmodal's Preemption would) on one
        slurm.parent / "srun",
        f"""#!/bin/bash
trap 'echo USR2 >> {slurm}/step.signals; exit 3' USR2
trap 'echo TERM >> {slurm}/step.signals; exit 4' TERM
touch {slurm}/step.started
while true; do sleep 0.05; done
""",
    )
    env = {**os.environ, "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_PER_TASK": "1"}
    for signal_name, code in (("SIGUSR2", 3), ("SIGTERM", 4)):
        (slurm / "step.started").unlink(missing_ok=True)
        batch = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path)
        try:
            for _ in range(600):  # the step is up (or the script died first)
                if (slurm / "step.started").exists() or batch.poll() is not None:
                    break
                time.sleep(0.05)
            assert batch.poll() is None, "the batch script ended before its step started"
            batch.send_signal(getattr(signal, signal_name))
            assert batch.wait(timeout=30) == code
        finally:
            batch.kill()
    assert (slurm / "step.signals").read_text().split() == ["USR2", "TERM"]


@pytest.mark.parametrize(
    "value, seconds",
    [("04:00:00", 14400), ("30", 1800), ("5:30", 330), ("1-00", 86400), ("1-2:3:4", 93784), ("4h", None)],
)
def test_slurm_time_formats(value, seconds):
    assert time_to_seconds(value) == seconds


def test_submitit_launcher_config_reconciles_the_signal(slurm, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from xmodal.config import CONFIG_DIR, register_schemas

    register_schemas()
    overrides = ["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train", overrides=[*overrides, "cluster.setup=[module load x]"], return_hydra_config=True
        )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["tasks_per_node"], params["gpus_per_node"], params["nodes"]) == (4, 4, 2)
    assert params["signal_delay_s"] == cfg.cluster.signal_seconds == 120
    assert params["setup"] == ["module load x"]
    # timeout_min cannot interpolate H:M:S; it must stay in step with the default cluster.time.
    assert params["timeout_min"] * 60 == time_to_seconds(cfg.cluster.time)
    # The sbatch script submitit would submit (fake srun on PATH satisfies its cluster check).
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=str(tmp_path / "sf"), slurm_max_num_timeout=params["max_num_timeout"]
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = {"_target_", "submitit_folder", "max_num_timeout"}
    executor.update_parameters(
        **{(k if k in base else f"slurm_{k}"): v for k, v in params.items() if k not in skip}
    )
    text = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--signal=USR2@120", "--requeue", "--open-mode=append", "--ntasks-per-node=4", "--nodes=2"):
        assert f"#SBATCH {line}" in text.splitlines()
    assert submitit.JobEnvironment.USR_SIG == "USR2"


@pytest.mark.parametrize("path", ["/plain/dir", "/data/my dir/it's,x=1", "/a\\b", "/end\\", "/q\\'x"])
def test_absolute_paths_survive_hydra_override_parsing(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from xmodal.cluster.slurm import _hydra_value

    assert OverridesParser.create().parse_override(f"paths.output_dir={_hydra_value(path)}").value() == path
