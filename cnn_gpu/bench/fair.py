"""The GPU benchmark, like for like: ours against PyTorch + cuDNN on the same card, in one process.

    python -m cnn_gpu.bench --backend cupy                      # run.py hands the GPU run to main() here
    python -m cnn_gpu.bench --backend cupy --precisions fp32 --executions graph --nets seed

Precision. PyTorch runs cuDNN convolutions in TF32 by default (torch.backends.cudnn.conv
.fp32_precision, allow_tf32 before 2.9), its matmuls in full FP32; our GEMMs run in full FP32
unless asked (cnn_gpu.cuda.gemm.set_tf32, CuPy's compute type). So the headline table is FP32
against FP32 -- PyTorch's TF32 switched off for both convolutions and matmuls, read back and printed
in the header -- and a second table TF32 against TF32 (both switched on, on both sides).

Execution. Eager against eager (our Python step against PyTorch's), and captured against captured:
ours a CUDA graph of the whole step (cnn_gpu.training.captured.CapturedStep / CapturedForward),
PyTorch's its whole-network torch.cuda.graph capture, warmed up on a side stream as its
documentation does it. A training step is forward, cross-entropy, backward and an SGD-with-momentum
update; inference an eval-mode forward (PyTorch under inference_mode eagerly, no_grad captured).

Networks: workloads.NETS at batch 64, 256 and 1024, PyTorch's built by reference.to_torch from our
own seeded weights: the same graph of layers, the same starting point. Before the timing, both
take the same three SGD steps on the same batch, and their losses are compared (loss_rel_diff, the
largest relative difference over the steps; a mismatch beyond LOSS_TOLERANCE fails the run); our
captured step's losses are compared with our eager step's too.

Timing: CUDA events around `inner` steps with no synchronization between steps, rounds interleaved
between the four (ours and PyTorch's, eager and captured), after `warmup` steps each; the median
over `repeats` rounds. images/s = batch / seconds per step; ratio = ours / PyTorch's (> 1: ours faster).
PyTorch's memory format (NCHW or channels_last) is chosen per row by a short FP32 eager trial.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
from typing import Any, Callable, NamedTuple

import numpy as np

from ..backend import require_cupy
from . import workloads
from .reference import to_torch, torch_or_reason

PRECISIONS = ("fp32", "tf32")
EXECUTIONS = ("eager", "graph")
# Largest relative difference of the losses of three SGD steps, ours against PyTorch's: float32
# rounding in other summation orders (cuDNN's algorithms, our GEMMs), or TF32's 10-bit mantissas.
LOSS_TOLERANCE = {"fp32": 1e-3, "tf32": 3e-2}
CAPTURED_LOSS_TOLERANCE = 1e-4  # our captured step against our eager step: other GEMM calls only
LOSS_STEPS = 3


# ---- precision --------------------------------------------------------------------------------------

def set_torch_tf32(torch: Any, enabled: bool) -> str:
    """Switch PyTorch's TF32 for cuDNN convolutions and for matmuls; return the settings read back.
    PyTorch 2.9+ has fp32_precision ('ieee' | 'tf32'; mixing it with the older allow_tf32 flags is
    an error there), older versions the allow_tf32 flags."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        value = "tf32" if enabled else "ieee"
        cudnn_conv.fp32_precision = value
        torch.backends.cuda.matmul.fp32_precision = value
        return (f"cudnn.conv.fp32_precision={cudnn_conv.fp32_precision}, "
                f"cuda.matmul.fp32_precision={torch.backends.cuda.matmul.fp32_precision}")
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
    return (f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")


def set_precision(torch: Any, precision: str) -> dict[str, str]:
    """Both sides at `precision` ('fp32' or 'tf32'); what each now runs, read back."""
    from ..cuda import gemm  # noqa: PLC0415
    enabled = precision == "tf32"
    gemm.set_tf32(enabled)
    ours = f"CuPy compute type for float32: {'TF32' if gemm.tf32_enabled() else 'FP32'} (our handle follows it)"
    return {"ours": ours, "torch": set_torch_tf32(torch, enabled) if torch is not None else "no torch"}


# ---- steps ------------------------------------------------------------------------------------------

class Clock(NamedTuple):
    """CUDA events of one library: event() makes one, elapsed_ms(start, end) reads two."""

    event: Callable[[], Any]
    elapsed_ms: Callable[[Any, Any], float]


def cupy_clock() -> Clock:
    cupy = require_cupy()
    return Clock(cupy.cuda.Event, cupy.cuda.get_elapsed_time)


def torch_clock(torch: Any) -> Clock:
    return Clock(lambda: torch.cuda.Event(enable_timing=True), lambda start, end: start.elapsed_time(end))


def ours_step(net: str, batch: int, mode: str, execution: str) -> Callable[[], Any]:
    """Our step of a benchmark row, eager (workloads.ours) or replayed from a CUDA graph."""
    if execution == "eager":
        return workloads.ours(net, batch, mode, "cupy")
    from ..optim import SGD  # noqa: PLC0415
    from ..training.captured import CapturedForward, CapturedStep  # noqa: PLC0415
    cupy = require_cupy()
    model = workloads.network(net).to("gpu")
    x, labels = (cupy.asarray(a) for a in workloads.random_batch(batch))
    if mode == "infer":
        return CapturedForward(model.eval(), x)
    return CapturedStep(model, SGD(model.parameters(), lr=workloads.LR, momentum=workloads.MOMENTUM), x, labels)


def torch_step(torch: Any, net: str, batch: int, mode: str, execution: str, channels_last: bool) -> Callable[[], Any]:
    """PyTorch's step of a benchmark row on our network (to_torch), eager or torch.cuda.graph-captured.
    Returns a function that runs one step (and returns the loss tensor in training)."""
    model = to_torch(workloads.network(net), workloads.INPUT_SHAPE).cuda()
    xn, ln = workloads.random_batch(batch)
    x = torch.from_numpy(xn.transpose(0, 3, 1, 2).copy()).cuda()  # (N, 1, 28, 28)
    labels = torch.from_numpy(ln).cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if mode == "infer":
        model.eval()
        if execution == "eager":
            def infer() -> Any:
                with torch.inference_mode():
                    return model(x)
            return infer
        return _torch_graph(torch, lambda: model(x), no_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=workloads.LR, momentum=workloads.MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels)
        loss.backward()
        opt.step()
        return loss
    if execution == "eager":
        return step
    return _torch_graph(torch, step)


def _torch_graph(torch: Any, body: Callable[[], Any], no_grad: bool = False, warmup: int = 3) -> Callable[[], Any]:
    """body() captured into a torch.cuda.CUDAGraph after `warmup` runs on a side stream (which,
    for a training step, are real steps); returns replay, which returns body()'s output tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            out = body()

    def replay() -> Any:
        graph.replay()
        return out
    return replay


# ---- the loss check ---------------------------------------------------------------------------------

def relative_difference(a: list[float], b: list[float]) -> float:
    """The largest |a_i - b_i| / max(|b_i|, 1e-12)."""
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def loss_check(torch: Any, net: str, batch: int) -> dict[str, Any]:
    """Three SGD steps of ours (eager and captured) and PyTorch's eager on the same batch from the same
    weights: their losses and largest relative differences."""
    from ..functional import softmax_cross_entropy  # noqa: PLC0415
    from ..optim import SGD  # noqa: PLC0415
    from ..training.captured import CapturedStep  # noqa: PLC0415
    cupy = require_cupy()
    xn, ln = workloads.random_batch(batch)
    x, labels = cupy.asarray(xn), cupy.asarray(ln)
    model = workloads.network(net).to("gpu")
    opt = SGD(model.parameters(), lr=workloads.LR, momentum=workloads.MOMENTUM)
    ours = []
    for _ in range(LOSS_STEPS):
        loss, d = softmax_cross_entropy(model.forward(x), labels)
        model.backward(d)
        opt.step()
        opt.zero_grad()
        ours.append(float(loss))
    model = workloads.network(net).to("gpu")
    step = CapturedStep(model, SGD(model.parameters(), lr=workloads.LR, momentum=workloads.MOMENTUM), x, labels)
    captured = [float(step.first_loss)] + [float(step()) for _ in range(LOSS_STEPS - 1)]
    out: dict[str, Any] = {"loss_ours": ours, "loss_ours_graph": captured,
                           "graph_loss_rel_diff": relative_difference(captured, ours)}
    if torch is not None:
        step = torch_step(torch, net, batch, "train", "eager", False)
        theirs = [float(step().detach()) for _ in range(LOSS_STEPS)]
        out.update(loss_torch=theirs, loss_rel_diff=relative_difference(ours, theirs))
    return out


# ---- timing -----------------------------------------------------------------------------------------

def time_steps(steps: dict[str, Callable[[], Any]], clocks: dict[str, Clock], warmup: int, repeats: int,
               inner: int) -> dict[str, float]:
    """Median seconds per step of each function: CUDA events around `inner` steps (nothing synchronized
    between them), rounds interleaved between the functions, after `warmup` steps of each."""
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        end = clocks[name].event()
        end.record()
        end.synchronize()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            clock = clocks[name]
            start, end = clock.event(), clock.event()
            start.record()
            for _ in range(inner):
                step()
            end.record()
            end.synchronize()
            times[name].append(clock.elapsed_ms(start, end) / 1e3 / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def pick_channels_last(torch: Any, net: str, batch: int, mode: str, inner: int) -> bool:
    """Whether PyTorch's step is faster in channels_last than in NCHW here (FP32 eager, 3 rounds)."""
    steps = {fmt: torch_step(torch, net, batch, mode, "eager", fmt == "channels_last")
             for fmt in ("NCHW", "channels_last")}
    t = time_steps(steps, {fmt: torch_clock(torch) for fmt in steps}, 2, 3, inner)
    return t["channels_last"] < t["NCHW"]


# ---- one row and the run ----------------------------------------------------------------------------

def measure_row(torch: Any, net: str, mode: str, batch: int, precision: str, executions: tuple[str, ...],
                channels_last: bool, warmup: int, repeats: int, inner: int) -> dict[str, Any]:
    """Seconds per step of ours and PyTorch's for one (net, mode, batch) at one precision; a step
    that fails is reported in the row (key '<impl>_<execution>_error'), not raised."""
    row: dict[str, Any] = {"net": net, "mode": mode, "batch": batch, "precision": precision,
                           "torch_format": "channels_last" if channels_last else "NCHW"}
    steps, clocks = {}, {}
    for execution in executions:
        makers = {"ours": lambda: ours_step(net, batch, mode, execution)}
        if torch is not None:
            makers["torch"] = lambda: torch_step(torch, net, batch, mode, execution, channels_last)
        for impl, make in makers.items():
            name = f"{impl}_{execution}"
            try:
                step = make()
                step()  # one untimed step: a failure here is reported, not fatal
            except Exception as exc:
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
                print(f"# {net} {mode} {batch} {precision}: {name} failed: {row[f'{name}_error']}", flush=True)
                continue
            steps[name] = step
            clocks[name] = cupy_clock() if impl == "ours" else torch_clock(torch)
    for name, seconds in time_steps(steps, clocks, warmup, repeats, inner).items():
        row[f"{name}_s"] = seconds
    if mode == "train":
        try:
            row.update(loss_check(torch, net, batch))
        except Exception as exc:
            row["loss_error"] = f"{type(exc).__name__}: {exc}"
    return row


def ratio(row: dict[str, Any], execution: str) -> float | None:
    """ours / PyTorch's images per second (= PyTorch's seconds / ours), or None when one is missing."""
    ours, theirs = row.get(f"ours_{execution}_s"), row.get(f"torch_{execution}_s")
    return theirs / ours if ours and theirs else None


def loss_ok(row: dict[str, Any]) -> bool:
    """Whether the row's losses agree (inference rows, and rows without a check, count as agreeing)."""
    if "loss_rel_diff" in row and not row["loss_rel_diff"] <= LOSS_TOLERANCE[row["precision"]]:
        return False
    return not ("graph_loss_rel_diff" in row and not row["graph_loss_rel_diff"] <= CAPTURED_LOSS_TOLERANCE)


def format_tables(rows: list[dict[str, Any]], settings: dict[str, dict[str, str]]) -> str:
    """The rows as one Markdown table per precision: images/s of each side, eager and captured,
    their ratios, and the loss check."""
    out = []
    titles = {"fp32": "FP32 against FP32 (the headline: TF32 off on both sides)",
              "tf32": "TF32 against TF32 (TF32 on for convolutions and matmuls, both sides)"}
    for precision in PRECISIONS:
        chosen = [r for r in rows if r["precision"] == precision]
        if not chosen:
            continue
        setting = settings.get(precision, {})
        out += [f"### {titles[precision]}", "",
                f"ours: {setting.get('ours', '?')}; torch: {setting.get('torch', '?')}", "",
                "| net | mode | batch | ours eager img/s | torch eager img/s | **eager ratio** | "
                "ours graph img/s | torch graph img/s | **graph ratio** | torch format | loss check |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in chosen:
            cells = [r["net"], r["mode"], str(r["batch"])]
            for execution in EXECUTIONS:
                for impl in ("ours", "torch"):
                    seconds = r.get(f"{impl}_{execution}_s")
                    cells.append(f"{r['batch'] / seconds:.0f}" if seconds else
                                 ("failed" if f"{impl}_{execution}_error" in r else "-"))
                value = ratio(r, execution)
                cells.append(f"**{value:.2f}**" if value is not None else "-")
            cells.append(r.get("torch_format", "-"))
            cells.append(_loss_cell(r))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _loss_cell(row: dict[str, Any]) -> str:
    if row["mode"] != "train":
        return "-"
    if "loss_error" in row:
        return "failed"
    parts = []
    if "loss_rel_diff" in row:
        parts.append(f"vs torch {row['loss_rel_diff']:.1e}")
    if "graph_loss_rel_diff" in row:
        parts.append(f"graph vs eager {row['graph_loss_rel_diff']:.1e}")
    return ("ok " if loss_ok(row) else "MISMATCH ") + ", ".join(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The GPU benchmark's own options (run.parse_args adds them to the common ones)."""
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                   help="GPU: fp32 (the headline, TF32 off on both sides) and/or tf32 (default both)")
    p.add_argument("--executions", nargs="+", choices=EXECUTIONS, default=list(EXECUTIONS),
                   help="GPU: eager and/or graph (CUDA-graph captured steps on both sides; default both)")


def main(args: argparse.Namespace) -> int:
    """The GPU benchmark for run.py's parsed arguments; writes args.json after every row. Returns 1
    when a loss check failed (the two sides do not compute the same thing), else 0."""
    from ..cuda import gemm  # noqa: PLC0415
    cupy = require_cupy()
    batches = args.batch_sizes or (64, 256, 1024)
    inner = args.inner or 20
    torch, torch_reason = (None, "skipped (--no-torch)") if args.no_torch else torch_or_reason()
    if torch is not None and not torch.cuda.is_available():
        torch, torch_reason = None, f"torch {torch.__version__} has no CUDA device here"
    if torch is not None:
        torch.backends.cudnn.benchmark = True
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    machine = {"gpu": name, "platform": platform.platform(), "python": platform.python_version(),
               "numpy": np.__version__, "cupy": cupy.__version__,
               "torch": torch.__version__ if torch is not None else torch_reason,
               "cudnn": torch.backends.cudnn.version() if torch is not None else None}
    print(f"# GPU {name}; CuPy {cupy.__version__}; torch {machine['torch']} (cuDNN {machine['cudnn']})")
    print(f"# PyTorch's networks: reference.to_torch of ours (same layers, same initial weights); "
          f"CUDA-event timing, median of {args.repeats} rounds of {inner} steps after {args.warmup} warm-up steps")
    previous_tf32 = gemm.tf32_enabled()
    formats: dict[tuple, bool] = {}
    settings: dict[str, dict[str, str]] = {}
    rows: list[dict[str, Any]] = []
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m cnn_gpu.bench " + " ".join(sys.argv[1:]), "machine": machine,
              "settings": settings, "rows": rows}
    try:
        for precision in args.precisions:
            settings[precision] = set_precision(torch, precision)
            print(f"# {precision}: ours: {settings[precision]['ours']}; torch: {settings[precision]['torch']}",
                  flush=True)
            for net in args.nets:
                for mode in args.modes:
                    for batch in batches:
                        key = (net, mode, batch)
                        if torch is not None and key not in formats:
                            formats[key] = (args.torch_format == "channels_last" if args.torch_format != "auto"
                                            else pick_channels_last(torch, net, batch, mode, inner))
                        row = measure_row(torch, net, mode, batch, precision, tuple(args.executions),
                                          formats.get(key, False), args.warmup, args.repeats, inner)
                        rows.append(row)
                        print(_row_line(row), flush=True)
                        _write(args.json, result)
                        cupy.get_default_memory_pool().free_all_blocks()
                        if torch is not None:
                            torch.cuda.empty_cache()
    finally:
        gemm.set_tf32(previous_tf32)
        if torch is not None:
            set_torch_tf32(torch, True)  # PyTorch's default for convolutions (matmul: back to its default below)
            if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
                torch.backends.cuda.matmul.fp32_precision = "ieee"
            else:
                torch.backends.cuda.matmul.allow_tf32 = False
    print()
    print(format_tables(rows, settings))
    _write(args.json, result)
    print(f"# wrote {args.json}")
    bad = [r for r in rows if not loss_ok(r)]
    for r in bad:
        print(f"# LOSS MISMATCH {r['net']} {r['mode']} {r['batch']} {r['precision']}: ours {r.get('loss_ours')}, "
              f"ours captured {r.get('loss_ours_graph')}, torch {r.get('loss_torch')}")
    return 1 if bad else 0


def _row_line(row: dict[str, Any]) -> str:
    parts = [f"{row['net']:9} {row['mode']:5} {row['batch']:5d} {row['precision']}"]
    for execution in EXECUTIONS:
        for impl in ("ours", "torch"):
            seconds = row.get(f"{impl}_{execution}_s")
            if seconds:
                parts.append(f"{impl} {execution} {row['batch'] / seconds:9.0f} img/s")
        value = ratio(row, execution)
        if value is not None:
            parts.append(f"{execution} ratio {value:.2f}")
    if row["mode"] == "train":
        parts.append(f"loss {_loss_cell(row)}")
    return " | ".join(parts)


def _write(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
