"""The benchmark driver: time every configuration, ours and PyTorch's side by side, print a
table, write JSON. With --backend cupy the run is fair.py's (FP32 against FP32 and TF32 against
TF32, eager and captured, CUDA-event timing); what follows describes the CPU run.

What a row measures (one network of workloads.NETS: the seed CNN with or without batch norm, the
zoo's resnet20 and depthwise mobilenet; one batch size):
    train  images/s of a training step: forward, loss, backward, SGD-with-momentum update
    infer  images/s of an eval-mode forward (PyTorch under torch.inference_mode)
ours and PyTorch's steps are timed in alternation, round after round, after a warm-up, and
each reports the median over the rounds: load from other processes on a shared machine then
hits both alike, and their ratio (ours / PyTorch, > 1 means we are faster) is what counts.
Before each timed block the run idles --settle seconds (20 ms) and then takes one untimed step
of the same library: on several threads each library's workers spin for a while after its step
(PyTorch's OpenMP threads, ours: spin.py) and would otherwise take cores from the other
library's next step; after the pause the other's threads sleep, and the untimed step wakes this
one's, so each block runs as in a process of its own stepping back to back (BENCHMARKS.md,
"Session 15").

%GEMM is the row's useful FLOP rate (flops.py: forward or training FLOPs per image x
images/s) as a share of the float32 GEMM rate NumPy's BLAS (cuBLAS through CuPy on the GPU)
reaches on a large square matmul, measured in the same run.

Peak memory: see memory.py (CPU: a fresh process per configuration, resident-set
high-water mark minus the resident set before the first step). On the GPU: the bytes the
caching allocator holds after the steps (CuPy's memory pool total_bytes, PyTorch's
max_memory_reserved), each less its value before the first step.

Threads: PyTorch gets as many threads as NumPy's BLAS uses (threadpoolctl's report when it is
installed, else the core count); the output says which source gave the number.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from .. import cpu
from ..backend import module_for, synchronize
from ..cpu import threads as cpu_threads
from . import fair, workloads
from .flops import layer_flops, model_flops
from .reference import torch_or_reason

NETS = workloads.NETS
CPU_BATCHES, GPU_BATCHES = (64, 256), (64, 256, 1024)


# -- machine facts ------------------------------------------------------------------------------

def blas_threads() -> tuple[int, str, dict | None]:
    """(NumPy's BLAS thread count, where that number came from, the BLAS library's info)."""
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415 - optional
    except ImportError:
        return os.cpu_count() or 1, "os.cpu_count() (threadpoolctl not installed)", None
    blas = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    if not blas:
        return os.cpu_count() or 1, "os.cpu_count() (threadpoolctl found no BLAS)", None
    return int(blas[0]["num_threads"]), "threadpoolctl", blas[0]


OPENBLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def openblas_env_line() -> str:
    """Whether OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set: some machines set them for old OpenBLAS
    builds, and a current NumPy's OpenBLAS then runs the older GEMM kernels they name, which moves
    every CPU row (BENCHMARKS.md records which setting each table had)."""
    parts = [f"{k}={os.environ[k]}" if k in os.environ else f"{k} unset" for k in OPENBLAS_ENV]
    note = "; set: OpenBLAS uses the kernels they name, not its own pick" \
        if any(k in os.environ for k in OPENBLAS_ENV) else ""
    return ", ".join(parts) + note


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_ceiling(xp: Any, n: int, repeats: int, sync: Callable[[], None]) -> float:
    """Median GFLOP/s of an (n, n) @ (n, n) float32 matmul."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = xp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    out = xp.empty((n, n), dtype=xp.float32)
    xp.matmul(a, b, out=out)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        xp.matmul(a, b, out=out)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


# -- timing -------------------------------------------------------------------------------------

SETTLE_S = 0.02  # idle before each timed block: longer than either library's threads spin after a step


