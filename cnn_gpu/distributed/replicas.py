"""One model trained as identical replicas, one per rank: the few calls a training loop makes.

    replicas = Replicas(comm, model, batch_norm_sync="local")   # rank 0's weights everywhere
    for shard in replicas.shards(loader.batches(epoch), transform):  # this rank's part of each batch
        if not replicas.trains_on(shard):        # fewer images than ranks: every rank skips it
            continue
        logits = model.forward(shard.x); loss, dlogits = softmax_cross_entropy(logits, shard.y)
        model.backward(replicas.scaled(dlogits, shard))
        replicas.average_gradients()
        optimizer.step(); optimizer.zero_grad()
    replicas.share_running_statistics()          # before evaluating or saving (see below)
    replicas.on_rank0(lambda: save(...))         # rank 0 writes; the others wait at a barrier

Why the replicas stay identical, bit for bit: they start from rank 0's parameters and buffers
(broadcast at set-up, so also after a resume, where every rank loaded the same checkpoint), every
rank walks the same global batches, and each step every rank applies the same averaged gradient
(one allreduce per bucket, whose result is the same on every rank) with the same optimizer state.

Batch norm's running statistics (set_batch_norm_sync):
- "sync": the statistics are the global batch's, merged the same way on every rank, so every
  rank updates its running statistics with the same numbers.
- "local" (the default, as in PyTorch's DDP): each rank normalizes with its own shard's
  statistics and its running statistics drift apart during an epoch (nothing reads them while
  training). share_running_statistics() replaces them by their mean over ranks; fit() calls it
  at the end of each epoch, before evaluating and saving. The running update is linear
  (r <- (1 - m) r + m s), so from equal starting values the mean of the ranks' running
  statistics is the running average of the ranks' mean batch statistics: what averaging after
  every step would give, for one allreduce an epoch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..layers import Layer
from .batchnorm import set_batch_norm_sync
from .buckets import GradientAverager, average_arrays, broadcast_arrays
from .comm import Communicator
from .sharding import Shard, shard_batches

WAIT_POLL = 0.01  # seconds between looks while the other ranks wait for rank 0 (Communicator.barrier)


class Replicas:
    """A model's replicas on comm's ranks (see the module docstring). With one rank every call
    is the plain single-process step: no copy, no scale, no collective."""

    def __init__(self, comm: Communicator, model: Layer, batch_norm_sync: str = "local") -> None:
        self.comm, self.model, self.batch_norm_sync = comm, model, batch_norm_sync
        self.batch_norms = set_batch_norm_sync(model, comm, batch_norm_sync)
        broadcast_arrays(comm, [p.data for p in model.parameters()] + self._buffers())
        self.averager = GradientAverager(comm, model.parameters())

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def is_rank0(self) -> bool:
        return self.comm.rank == 0

    def shards(self, batches: Iterable[tuple[Any, Any]], transform: Callable[[Any], Any] | None = None
               ) -> Iterator[Shard]:
        """This rank's shard of each global batch (x (B, ...), y (B,)), transform applied to the shard."""
        return shard_batches(batches, self.comm.rank, self.comm.size, transform)

    def trains_on(self, shard: Shard) -> bool:
        """False for a batch with fewer images than ranks (some rank would hold none); the same
        answer on every rank, which all skip it."""
        return shard.batch_len >= self.comm.size

    @staticmethod
    def scaled(dlogits: Any, shard: Shard) -> Any:
        """dlogits times the shard's grad_scale (N b_r / B, sharding.py), in place; unchanged where
        it is 1 (N divides B)."""
        if shard.grad_scale != 1.0:
            dlogits *= dlogits.dtype.type(shard.grad_scale)
        return dlogits

    def average_gradients(self) -> None:
        """Every parameter's .grad becomes its mean over ranks."""
        self.averager.average()

    def share_running_statistics(self, averages: Sequence[Any] = ()) -> None:
        """With local batch-norm statistics on several ranks, every buffer becomes its mean over
        ranks (see the module docstring), and so does each array of `averages` (the weight
        average's buffers, cnn_gpu.ema.WeightEMA.buffers); otherwise they are equal already and
        nothing happens."""
        if self.comm.size > 1 and self.batch_norm_sync == "local":
            average_arrays(self.comm, self._buffers() + list(averages))

    def on_rank0(self, work: Callable[[], Any]) -> None:
        """Run work() on rank 0 only (writing files); the other ranks wait for it at a barrier
        that sleeps between looks, leaving the CPU to rank 0."""
        if self.comm.rank == 0:
            work()
        if self.comm.size > 1:
            self.comm.barrier(poll=WAIT_POLL)

    def _buffers(self) -> list[Any]:
        """The model's buffers (batch norm's running statistics), looked up anew: .to() replaces them."""
        return [value for _, value, _, _ in self.model.named_buffers()]
