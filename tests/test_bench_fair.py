"""cnn_gpu/bench/fair.py without a GPU: the tables built from fake timings, the ratios, the loss
check's verdict, PyTorch's TF32 switch (on the CPU build, which has the same flags), and the CUDA-event
timing loop run on a fake clock. Nothing here is timed."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from cnn_gpu.bench import fair, run


def _row(net="seed", mode="train", batch=256, precision="fp32", **values):
    row = {"net": net, "mode": mode, "batch": batch, "precision": precision, "torch_format": "NCHW"}
    row.update(values)
    return row


def test_ratio_is_ours_over_torchs_images_per_second():
    row = _row(ours_eager_s=0.002, torch_eager_s=0.003, ours_graph_s=0.001)
    assert fair.ratio(row, "eager") == pytest.approx(1.5)
    assert fair.ratio(row, "graph") is None  # PyTorch's captured step is missing


def test_tables_put_the_fp32_headline_first_with_both_executions():
    rows = [_row(precision="tf32", ours_eager_s=0.001, torch_eager_s=0.001, ours_graph_s=0.0005, torch_graph_s=0.001,
                 loss_rel_diff=1e-3, graph_loss_rel_diff=1e-6),
            _row(ours_eager_s=0.004, torch_eager_s=0.002, ours_graph_s=0.001, torch_graph_s=0.002,
                 loss_rel_diff=2e-6, graph_loss_rel_diff=1e-7),
            _row(mode="infer", batch=64, ours_eager_s=0.0001, torch_eager_error="RuntimeError: x", ours_graph_s=0.00005,
                 torch_graph_s=0.0001)]
    settings = {"fp32": {"ours": "FP32", "torch": "cudnn.conv.fp32_precision=ieee"},
                "tf32": {"ours": "TF32", "torch": "t"}}
    text = fair.format_tables(rows, settings)
    fp32, tf32 = text.index("FP32 against FP32"), text.index("TF32 against TF32")
    assert fp32 < tf32
    assert "cudnn.conv.fp32_precision=ieee" in text[fp32:tf32]
    lines = [line for line in text.splitlines() if line.startswith("| seed")]
    assert lines[0].split(" | ")[3:9] == ["64000", "128000", "**0.50**", "256000", "128000", "**2.00**"]  # fp32
    assert "failed" in lines[1] and "| - |" in lines[1]           # PyTorch's eager inference failed: no ratio
    assert lines[0].rstrip(" |").endswith("ok vs torch 2.0e-06, graph vs eager 1.0e-07")
    assert lines[2].split(" | ")[3:9] == ["256000", "256000", "**1.00**", "512000", "256000", "**2.00**"]


def test_a_loss_mismatch_is_marked_and_fails_the_check():
    good = _row(loss_rel_diff=5e-4, graph_loss_rel_diff=1e-6)
    assert fair.loss_ok(good) and fair.loss_ok(_row(mode="infer"))
    assert not fair.loss_ok(_row(loss_rel_diff=5e-3))                      # beyond FP32's tolerance
    assert fair.loss_ok(_row(precision="tf32", loss_rel_diff=5e-3))        # within TF32's
    assert not fair.loss_ok(_row(graph_loss_rel_diff=1e-2))                # captured step off its eager step
    assert not fair.loss_ok(_row(loss_rel_diff=float("nan")))
    assert "MISMATCH" in fair._loss_cell(_row(loss_rel_diff=5e-3))
    assert fair.relative_difference([1.0, 2.0], [1.0, 2.2]) == pytest.approx(0.2 / 2.2)


class _FakeClock:
    """Events that read a fake time, advanced by the steps themselves: 'elapsed' is what the steps took."""

    def __init__(self):
        self.now = 0.0

    def clock(self):
        fake = self

        class Event:
            def record(self):
                self.t = fake.now

            def synchronize(self):
                pass
        return fair.Clock(Event, lambda start, end: end.t - start.t)


def test_time_steps_takes_the_median_over_rounds_of_inner_steps():
    fake = _FakeClock()
    costs = iter([5.0] * 3 + [2.0, 2.0, 9.0, 2.0, 2.0] * 8)  # ms per call: 3 warm-up calls, then rounds

    def step():
        fake.now += next(costs)
    t = fair.time_steps({"ours": step}, {"ours": fake.clock()}, warmup=3, repeats=8, inner=5)
    assert t["ours"] == pytest.approx(17.0 / 5 / 1e3)  # each round of 5 steps takes 17 ms


def test_torch_tf32_switch_sets_and_reads_back_both_flags():
    torch = pytest.importorskip("torch")
    conv_before, matmul_before = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    try:
        text = fair.set_torch_tf32(torch, False)
        assert torch.backends.cudnn.conv.fp32_precision == "ieee" == torch.backends.cuda.matmul.fp32_precision
        assert "cudnn.conv.fp32_precision=ieee" in text and "cuda.matmul.fp32_precision=ieee" in text
        fair.set_torch_tf32(torch, True)
        assert torch.backends.cudnn.conv.fp32_precision == "tf32" == torch.backends.cuda.matmul.fp32_precision
    finally:
        torch.backends.cudnn.conv.fp32_precision = conv_before
        torch.backends.cuda.matmul.fp32_precision = matmul_before


def test_torch_tf32_switch_uses_the_legacy_flags_before_pytorch_2_9():
    legacy = SimpleNamespace(backends=SimpleNamespace(cudnn=SimpleNamespace(allow_tf32=True),
                                                      cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=True))))
    assert fair.set_torch_tf32(legacy, False) == "cudnn.allow_tf32=False, cuda.matmul.allow_tf32=False"


def test_the_gpu_options_are_parsed():
    args = run.parse_args(["--backend", "cupy", "--precisions", "fp32", "--executions", "graph"])
    assert args.precisions == ["fp32"] and args.executions == ["graph"]
    defaults = run.parse_args([])
    assert defaults.precisions == ["fp32", "tf32"] and defaults.executions == ["eager", "graph"]