def time_interleaved(steps: dict[str, Callable[[], None]], syncs: dict[str, Callable[[], None]],
                     warmup: int, repeats: int, inner: int, settle: float = 0.0) -> dict[str, float]:
    """Median seconds per step of each function, timed in alternation round after round; with
    settle, each block of `inner` steps after `settle` idle seconds and one untimed step."""
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        syncs[name]()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if settle:
                time.sleep(settle)
                step()
                syncs[name]()
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            syncs[name]()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def pick_torch_format(torch: Any, net: str, batch: int, mode: str, device: str,
                      warmup: int, inner: int, sync: Callable[[], None]) -> tuple[bool, str]:
    """(channels_last?, 'NCHW' | 'channels_last'): whichever steps faster here, on a short trial."""
    steps = {fmt: workloads.torch_step(torch, net, batch, mode, device, fmt == "channels_last")
             for fmt in ("NCHW", "channels_last")}
    t = time_interleaved(steps, {fmt: sync for fmt in steps}, max(warmup, 1), 5, inner)
    best = min(t, key=t.get)
    return best == "channels_last", best


# -- memory -------------------------------------------------------------------------------------

def cpu_memory(impl: str, net: str, batch: int, mode: str, threads: int,
               channels_last: bool = False) -> dict:
    """Run memory.py in a fresh process (see its docstring); {} with an 'error' if it fails."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [sys.executable, "-m", "cnn_gpu.bench.memory", impl, net, str(batch), mode,
           str(threads)] + (["channels_last"] if channels_last else [])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gpu_pool_bytes(impl: str, torch: Any = None) -> int:
    if impl == "torch":
        return int(torch.cuda.max_memory_reserved())
    return int(module_for("cupy").get_default_memory_pool().total_bytes())


# -- per-layer breakdown ------------------------------------------------------------------------

def _leaf_layers(model: Any) -> list[tuple[str, Any]]:
    """(path, layer) of every layer without children, in the model's order."""
    return [(name, layer) for name, layer in model.named_layers() if not layer.children]


