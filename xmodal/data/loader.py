"""The DataLoader over a ``ShardStream`` that Lightning can checkpoint and resume.

Lightning integration (checked against lightning 2.6 ``fit_loop.py`` / ``combined_loader.py``):
Lightning calls ``state_dict()`` on each *DataLoader* object returned by ``train_dataloader()`` that
implements ``state_dict``/``load_state_dict`` (``_Stateful``), saves the list under
``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]`` and calls ``load_state_dict`` in
``FitLoop.setup_data`` *before* the first ``iter()`` of a resumed fit. A plain DataLoader has no
such methods; use ``StreamLoader``, which delegates them to the stream and counts the batches it hands
out. Because the loader has a ``__len__``, Lightning does not prefetch ahead, so "batches handed out"
equals "batches trained" when a checkpoint is written. Lightning calls ``set_epoch`` only on the
DataLoader's sampler; ``StreamLoader`` exposes a sampler proxy that forwards ``set_epoch`` to the stream,
so the epoch follows ``trainer.current_epoch`` without a callback.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from xmodal.data.stream import ShardStream


class _EpochSampler:
    """Stands in for the DataLoader's sampler so Lightning's ``set_epoch`` call reaches the stream."""

    def __init__(self, inner: Any, stream: ShardStream):
        self.inner, self.stream = inner, stream

    def __iter__(self) -> Iterator[Any]:
        return iter(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)


_PACKED = "__packed_tensors__"


def pack_tensors(batch: Any) -> Any:
    """Worker side of the hand-over: every tensor of the batch copied into one uint8 buffer.

    Each tensor a worker hands over becomes its own shared-memory segment, and the main process
    fetches each segment's file descriptor through a socket handshake (~0.7 ms apiece on CPU):
    for ids, masks, labels and ``valid`` flags that costs far more than their bytes. Packed, a
    batch crosses as one segment; the extra copy of the images (~0.1 ms for 64×3×64×64 uint8) is
    cheaper than one handshake. The main process unpacks views of that buffer
    (``unpack_tensors``), keys in their order.
    """
    if not isinstance(batch, dict):
        return batch
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if len(tensors) < 2:
        return batch
    layout, offset = [], 0
    for key, tensor in tensors.items():
        layout.append((key, tensor.dtype, tuple(tensor.shape), offset))
        offset += -(-tensor.numel() * tensor.element_size() // 8) * 8  # 8-byte aligned: any dtype views
    buffer = torch.empty(offset, dtype=torch.uint8)
    for (_, _, _, start), tensor in zip(layout, tensors.values(), strict=True):
        flat = tensor.contiguous().view(-1).view(torch.uint8)
        buffer[start : start + len(flat)] = flat
    return {
        **{k: v for k, v in batch.items() if k not in tensors},
        _PACKED: (buffer, layout, list(batch)),
    }


def unpack_tensors(batch: Any) -> Any:
    """Main-process side of ``pack_tensors`` (a batch that was not packed passes through)."""
    if not isinstance(batch, dict) or _PACKED not in batch:
        return batch
    buffer, layout, order = batch.pop(_PACKED)
    for key, dtype, shape, start in layout:
        size = math.prod(shape) * dtype.itemsize
        batch[key] = buffer[start : start + size].view(dtype).view(shape)
    return {key: batch[key] for key in order}


class StreamLoader(DataLoader):
    """A DataLoader over a ``ShardStream`` that Lightning can checkpoint and resume.

    ``batch_size=None`` (the stream batches), ``num_workers`` = the topology's. It counts the batches
    it hands out (``mark_consumed``), implements ``state_dict``/``load_state_dict`` (Lightning's
    ``_Stateful``), and forwards ``set_epoch`` from Lightning's sampler hook to the stream.
    """

    def __init__(self, stream: ShardStream, **kwargs: Any):
        workers = kwargs.pop("num_workers", stream.topology.num_workers)
        if workers != stream.topology.num_workers:
            raise ValueError(
                f"num_workers={workers} but the stream's topology has num_workers={stream.topology.num_workers}"
            )
        if kwargs.pop("batch_size", None) is not None:
            raise ValueError("StreamLoader batches inside the stream: leave batch_size unset")
        if workers > 0:
            kwargs.setdefault("collate_fn", pack_tensors)  # undone in _Counting, main process
        super().__init__(stream, batch_size=None, num_workers=workers, **kwargs)

    @property  # type: ignore[override]
    def sampler(self) -> Any:
        return self._epoch_sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:
        self._epoch_sampler = _EpochSampler(value, self.dataset)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        stream: ShardStream = self.dataset  # type: ignore[assignment]
        stream.begin_iteration()
        iterator = super().__iter__()
        return _Counting(iterator, stream)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)  # type: ignore[attr-defined]


class _Counting:
    def __init__(self, iterator: Iterator[Any], stream: ShardStream):
        self.iterator, self.stream = iterator, stream

    def __iter__(self) -> _Counting:
        return self

    def __next__(self) -> Any:
        batch = unpack_tensors(next(self.iterator))
        self.stream.mark_consumed(1)
        return batch

    def __len__(self) -> int:
        return len(self.stream)
