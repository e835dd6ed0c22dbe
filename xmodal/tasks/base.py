"""The task protocol: what every xmodal task (built-in or plug-in) implements and inherits.

A task is a LightningModule built as ``Task(model, tokenizer, data)`` from plain dicts (the
``model`` config node, the tokenizer's state from xmodal/tokenizers/, the data shape of
``xmodal.factory.data_shape``), all saved as hyperparameters, so a checkpoint alone rebuilds it. Besides Lightning's own hooks
(``training_step``, ``validation_step``, ``test_step``, ``configure_optimizers``) a task says:

- ``config_class``: its typed ``model`` node (a :class:`~xmodal.tasks.config.TaskConfig`);
- ``validation_samples(batch) -> SampleSet``: what the samples callback draws and logs;
- ``generate_outputs(inputs, args) -> rows``: what ``xmodal-generate`` prints or writes;
- ``parallelize(mesh)``: how FSDP2 shards it (each family's ``parallelize.py``);
- class-level hints for the Trainer: ``find_unused_parameters`` (DDP), ``clips_own_gradients``
  (manual optimization), ``tests_holdout`` (a ``holdout`` split is tested with ``test_prefix``);
- ``compiled_nets``: the attribute names of its nets, each compiled on its own under
  ``trainer.compile`` and converted under ``trainer.channels_last`` (:meth:`prepare_nets`).

It inherits: uint8 → model units after the device transfer (each role's modality converts its own
entries), the run seed, logger-aware step scalars and the "last evaluation batch" test.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from xmodal.data.batch import to_model_units
from xmodal.images import SampleSet
from xmodal.tasks.config import TaskConfig
from xmodal.tokenizers.build import task_tokenizer

# The hooks live on the task, so they also run for dataloaders handed to trainer.test directly (the
# holdout split, xmodal-eval); Lightning warns when a datamodule is passed too, then uses these.
warnings.filterwarnings(
    "ignore",
    message="You have overridden `(on_after_batch_transfer|transfer_batch_to_device)` in `LightningModule`",
)

# Batch entries that are per-row Python metadata (see BatchCollate): never tensors, never moved.
METADATA_KEYS = frozenset({"captions", "__key__"})


class NonFiniteStep(NamedTuple):
    """A training step that was skipped: its optimizer step index, what was not finite, its value."""

    step: int
    what: str
    value: float


@dataclass(frozen=True)
class NetOptions:
    """How the Trainer runs a task's nets (``trainer.compile*``, ``trainer.channels_last``): not
    hyperparameters, so a checkpoint loads the same with or without them."""

    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    channels_last: bool = False


class GenerateError(ValueError):
    """``xmodal-generate`` arguments that do not fit this checkpoint (printed, exit code 2)."""


class XmodalTask(L.LightningModule):
    """Base of every task: receives loader batches with compact dtypes and sees model units."""

    config_class: ClassVar[type[TaskConfig]] = TaskConfig
    find_unused_parameters: ClassVar[bool] = False
    """DDP hint: some parameters get no gradient in a backward (a GAN's D step leaves G alone)."""
    clips_own_gradients: ClassVar[bool] = False
    """Manual optimization clipping inside the task: the Trainer gets no ``gradient_clip_val``."""
    tests_holdout: ClassVar[bool] = False
    """After the test split, also test a ``holdout`` split when the data has one."""

    compiled_nets: ClassVar[tuple[str, ...]] = ()
    """Attribute names of the task's nets (e.g. ``("generator", "discriminator")``): each is
    compiled as its own graph under ``trainer.compile`` and converted to channels_last under
    ``trainer.channels_last``. A listed attribute that is None (an optional net) is skipped."""
    net_options: NetOptions = NetOptions()
    """Set by the factory from the ``trainer`` node (:meth:`configure_nets`); defaults: eager, NCHW."""

    test_prefix: str = "test"
    """Metric prefix of ``trainer.test`` (``holdout`` while testing that split)."""

    nonfinite: NonFiniteStep | None = None
    """The last training batch's non-finite loss or gradient (None: finite). The run's
    ``NonFiniteGuard`` callback counts it, clears it, and stops the run after too many in a row."""

    def save_task_hyperparameters(
        self,
        tokenizer: dict[str, Any] | None,
        vocab: list[str] | None,
        data: dict[str, Any] | None,
        ignore: tuple[str, ...] = (),
    ) -> None:
        """What every task's ``__init__(model, tokenizer, data, ..., *, vocab)`` starts with: the
        tokenizer rebuilt from its state (or an old checkpoint's ``vocab``) as ``self.tokenizer``, and
        the constructor's arguments saved as hyperparameters with that state in them, so a
        checkpoint alone rebuilds the task and its tokenizer."""
        if data is None:
            raise TypeError(
                f"{type(self).__name__} needs data= (the data shape of xmodal.factory.data_shape)"
            )
        self.tokenizer = task_tokenizer(tokenizer, vocab)
        # The caller's frame: Lightning reads the constructor's arguments from the frame it is given.
        self.save_hyperparameters(ignore=["vocab", *ignore], frame=inspect.currentframe().f_back)
        self.hparams["tokenizer"] = self.tokenizer.state()  # also for a checkpoint that held a vocab

    # ----------------------------------------------------------------- hooks a task implements
    def validation_samples(self, batch: dict[str, Any]) -> SampleSet:
        """Grids and a table for a fixed batch of validation samples (model units, on CPU)."""
        raise NotImplementedError

    def generate_outputs(self, inputs: dict[str, list[Any]], args: Any) -> list[dict[str, str]]:
        """``xmodal-generate``: ``inputs`` maps a modality to the values given for it (``--image``
        files, ``--caption`` texts, ...); ``args`` has ``num``, ``seed`` and ``out``. Returns one
        row per output (printed as JSON or text); raises :class:`GenerateError` for inputs that do
        not fit."""
        raise GenerateError(f"{type(self).__name__} does not generate")

    def parallelize(self, mesh: Any) -> None:
        """Shard the nets for FSDP2 on the data-parallel ``mesh`` (called once, from configure_model)."""
        raise NotImplementedError(f"{type(self).__name__} has no FSDP2 plan")

    @property
    def sample_step(self) -> int:
        """The step samples are named by (a GAN: its iteration counter)."""
        return int(self.global_step)

    # ----------------------------------------------------------------- what every task shares
    def configure_model(self) -> None:
        """Under ``trainer=fsdp2`` apply the family's plan, then compile / convert the nets
        (:meth:`prepare_nets`); Lightning calls this hook again for test/validate after fit, so
        each happens once."""
        if self.device_mesh is not None and not getattr(self, "_parallelized", False):
            self.parallelize(self.device_mesh["data_parallel"])
            self._parallelized = True
        self.prepare_nets()

    def configure_nets(
        self,
        compile: bool = False,
        compile_mode: str = "default",
        compile_backend: str = "inductor",
        channels_last: bool = False,
    ) -> None:
        """Ask for compiled and/or channels_last nets (applied by :meth:`prepare_nets`)."""
        self.net_options = NetOptions(compile, compile_mode, compile_backend, channels_last)

    def prepare_nets(self) -> None:
        """Each net of :attr:`compiled_nets`, once: to channels_last, then compiled in place.

        ``nn.Module.compile`` rather than ``torch.compile(net)``: the module stays itself (no
        ``OptimizedModule`` wrapper), so state_dict keys carry no ``_orig_mod.`` and a checkpoint
        of a compiled run loads into an uncompiled task; it runs after FSDP2's ``fully_shard``, so
        the sharding hooks are part of what is traced. Compilation itself is lazy (first call),
        after Lightning has moved the module to its device.
        """
        if getattr(self, "_nets_prepared", False):
            return
        self._nets_prepared = True
        options = self.net_options
        if (options.compile or options.channels_last) and not self.compiled_nets:
            warnings.warn(
                f"trainer.compile / trainer.channels_last: {type(self).__name__} lists no nets in "
                "compiled_nets; its nets run as they are",
                stacklevel=2,
            )
        for name in self.compiled_nets:
            net = getattr(self, name, None)
            if net is None:
                continue
            if options.channels_last:
                net.to(memory_format=torch.channels_last)  # only 4-D weights change (convolutions)
            if options.compile:
                # Modes are inductor's; other backends (aot_eager, eager in tests) take none.
                mode = options.compile_mode if options.compile_backend == "inductor" else None
                net.compile(backend=options.compile_backend, mode=mode)

    @contextmanager
    def eager_nets(self) -> Iterator[None]:
        """Run the listed nets uncompiled inside the block (autoregressive decoding: a key/value
        cache that grows each step would trace a new graph per length, each one a compile)."""
        nets = [getattr(self, name, None) for name in self.compiled_nets]
        saved = [(net, net._compiled_call_impl) for net in nets if net is not None]
        for net, _ in saved:
            net._compiled_call_impl = None
        try:
            yield
        finally:
            for net, compiled in saved:
                net._compiled_call_impl = compiled

    @property
    def run_seed(self) -> int:
        """The run's seed (``L.seed_everything`` exports it to every rank and worker)."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        # Lightning's default walks every element of the caption and key lists: several hundred
        # Python calls a batch (~0.5 ms on CPU) to move nothing.
        non_blocking = device.type == "cuda"
        moved = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                moved[key] = value.to(device, non_blocking=non_blocking)
            elif key in METADATA_KEYS:
                moved[key] = value
            else:
                moved[key] = move_data_to_device(value, device)
        return moved

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict):
            return batch
        batch = to_model_units(batch, self.hparams.get("data", {}).get("roles"))
        return to_channels_last(batch) if self.net_options.channels_last else batch

    def finite_or_skip(self, loss: torch.Tensor) -> torch.Tensor | None:
        """``loss`` when it is finite on every rank; else None, recorded in :attr:`nonfinite`.

        Automatic optimization: ``return self.finite_or_skip(loss)`` from ``training_step``. Given
        None, Lightning (2.6, checked) still zeroes the gradients but skips backward; the optimizer
        then finds no gradient and changes nothing (AdamW: no update, no decay), a GradScaler skips
        its step. Manual optimization, which skips its own steps, calls it for the record only.

        Costs one host sync a step, plus under several ranks one all-reduce of a flag: every rank
        must take the same branch, or DDP's gradient all-reduce waits for the ranks that skipped.
        """
        detached = loss.detach()
        local = bool(torch.isfinite(detached).all())
        finite = local
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(local, all=True)
        if finite:
            return loss
        what = "loss" if not local else "loss on another rank (this rank's)"
        self.nonfinite = NonFiniteStep(int(self.global_step), what, float(detached.float().mean()))
        return None

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """A finite loss can still back-propagate an infinite or NaN gradient (log or sqrt at 0, an
        overflow): drop the gradients, so the optimizer skips the step, and record it.

        Automatic optimization only (manual tasks check their own), and not under a GradScaler,
        which skips inf steps itself and lowers its scale on them as a matter of course. Under DDP
        the gradients are already all-reduced, so every rank sees the same norm; under FSDP2 the
        norm is reduced over the shards.
        """
        if not self.automatic_optimization or self.nonfinite is not None:
            return
        trainer = self._trainer
        if trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # DTensor (FSDP2)
            norm = norm.full_tensor()
        if bool(torch.isfinite(norm)):
            return
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite = NonFiniteStep(int(self.global_step), "gradient norm", float(norm))

    def log_train_scalars(
        self, scalars: dict[str, Any], batch_size: int, prog_bar: tuple[str, ...] = ()
    ) -> None:
        """Training-step scalars, handed to ``self.log`` on the steps whose values reach the logger.

        Each ``self.log`` call walks the logged metric's whole state (~0.3 ms on CPU, Lightning
        2.6): a VAE step logging five scalars spent 1.5 % of its 100 ms there. Step values logged
        between two logger writes are overwritten unread, so those steps log only the
        progress-bar scalars, which the bar shows every step (when there is a bar).
        """
        writes = self._logger_writes_this_step()
        shown = self._trainer is None or self._trainer.progress_bar_callback is not None
        for name, value in scalars.items():
            if writes or (shown and name in prog_bar):
                self.log(name, value, prog_bar=name in prog_bar, batch_size=batch_size)

    def _logger_writes_this_step(self) -> bool:
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)  # private: if it moves, log every step
        if trainer is None or connector is None:
            return True
        return bool(connector.should_update_logs or trainer.fast_dev_run)

    def eval_batches(self) -> float:
        """Batches of the running evaluation on this rank (exact epochs: the same on every rank)."""
        trainer = self.trainer
        if trainer.sanity_checking:
            counts = trainer.num_sanity_val_batches
        else:
            counts = trainer.num_test_batches if trainer.testing else trainer.num_val_batches
        return counts[0] if counts else float("inf")

    def is_last_eval_batch(self, batch_idx: int) -> bool:
        """Whether this is the running evaluation's last batch: split-level scores are computed
        there rather than in ``on_*_epoch_end``, because callbacks' epoch-end hooks (the metrics
        file, checkpoint selection) run before the module's and must see them, and all ranks
        reach it together (exact epochs pad), so a reduction there pairs up across ranks."""
        return batch_idx + 1 >= self.eval_batches()


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights an optimizer should hold: frozen ones (a pretrained encoder's,
    xmodal/nn/pretrained.py) get no optimizer state and no weight decay."""
    return [p for p in module.parameters() if p.requires_grad]


def to_channels_last(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its 4-D float tensors (images ``[B, C, H, W]``, log-mels ``[B, 1, M, T]``)
    in channels_last memory, as the converted conv nets want them; values are unchanged."""
    return {
        key: value.contiguous(memory_format=torch.channels_last)
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point()
        else value
        for key, value in batch.items()
    }


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on ``device`` (lists of keys and captions as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def condition_names(batch: dict[str, Any], condition: str | list[str]) -> list[str]:
    """What each row of a conditional sample batch was asked for: its label, or its first caption
    (a list of conditions is named by its first)."""
    rows = len(batch["__key__"])
    first = condition if isinstance(condition, str) else next(iter(condition), "none")
    if first == "label":
        return [f"label {int(y)}" for y in batch["label"]]
    captions = batch.get("captions") or [[] for _ in range(rows)]
    return [caps[0] if caps else "" for caps in captions]