def layer_breakdown(net: str, batch: int, backend: str, warmup: int, repeats: int) -> list[dict]:
    """Median ms of each leaf layer's forward and backward inside the real training step (the
    plan's, so a ReLU that the layer before it computes costs nothing of its own and its time is
    that layer's), then loss and update, and what the step spends between its layers (the
    graphs' walk, gradient sums of tensors read twice, Python): the step's time less the rest."""
    from ..functional import softmax_cross_entropy  # noqa: PLC0415
    from ..optim import SGD  # noqa: PLC0415
    xp = module_for(backend)
    model = workloads.network(net).to("gpu" if backend == "cupy" else "cpu")
    opt = SGD(model.parameters(), lr=workloads.LR, momentum=workloads.MOMENTUM)
    x, labels = (xp.asarray(a) for a in workloads.random_batch(batch))
    leaves = _leaf_layers(model)
    spent: dict[tuple[int, str], float] = {}  # (leaf, "forward" / "backward") -> ms in this step

    def timed(index: int, kind: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            synchronize()
            t0 = time.perf_counter()
            out = method(*args, **kwargs)
            synchronize()
            spent[index, kind] = spent.get((index, kind), 0.0) + (time.perf_counter() - t0) * 1e3
            return out
        return run

    for i, (_, layer) in enumerate(leaves):  # instance attributes: only this model's layers are timed
        layer.forward = timed(i, "forward", layer.forward)
        layer.backward = timed(i, "backward", layer.backward)
    steps: list[dict[Any, float]] = []
    for r in range(warmup + repeats):
        spent.clear()
        synchronize()
        t0 = time.perf_counter()
        logits = model.forward(x)
        t1 = time.perf_counter()
        _, dlogits = softmax_cross_entropy(logits, labels)
        synchronize()
        t2 = time.perf_counter()
        model.backward(dlogits)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        synchronize()
        t4 = time.perf_counter()
        if r >= warmup:
            step = dict(spent)
            step["loss"], step["update"] = (t2 - t1) * 1e3, (t4 - t3) * 1e3
            step["between"] = (t1 - t0 + t3 - t2) * 1e3 - sum(spent.values())
            steps.append(step)

    def median(key: Any) -> float:
        return statistics.median(step.get(key, 0.0) for step in steps)

    rows = [{"layer": f"{name} {layer!r}", "type": type(layer).__name__,
             "forward_ms": median((i, "forward")), "backward_ms": median((i, "backward"))}
            for i, (name, layer) in enumerate(leaves)]
    rows.append({"layer": "softmax_cross_entropy", "type": "loss", "forward_ms": median("loss"), "backward_ms": 0.0})
    rows.append({"layer": "SGD step", "type": "update", "forward_ms": 0.0, "backward_ms": median("update")})
    rows.append({"layer": "between layers", "type": "between", "forward_ms": median("between"), "backward_ms": 0.0})
    return rows


# -- the run ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cnn-gpu bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="numpy (CPU, the default) or cupy (GPU; PyTorch on cuda with cuDNN)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default: 64 256 on the CPU, 64 256 1024 on the GPU")
    p.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    p.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds; medians are reported (default 15)")
    p.add_argument("--inner", type=int, default=None,
                   help="steps per timed round (default 1 on the CPU, 20 on the GPU)")
    p.add_argument("--settle", type=float, default=SETTLE_S,
                   help=f"idle seconds, then one untimed step, before each timed block: the other library's "
                        f"spinning threads go to sleep (default {SETTLE_S}; 0: neither)")
    p.add_argument("--threads", type=int, default=None,
                   help="limit NumPy's BLAS (through threadpoolctl) and PyTorch to N threads; "
                        "default: the BLAS's own count")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    p.add_argument("--torch-format", choices=("auto", "NCHW", "channels_last"), default="auto",
                   help="PyTorch memory format; auto tries both per row and keeps the faster")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--breakdown", action="store_true", help="per-layer forward/backward times (training)")
    p.add_argument("--gemm-size", type=int, default=None, help="n of the n x n GEMM ceiling (default 2048 / 8192 GPU)")
    p.add_argument("--json", default="bench.json", help="where to write the results (default ./bench.json)")
    fair.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--ranks" or a.startswith("--ranks=") for a in argv):  # the scaling benchmark, under mpiexec
        from .scaling import launch  # noqa: PLC0415
        return launch(argv)
    args = parse_args(argv)
    if args.backend == "cupy":  # the GPU benchmark: FP32 and TF32 tables, eager and captured (fair.py)
        module_for("cupy")  # raises with the reason when CuPy cannot run
        return fair.main(args)
    gpu = args.backend == "cupy"
    xp = module_for(args.backend)  # raises with the reason when CuPy cannot run
    batches = args.batch_sizes or (GPU_BATCHES if gpu else CPU_BATCHES)
    inner = args.inner or (10 if gpu else 1)
    if args.threads is not None:
        try:
            from threadpoolctl import threadpool_limits  # noqa: PLC0415 - optional
        except ImportError:
            print("--threads needs threadpoolctl (pip install threadpoolctl); or start with "
                  "OPENBLAS_NUM_THREADS=N set instead", file=sys.stderr)
            return 2
        _limits = threadpool_limits(limits=args.threads, user_api="blas")  # noqa: F841 - held for the run
    threads, thread_source, blas = blas_threads()
    if args.threads is not None:
        thread_source = "--threads, applied with threadpoolctl"

    torch, torch_reason = (None, "skipped (--no-torch)") if args.no_torch else torch_or_reason()
    device = "cuda" if gpu else "cpu"
    if torch is not None:
        if gpu and not torch.cuda.is_available():
            torch, torch_reason = None, f"torch {torch.__version__} has no CUDA device here"
        elif gpu:
            torch.backends.cudnn.benchmark = True
        else:
            torch.set_num_threads(threads)
    torch_sync = (torch.cuda.synchronize if gpu else (lambda: None)) if torch is not None else None

    gemm_n = args.gemm_size or (8192 if gpu else 2048)
    ceiling = gemm_ceiling(xp, gemm_n, max(3, min(args.repeats, 10)), synchronize)
    flops = {net: model_flops(workloads.network(net), workloads.INPUT_SHAPE) for net in args.nets}

    machine = {
        "platform": platform.platform(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "python": platform.python_version(), "numpy": np.__version__, "backend": args.backend,
        "threads": threads, "thread_source": thread_source,
        "blas": {k: blas[k] for k in ("internal_api", "version", "architecture", "num_threads") if k in blas}
        if blas else None,
        "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                           "OMP_NUM_THREADS") if k in os.environ},
        "torch": torch.__version__ if torch is not None else torch_reason,
        "cpu_kernels": cpu.describe(),
        "cpu_threads": cpu_threads.describe(),
    }
    if gpu:
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        machine["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(f"# {machine['cpu']}, {machine['cores']} cores; NumPy {np.__version__}"
          f" BLAS {machine['blas'] or '?'}; {threads} threads ({thread_source})"
          + (f"; GPU {machine['gpu']}" if gpu else ""))
    print(f"# {openblas_env_line()}")
    print(f"# torch: {machine['torch']}")
    if not gpu:
        print(f"# compiled CPU kernels (cnn_gpu.cpu): {machine['cpu_kernels']}")
        print(f"# threads of our CPU ops (cnn_gpu.cpu.threads): {machine['cpu_threads']}")
    print(f"# GEMM ceiling ({'cuBLAS' if gpu else 'NumPy BLAS'}, float32 {gemm_n}^3): {ceiling:.1f} GFLOP/s")
    for net in args.nets:
        print(f"# {net}: {flops[net]['forward'] / 1e6:.3f} MFLOP/image forward, "
              f"{flops[net]['training'] / 1e6:.3f} training")

    rows = []
    for net in args.nets:
        for mode in args.modes:
            for batch in batches:
                steps = {"ours": workloads.ours(net, batch, mode, args.backend)}
                syncs = {"ours": synchronize}
                fmt = None
                if torch is not None:
                    if args.torch_format == "auto":
                        channels_last, fmt = pick_torch_format(torch, net, batch, mode, device,
                                                               args.warmup, inner, torch_sync)
                    else:
                        fmt, channels_last = args.torch_format, args.torch_format == "channels_last"
                    steps["torch"] = workloads.torch_step(torch, net, batch, mode, device, channels_last)
                    syncs["torch"] = torch_sync
                if gpu:  # the allocators' holdings before the first step
                    gpu_before = {impl: gpu_pool_bytes(impl, torch) for impl in steps}
                row = {"net": net, "mode": mode, "batch": batch, "torch_format": fmt}
                for impl in list(steps):  # one untimed step each: a failure is reported, not fatal
                    try:
                        steps[impl]()
                    except Exception as exc:  # e.g. a CUDA kernel module that is not there yet
                        row[f"{impl}_error"] = f"{type(exc).__name__}: {exc}"
                        del steps[impl]
                        print(f"# {net} {mode} {batch}: {impl} failed: {row[f'{impl}_error']}")
                t = time_interleaved(steps, syncs, args.warmup, args.repeats, inner, args.settle)
                for impl, sec in t.items():
                    ips = batch / sec
                    row[f"{impl}_images_per_s"] = ips
                    row[f"{impl}_gemm_pct"] = 100 * ips * flops[net]["training" if mode == "train" else "forward"] \
                        / (ceiling * 1e9)
                if "torch" in t:
                    row["ratio"] = row["ours_images_per_s"] / row["torch_images_per_s"]
                if not args.no_memory:
                    for impl in t:
                        if gpu:
                            row[f"{impl}_peak_bytes"] = gpu_pool_bytes(impl, torch) - gpu_before[impl]
                        else:
                            mem = cpu_memory(impl, net, batch, mode, threads, fmt == "channels_last")
                            row[f"{impl}_peak_bytes"] = mem.get("rss_peak_delta_bytes")
                            if "tracemalloc_peak_bytes" in mem:
                                row["ours_tracemalloc_bytes"] = mem["tracemalloc_peak_bytes"]
                            if "error" in mem:
                                row[f"{impl}_memory_error"] = mem["error"]
                del steps
                rows.append(row)
                print_row(row, torch_reason, first=len(rows) == 1)

    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m cnn_gpu.bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine, "gemm_gflops": ceiling, "gemm_size": gemm_n,
              "timing": {"warmup": args.warmup, "repeats": args.repeats, "inner": inner, "settle_s": args.settle},
              "flops_per_image": flops,
              "layer_flops": {net: layer_flops(workloads.network(net), workloads.INPUT_SHAPE) for net in args.nets},
              "rows": rows}

    if args.breakdown:
        result["breakdown"] = {}
        for net in args.nets:
            for batch in batches:
                key = f"{net}/train/{batch}"
                result["breakdown"][key] = rows_ = layer_breakdown(net, batch, args.backend,
                                                                  args.warmup, args.repeats)
                print_breakdown(key, rows_)

    if gpu:
        try:
            from . import kernel_bandwidth  # noqa: PLC0415 - written by the CUDA side, may be absent
        except ImportError:
            kernel_bandwidth = None
        if kernel_bandwidth is not None:
            result["kernel_bandwidth"] = kernel_bandwidth.measure()
            for r in result["kernel_bandwidth"]:
                print("# kernel", r)

    with open(args.json, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"# wrote {args.json}")
    return 0


# -- printing -----------------------------------------------------------------------------------

def _mb(b: Any) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def print_row(row: dict, torch_reason: str | None, first: bool) -> None:
    if first:
        print(f"{'net':8} {'mode':5} {'batch':>5} | {'ours img/s':>10} {'%GEMM':>5} {'MB':>5} | "
              f"{'torch img/s':>11} {'%GEMM':>5} {'MB':>5} {'format':>13} | {'ratio':>5}")
    if "ours_images_per_s" not in row:
        print(f"{row['net']:8} {row['mode']:5} {row['batch']:5d} | ours failed: {row.get('ours_error')}")
        return
    torch_cols = (f"{row['torch_images_per_s']:11.0f} {row['torch_gemm_pct']:5.1f} "
                  f"{_mb(row.get('torch_peak_bytes')):>5} {row['torch_format']:>13} | {row['ratio']:5.2f}"
                  if "torch_images_per_s" in row else f"{torch_reason:>37} |     -")
    print(f"{row['net']:8} {row['mode']:5} {row['batch']:5d} | {row['ours_images_per_s']:10.0f} "
          f"{row['ours_gemm_pct']:5.1f} {_mb(row.get('ours_peak_bytes')):>5} | {torch_cols}", flush=True)


def print_breakdown(key: str, rows: list[dict]) -> None:
    """Each leaf layer's row, then the sums per layer type."""
    total = sum(r["forward_ms"] + r["backward_ms"] for r in rows)
    width = max(len(r["layer"]) for r in rows)
    print(f"\n# per-layer times, {key} (median ms of each; the step's parts add to about {total:.2f} ms)")
    by_type: dict[str, list[float]] = {}
    for r in rows:
        share = 100 * (r["forward_ms"] + r["backward_ms"]) / total
        print(f"  {r['layer']:{width}} fwd {r['forward_ms']:7.2f}  bwd {r['backward_ms']:7.2f}  {share:4.0f}%")
        sums = by_type.setdefault(r["type"], [0.0, 0.0])
        sums[0] += r["forward_ms"]
        sums[1] += r["backward_ms"]
    print(f"# by layer type, {key}")
    for name, (fwd, bwd) in sorted(by_type.items(), key=lambda item: -sum(item[1])):
        print(f"  {name:{width}} fwd {fwd:7.2f}  bwd {bwd:7.2f}  {100 * (fwd + bwd) / total:4.0f}%")