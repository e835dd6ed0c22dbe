"""EMA of a task's weights (``model.ema_decay``): samples, metrics and saved checkpoints use it.

The GAN keeps its own EMA generator (``model.gan.ema_decay``: G alone is averaged, D never is);
this callback gives every other task the same, over all its trainable parameters:

- after each training batch ``ema ← d·ema + (1−d)·w`` with the warm-up decay of xmodal/nn/ema.py;
- for a validation pass inside ``fit`` the EMA weights are swapped in (so metrics, the sample grid
  and the checkpoints written at the pass's end hold them) and the raw weights swapped back when
  training resumes (next batch, or the end of training);
- the checkpoint keeps the raw weights beside (callback state), so a resume continues training
  the raw weights exactly; ``xmodal-eval``, ``xmodal.load`` and the test pass on ``best.ckpt`` read
  the EMA weights as the model's own.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from xmodal.nn.ema import ema_decay


class EMAWeights(L.Callback):
    def __init__(self, decay: float, start: int = 0):
        self.decay = decay
        self.start = start
        self.shadow: dict[str, torch.Tensor] = {}
        self.raw: dict[str, torch.Tensor] | None = None
        """The raw weights while the EMA ones are swapped in (None otherwise)."""
        self._restored_raw: dict[str, torch.Tensor] | None = None
        self.updates = 0

    @staticmethod
    def _params(pl_module: Any) -> dict[str, torch.Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        params = self._params(pl_module)
        if self._restored_raw is not None:  # resumed from a checkpoint written with EMA swapped in
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self._restored_raw[name].to(p.device))
            self._restored_raw = None
        if not self.shadow:
            self.shadow = {n: p.detach().clone() for n, p in params.items()}
        else:
            self.shadow = {n: t.to(params[n].device) for n, t in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        decay = ema_decay(self.decay, self.updates, self.start)
        for name, p in self._params(pl_module).items():
            self.shadow[name].lerp_(p.detach(), 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def _swap(self, pl_module: Any, weights: dict[str, torch.Tensor]) -> None:
        for name, p in self._params(pl_module).items():
            p.copy_(weights[name])

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == "fit" and self.shadow and self.raw is None:
            self.raw = {n: p.detach().clone() for n, p in self._params(pl_module).items()}
            self._swap(pl_module, self.shadow)

    def _restore_raw(self, pl_module: Any) -> None:
        if self.raw is not None:
            self._swap(pl_module, self.raw)
            self.raw = None

    # Not on_validation_end: Lightning runs checkpoint callbacks last, so the raw weights come back
    # when training goes on, after every checkpoint of the pass has been written with the EMA ones.
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self._restore_raw(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._restore_raw(pl_module)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"shadow": self.shadow, "updates": self.updates}
        if self.raw is not None:  # saved mid-validation: the model's state_dict holds the EMA weights
            state["raw"] = self.raw
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = {n: t.clone() for n, t in state["shadow"].items()}
        self.updates = int(state["updates"])
        self._restored_raw = state.get("raw")
