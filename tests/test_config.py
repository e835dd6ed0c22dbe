"""Config composition and validation: every experiment composes; bad values name their key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from tests.conftest import run_cli
from xmodal.config import CONFIG_DIR, ConfigError, compose_config, validate

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def test_default_config_is_the_captioning_experiment_and_valid():
    cfg = compose_config()
    assert cfg.experiment_name == "shapes_caption"
    assert cfg.model.task == "caption" and cfg.model.source == "image" and cfg.model.target == "text"
    assert cfg.logger.kind == "wandb"
    validate(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment
    validate(cfg)


@pytest.mark.parametrize(
    "group,option",
    [("trainer", t) for t in ("default", "cpu", "ddp_cpu", "fsdp2")]
    + [("logger", k) for k in ("wandb", "csv", "none")]
    + [("debug", d) for d in ("fdr", "overfit", "limit", "profiler", "ddp_cpu")],
)
def test_every_group_option_composes_on_cpu(group, option):
    validate(compose_config([f"{group}={option}"]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer.devices=0"], "trainer.devices: must be >= 1 (got 0)"),
        (["trainer.num_nodes=0"], "trainer.num_nodes: must be >= 1"),
        (["trainer.precision=fp8"], "trainer.precision: must be one of"),
        (
            ["trainer=cpu", "trainer.precision=16-mixed"],
            "trainer.precision: 16-bit float precision needs a GPU",
        ),
        (
            ["trainer=cpu", "trainer.strategy=fsdp"],
            "trainer.strategy: Lightning's FSDP1 'fsdp' needs a GPU; use trainer=fsdp2",
        ),
        (["trainer.strategy=deepspeed"], "trainer.strategy: must be one of"),
        (["data.shards=/nonexistent/shards"], "data.shards: /nonexistent/shards: no such file or directory"),
        (
            ["trainer=ddp_cpu", "data.batch_size=33"],
            "data.batch_size: is the global batch and must divide by world size",
        ),
        (["data.shapes.image_size=60"], "data.shapes.image_size: must be >= 16, a multiple of 8"),
        (["model.d_model=130"], "model.d_model: must divide by model.heads=4"),
        (["model=gan", "model.condition=text", "model.text_layers=0"], "model.text_layers: must be >= 1"),
        (["logger.kind=tensorboard"], "logger.kind: must be one of"),
        (
            ["data.name=coco"],
            "data.name: is not a built-in dataset (built-in: ('shapes', 'mnist', 'shapes_pairs', 'moving_shapes'))",
        ),
        (["model.source=label"], "model.source: has no built-in encoder for modality 'label'"),
        (
            ["model.source=smell"],
            "model: the task reads role 'smell', which is no modality and not in data.roles",
        ),
        (["model=gan", "model.target=text"], "model.target: the gan task generates images (got 'text')"),
        (["model=gan", "model.gan.loss=bce"], "model.gan.loss: must be one of"),
        (["model=vae", "model.vae.likelihood=mse"], "model.vae.likelihood: must be"),
        (
            ["model=gan", "model.condition=colour"],
            "model.condition: must be one of ('none', 'label', 'text', 'audio')",
        ),
        # The task family is chosen with its node (model=gan): a caption node renamed to another
        # family carries keys that family does not have, and each is named.
        (["model.task=gan"], "model.encoder_channels: not a config key of GanModelConfig"),
        (
            ["model.task=nosuch"],
            "model.task: unknown task 'nosuch' (registered: caption, gan, translation, vae;",
        ),
        (["model.task=nosuch.module:Task"], "model.task: cannot import 'nosuch.module:Task'"),
        (["model.image_encoder=vit"], "model.image_encoder: must be one of ('conv', 'factorized')"),
        (["model.token_dropout=1.0"], "model.token_dropout: must be in [0, 1)"),
        (["model=gan", "model.target=audio"], "model.target: the gan task generates images (got 'audio')"),
        (
            ["model=vae", "model.target=text"],
            "model.target: the vae task generates image, audio or video (got 'text')",
        ),
        (
            ["experiment=shapes_text2audio_vae", "data.audio_mels=48"],
            "data.audio_mels: an audio target's conv nets take 32 or 64 (mels and frames) (got 48)",
        ),
        (
            ["experiment=shapes_text2audio_vae", "data.audio_frames=100"],
            "data.audio_frames: an audio target's conv nets take 32 or 64 (mels and frames) (got 100)",
        ),
        (
            ["experiment=shapes_text2audio_vae", "model.vae.likelihood=bernoulli"],
            "model.vae.likelihood: an audio target (real-valued log-mel) needs gaussian or laplace; "
            "bernoulli and logistic model pixel intensities (got 'bernoulli')",
        ),
        (
            ["experiment=shapes_text2audio_vae", "model.vae.likelihood=logistic"],
            "model.vae.likelihood: an audio target (real-valued log-mel) needs gaussian or laplace",
        ),
        (
            ["experiment=shapes_text2audio_vae", "model.condition=audio"],
            "model.condition: an audio target cannot be conditioned on itself (got 'audio')",
        ),
        (["data.image_channels=2"], "data.image_channels: must be 1 (grey) or 3 (RGB)"),
        (["ckpt_path=/nonexistent.ckpt"], "ckpt_path: no such checkpoint (got '/nonexistent.ckpt')"),
        (["run.dir=/somewhere"], "run.dir: is derived as <paths.output_dir>/<experiment_name>/<run.id>"),
    ],
)
def test_bad_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert message in str(err.value)


def test_an_audio_target_ignores_image_size_and_needs_its_own_modalities():
    from xmodal.factory import required_roles

    # The image-size check is about image nets: an audio VAE does not decode images at all.
    cfg = compose_config(["experiment=shapes_text2audio_vae", "data.image_size=48", "data.audio_mels=32"])
    validate(cfg)
    assert required_roles(cfg) == ("audio", "text")
    assert required_roles(compose_config(["experiment=shapes_vae"])) == ("image",)
    assert required_roles(compose_config(["experiment=shapes_text2image_vae"])) == (
        "image",
        "text",
    )
    with pytest.raises(ConfigError, match=r"data.image_size: the vae task's conv nets take 32 or 64 px"):
        validate(compose_config(["experiment=shapes_text2image_vae", "data.image_size=48"]))


def test_each_problem_is_reported_once_by_its_owner():
    # Data keys a modality reads are checked by that modality only, not again by the validator.
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["data.image_channels=2", "data.audio_mels=4"]))
    assert str(err.value).count("data.image_channels:") == 1
    assert str(err.value).count("data.audio_mels:") == 1


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["trainer.devices=0", "model.lr=-1"]))
    assert "trainer.devices" in str(err.value) and "model.lr" in str(err.value)


def test_shards_dir_without_shards_is_refused(tmp_path):
    # A directory of plain tars is read as it is now; one without any tar is still refused.
    with pytest.raises(ConfigError, match=r"data.shards: .* holds no .tar shards and no sizes.json"):
        validate(compose_config([f"data.shards={tmp_path}"]))


def test_misspelt_key_and_wrong_type_are_refused_while_composing():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["trainer.max_step=10"])
    assert "Key 'max_step' not in 'TrainerConfig'" in str(err.value.__cause__)
    assert "full_key: trainer.max_step" in str(err.value.__cause__)
    # Hydra lets an explicit append through; validation still refuses a key the schema lacks.
    with pytest.raises(ConfigError, match=r"trainer.max_step: not a config key of TrainerConfig"):
        validate(compose_config(["+trainer.max_step=10"]))
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["trainer.devices=two"])
    assert isinstance(err.value.__cause__, ValidationError)
    assert "trainer.devices" in str(err.value.__cause__)


def test_cli_refuses_bad_value_before_creating_anything(tmp_path: Path):
    out = tmp_path / "outputs"
    result = run_cli(
        ["xmodal-train", "trainer.devices=0", f"paths.output_dir={out}", "logger=none"], tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "trainer.devices: must be >= 1 (got 0)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # no run dir, no data generated, no rank started
