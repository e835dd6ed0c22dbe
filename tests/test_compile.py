"""trainer.compile (each net its own graph), model.activation_checkpointing, trainer.channels_last.

Compiled runs use dynamo's ``eager`` / ``aot_eager`` backends: traced and (aot_eager) run through
AOTAutograd like inductor, but no C++ toolchain or code generation, so they run anywhere, fast.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

import xmodal.nn.attention as attention
from xmodal.config import compose_config, config_problems
from xmodal.data.tokenizer import WordTokenizer
from xmodal.factory import build_task
from xmodal.tasks.base import NetOptions, to_channels_last
from xmodal.tasks.caption.task import CaptionTask
from xmodal.tasks.gan.task import AdversarialTask

CAPTIONS = ["a red circle on the left", "a blue square at the top", "a green triangle"]
# A small captioner: two decoder layers (what activation checkpointing wraps), 32 px images.
SMALL = ["data.image_size=32", "model.d_model=32", "model.encoder_channels=[16,32]", "data.max_text_len=12"]


def captioner(*overrides: str) -> CaptionTask:
    torch.manual_seed(0)
    cfg = compose_config([*SMALL, *overrides])
    return build_task(cfg, WordTokenizer.fit(CAPTIONS))


def caption_batch(task: CaptionTask, rows: int = 4) -> dict[str, Any]:
    """Model units: images in [-1, 1], BOS-led token ids, every row valid."""
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(4, len(task.tokenizer), (rows, 10), generator=gen)  # [B, T]
    text[:, 0] = task.tokenizer.bos_id
    return {
        "image": torch.rand(rows, 3, 32, 32, generator=gen) * 2 - 1,
        "text": text,
        "valid": torch.ones(rows, dtype=torch.bool),
    }


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_all_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), name


def gan(**options: Any) -> AdversarialTask:
    """The MNIST-sized DCGAN pair; the GAN task lists both nets (``compiled_nets``)."""
    torch.manual_seed(0)
    cfg = compose_config(["model=gan", "data.image_size=32", "model.gan.g_width=16", "model.gan.d_width=16"])
    task = build_task(cfg, WordTokenizer.fit(CAPTIONS))
    assert task.compiled_nets == ("generator", "discriminator")
    task.net_options = NetOptions(**options)
    return task


# --------------------------------------------------------------------------------- compile
def test_factory_passes_the_trainer_options_and_each_listed_net_is_compiled_once():
    task = captioner("trainer.compile=true", "trainer.compile_backend=eager", "trainer.channels_last=true")
    assert task.net_options == NetOptions(True, "default", "eager", True)
    assert task.encoder._compiled_call_impl is None  # nothing before Lightning's configure_model
    task.configure_model()
    compiled = task.encoder._compiled_call_impl, task.decoder._compiled_call_impl
    assert None not in compiled
    task.configure_model()  # Lightning calls it again for test after fit: nothing is redone
    assert (task.encoder._compiled_call_impl, task.decoder._compiled_call_impl) == compiled
    # In place, no OptimizedModule wrapper: the attributes and the state_dict keys are the plain ones.
    plain = captioner()
    assert type(task.encoder) is type(plain.encoder)
    assert list(task.state_dict()) == list(plain.state_dict())
    assert not [k for k in task.state_dict() if "_orig_mod" in k]
    assert plain.net_options == NetOptions()  # defaults: eager, NCHW
    # Decoding runs the nets uncompiled (a growing key/value cache would compile a graph per
    # length) and leaves them compiled afterwards.
    from torch._dynamo.utils import counters

    task.eval()
    task.caption(caption_batch(task)["image"], max_decode_len=6)
    assert counters["stats"]["unique_graphs"] == 1  # the encoder's forward only
    assert (task.encoder._compiled_call_impl, task.decoder._compiled_call_impl) == compiled


def test_a_task_listing_no_nets_says_so_instead_of_compiling_nothing_silently():
    task = gan(compile=True, compile_backend="eager")
    task.compiled_nets = ()
    with pytest.warns(
        UserWarning, match=r"^trainer.compile / trainer.channels_last: AdversarialTask lists no"
    ):
        task.configure_model()
    assert task.generator._compiled_call_impl is None


def test_gan_generator_and_discriminator_are_two_graphs_matching_eager():
    task, eager = gan(compile=True, compile_backend="aot_eager"), gan()
    task.configure_model()
    assert task.generator._compiled_call_impl is not None
    assert task.discriminator._compiled_call_impl is not None
    assert task.ema is None or task.ema._compiled_call_impl is None  # only the listed nets
    torch._dynamo.reset()
    z = torch.randn(4, task.cfg.gan.z_dim)  # [B, z]
    batch = {"valid": torch.ones(4, dtype=torch.bool)}
    fake = task.generator(z, batch)  # [B, C, H, W]
    torch.testing.assert_close(fake, eager.generator(z, batch), atol=1e-5, rtol=1e-4)
    score = task.discriminator(fake.detach(), batch)  # [B]
    torch.testing.assert_close(score, eager.discriminator(fake.detach(), batch), atol=1e-5, rtol=1e-4)
    # Each net was captured on its own (a D call never re-traces G), with no recompilation.
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] == 2


class Captions(Dataset):
    """Loader batches as the stream delivers them: uint8 images, token ids, the valid flag."""

    def __init__(self, task: CaptionTask, rows: int = 8):
        batch = caption_batch(task, rows)
        self.images = ((batch["image"] + 1) * 127.5).round().to(torch.uint8)
        self.text = batch["text"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "text": self.text[i], "valid": torch.tensor(True)}


def test_checkpoint_of_a_compiled_run_loads_into_an_uncompiled_task(tmp_path):
    task = captioner("trainer.compile=true", "trainer.compile_backend=eager", "model.warmup_steps=0")
    start = copy.deepcopy(task.state_dict())
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, DataLoader(Captions(task), batch_size=4))
    assert task.decoder._compiled_call_impl is not None  # the run trained the compiled nets
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert not [k for k in saved if "_orig_mod" in k]
    loaded = CaptionTask.load_from_checkpoint(path, map_location="cpu", weights_only=False)  # strict
    assert loaded.net_options.compile is False and loaded.decoder._compiled_call_impl is None
    state = loaded.state_dict()
    assert state.keys() == start.keys()
    assert all(torch.equal(state[k], task.state_dict()[k]) for k in state)
    assert any(not torch.equal(state[k], start[k]) for k in state)  # it did train


# ------------------------------------------------------------------------ activation checkpointing
def counting_checkpoint(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = attention.checkpoint

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "checkpoint", counted)
    return calls


def test_activation_checkpointing_gives_the_same_loss_and_gradients_in_training_only(monkeypatch):
    calls = counting_checkpoint(monkeypatch)
    # Dropout on: the recomputation must replay the same dropout masks.
    plain = captioner("model.dropout=0.1")
    recomputed = captioner("model.dropout=0.1", "model.activation_checkpointing=true")
    recomputed.load_state_dict(plain.state_dict())
    assert recomputed.decoder.activation_checkpointing and not plain.decoder.activation_checkpointing
    batch = caption_batch(plain)
    losses = []
    for task in (plain, recomputed):
        task.train()
        torch.manual_seed(5)
        loss = task.loss(batch)
        loss.backward()
        losses.append(loss.detach())
    assert len(calls) == 2  # one per decoder layer, recomputed model only
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    assert_all_close(grads(plain), grads(recomputed), atol=1e-6)
    # Evaluation (with or without autograd) and decoding keep nothing for a backward: no recompute.
    recomputed.eval()
    recomputed.loss(batch)
    with torch.no_grad():
        recomputed.loss(batch)
    recomputed.caption(batch["image"], max_decode_len=4)
    recomputed.train()
    with torch.no_grad():
        recomputed.loss(batch)  # training mode, no autograd (e.g. a sanity pass): nothing to save
    assert len(calls) == 2


# ---------------------------------------------------------------------------------- channels_last
def test_channels_last_converts_conv_nets_and_image_batches_with_the_same_outputs():
    task, plain = captioner("trainer.channels_last=true"), captioner()
    task.configure_model()
    conv = next(p for p in task.encoder.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not next(p for p in plain.encoder.parameters() if p.dim() == 4).is_contiguous(
        memory_format=torch.channels_last
    )
    loader_batch = {
        "image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
        "text": caption_batch(task)["text"],
        "valid": torch.ones(4, dtype=torch.bool),
        "__key__": ["a", "b", "c", "d"],
    }
    batch = task.on_after_batch_transfer(dict(loader_batch), 0)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["image"].stride()[1] == 1  # NHWC in memory
    assert torch.equal(batch["text"], loader_batch["text"]) and batch["__key__"] == ["a", "b", "c", "d"]
    reference = plain.on_after_batch_transfer(dict(loader_batch), 0)
    assert reference["image"].is_contiguous()  # off: batches as they were
    torch.testing.assert_close(task.loss(batch), plain.loss(reference), atol=1e-5, rtol=1e-5)
    # The GAN's conv nets alike: G's images and D's scores match the NCHW nets'.
    g_last, g_plain = gan(channels_last=True), gan()
    g_last.configure_model()
    z, rows = torch.randn(4, g_last.cfg.gan.z_dim), {"valid": torch.ones(4, dtype=torch.bool)}
    fake = g_last.generator(z, rows)
    torch.testing.assert_close(fake, g_plain.generator(z, rows), atol=1e-5, rtol=1e-4)
    image = to_channels_last({"image": fake.detach()})["image"]
    torch.testing.assert_close(
        g_last.discriminator(image, rows), g_plain.discriminator(fake.detach(), rows), atol=1e-5, rtol=1e-4
    )


# ---------------------------------------------------------------------------------- validation
def test_compile_options_are_checked_before_the_run(monkeypatch):
    base = compose_config(["model.decoder={_target_: xmodal.nn.text.TransformerTextDecoder}"])

    def problems(**keys: Any) -> list[str]:
        cfg = copy.deepcopy(base)
        for key, value in {"model.decoder": None, **keys}.items():
            OmegaConf.update(cfg, key, value)
        return [p for p in config_problems(cfg, cuda_available=False) if "compile" in p or "activation" in p]

    assert problems(**{"trainer.compile": True, "trainer.compile_backend": "aot_eager"}) == []
    assert problems(**{"trainer.compile_mode": "fastest"}) == [
        "trainer.compile_mode: must be one of ('default', 'reduce-overhead', 'max-autotune') (got 'fastest')"
    ]
    mode = {
        "trainer.compile": True,
        "trainer.compile_backend": "aot_eager",
        "trainer.compile_mode": "max-autotune",
    }
    assert problems(**mode) == [
        "trainer.compile_mode: is an inductor mode; backend 'aot_eager' takes only 'default' (got 'max-autotune')"
    ]
    [wrong] = problems(**{"trainer.compile": True, "trainer.compile_backend": "inductr"})
    assert wrong.startswith("trainer.compile_backend: is not a torch.compile backend (e.g. ")
    assert wrong.endswith("or the debug ones aot_eager, eager) (got 'inductr')")
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert problems(**{"trainer.compile": True}) == [
        "trainer.compile_backend: inductor on CPU needs a C++ compiler (g++ or clang++) on PATH; "
        "use aot_eager or install one (got 'inductor')"
    ]
    assert problems() == []  # compile off: the toolchain is nobody's business
    custom = {"model.activation_checkpointing": True, "model.decoder": base.model.decoder}
    assert problems(**custom) == [
        "model.activation_checkpointing: applies to the built-in decoder; with model.decoder set, give it "
        "among model.decoder's keys (got True)"
    ]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code and counters are process-wide: every test starts and leaves them empty."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()
