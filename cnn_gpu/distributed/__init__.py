"""Data-parallel training over several processes, GPUs and machines, on MPI and NCCL.

Launch one process per rank the way MPI programs are launched; a process started without a
launcher runs alone, exactly as without this package, and never imports mpi4py:

    mpiexec -n 4 cnn-gpu train ...            # one machine (Open MPI, MPICH)
    mpirun -H a,b -n 8 cnn-gpu train ...      # two machines
    srun -n 8 --gpus-per-task 1 cnn-gpu train ...

The pieces, each usable on its own (see each module):

    launch.py     detect_launch(): rank, size and local rank from the launcher's variables;
                  gpu_for_rank(); backend_report() for `cnn-gpu info`
    comm.py       init() -> a communicator (SingleProcess, MPICommunicator, NCCLCommunicator)
                  with broadcast, allreduce_sum, allgather, barrier, sum_scalars, abort, finish
    buckets.py    broadcast_arrays() (rank 0's parameters and buffers everywhere) and
                  GradientAverager (gradients averaged in few flat buffers)
    sharding.py   each rank's shard of every global batch, and the loss-gradient scale that
                  keeps N ranks equal to one process when N does not divide the batch
    batchnorm.py  batch-norm statistics over the global batch (sync batch norm), and
                  set_batch_norm_sync() to choose them for a model's layers
    replicas.py   Replicas: a model's identical copies on the ranks, the calls fit() makes
    watchdog.py   a bounded wait for every collective; one rank's exception stops all ranks
    bench.py      the time of an allreduce by size: latency and bandwidth for the cost model

In cnn_gpu itself, `cnn-gpu train` and cnn_gpu.training.fit(..., comm=comm, batch_norm_sync=...)
do all of the following (through Replicas; tests/test_distributed_fit.py compares N ranks with one
process). What happens, written out for a loop of one's own -- N ranks give one process's
weights up to the order of float sums (tests/test_distributed_mpi.py trains the seed network
both ways):

    comm = init(array_backend=resolve_backend(name))  # before the model or data go to a GPU
    broadcast_arrays(comm, [p.data for p in model.parameters()] + batch_norm_buffers)
    averager = GradientAverager(comm, model.parameters())
    loader = BatchIterator(x, y, batch_size, seed=seed, augment=augment)   # the same on every rank
    for shard in shard_batches(loader.batches(epoch), comm.rank, comm.size, transform=normalize):
        if shard.batch_len < comm.size:             # a rank would get no images: skip, on all ranks
            continue
        logits = model.forward(shard.x)
        loss, dlogits = softmax_cross_entropy(logits, shard.y)
        if shard.grad_scale != 1.0:                 # N b_r / B, when N does not divide B
            dlogits *= dlogits.dtype.type(shard.grad_scale)
        model.backward(dlogits)
        averager.average()
        optimizer.step(); optimizer.zero_grad()
        loss_sum += loss * len(shard.y); correct += ...; seen += len(shard.y)
    loss_sum, correct, seen = comm.sum_scalars([loss_sum, correct, seen])   # sums, not means of means
    ...
    return comm.finish(exit_code)                   # at the end of main(): see Communicator.finish
"""
from __future__ import annotations

from .batchnorm import (BATCH_NORM_SYNC, Moments, SyncBatchNorm, SyncBatchNormCache, allgather_moments,
                        channel_moments, combine_moments, merge_moments, set_batch_norm_sync,
                        sync_batch_norm_backward, sync_batch_norm_forward)
from .buckets import (DEFAULT_BUCKET_BYTES, Bucket, GradientAverager, Segment, average_arrays, broadcast_arrays,
                      check_same_layout, plan_buckets, ranks_agree)
from .comm import (BACKENDS, BackendChoice, Communicator, DistributedError, MPICommunicator, NCCLCommunicator,
                   SingleProcess, choose_backend, init, shared_devices)
from .launch import (SINGLE, BackendStatus, LaunchInfo, backend_report, detect_launch, gpu_for_rank,
                     mpi_unavailable_reason, nccl_unavailable_reason, use_gpu_for_rank)
from .replicas import Replicas
from .sharding import Shard, grad_scale, shard_batches, shard_sizes, shard_slice
from .watchdog import DEFAULT_TIMEOUT, TIMEOUT_VAR, Watchdog, install_excepthook, timeout_from_env

__all__ = [
    "allgather_moments", "average_arrays", "backend_report", "BackendChoice", "BACKENDS", "BackendStatus",
    "BATCH_NORM_SYNC", "broadcast_arrays", "Replicas", "set_batch_norm_sync",
    "Bucket", "channel_moments", "check_same_layout", "choose_backend", "combine_moments", "Communicator",
    "DEFAULT_BUCKET_BYTES", "DEFAULT_TIMEOUT", "detect_launch", "DistributedError", "gpu_for_rank",
    "grad_scale", "GradientAverager", "init", "install_excepthook", "LaunchInfo", "merge_moments", "Moments",
    "mpi_unavailable_reason", "MPICommunicator", "nccl_unavailable_reason", "NCCLCommunicator",
    "plan_buckets", "ranks_agree", "Segment", "Shard", "shard_batches", "shard_sizes", "shard_slice",
    "shared_devices", "SINGLE", "SingleProcess", "sync_batch_norm_backward", "sync_batch_norm_forward",
    "SyncBatchNorm", "SyncBatchNormCache", "timeout_from_env", "TIMEOUT_VAR", "use_gpu_for_rank", "Watchdog",
]
