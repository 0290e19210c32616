"""The benchmark runs end to end on tiny settings and counts the seed network's FLOPs right.
Nothing here is timed."""
import json

import pytest

from cnn_gpu.bench import main, run
from cnn_gpu.bench.flops import layer_flops, model_flops
from cnn_gpu.models import seed_cnn

# The seed network on 28x28x1, forward multiply-adds per image by hand:
#   conv 1->32 3x3:  26*26 outputs * 3*3*1 * 32   =   194,688
#   conv 32->64 3x3: 11*11 outputs * 3*3*32 * 64  = 2,230,272
#   dense 1600->128: 1600 * 128                   =   204,800
#   dense 128->10:   128 * 10                     =     1,280
#   total                                           2,631,040 MACs = 5,262,080 FLOPs
# A training step adds dW (the same again) and dX (the same, except for layer 0, whose input
# gradient is never computed): 3 * 5,262,080 - 2 * 194,688 = 15,396,864 FLOPs.
SEED_FORWARD_FLOPS = 5_262_080
SEED_TRAINING_FLOPS = 15_396_864


def test_seed_flops_match_hand_count():
    for batch_norm in (False, True):  # batch norm adds no GEMM work
        assert model_flops(seed_cnn(batch_norm=batch_norm), (28, 28, 1)) == {
            "forward": SEED_FORWARD_FLOPS, "training": SEED_TRAINING_FLOPS}
    per_layer = [r["forward_flops"] for r in layer_flops(seed_cnn(), (28, 28, 1)) if r["forward_flops"]]
    assert per_layer == [2 * 194_688, 2 * 2_230_272, 2 * 204_800, 2 * 1_280]


def test_bench_runs_end_to_end_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--batch-sizes", "8", "--repeats", "1", "--warmup", "0", "--no-torch", "--nets", "seed", "seed_bn",
                 "resnet20", "--gemm-size", "64", "--breakdown", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"date", "command", "machine", "gemm_gflops", "flops_per_image", "rows", "breakdown"} <= set(result)
    assert result["machine"]["torch"] == "skipped (--no-torch)"
    assert result["timing"]["settle_s"] == run.SETTLE_S and result["timing"]["inner"] == 1
    assert result["gemm_gflops"] > 0
    assert result["flops_per_image"]["seed"]["training"] == SEED_TRAINING_FLOPS
    rows = result["rows"]
    assert {(r["net"], r["mode"], r["batch"]) for r in rows} == {
        (net, mode, 8) for net in ("seed", "seed_bn", "resnet20") for mode in ("train", "infer")}
    for r in rows:
        assert r["ours_images_per_s"] > 0 and r["ours_gemm_pct"] > 0
        assert r["ours_peak_bytes"] > 0 and r["ours_tracemalloc_bytes"] > 0
        assert "torch_images_per_s" not in r and "ratio" not in r
    layers = [b["layer"] for b in result["breakdown"]["seed/train/8"]]
    assert layers[0].startswith("0 Conv2D") and layers[-2:] == ["SGD step", "between layers"]
    # resnet20: a row per leaf layer of the nested graphs, by path; a ReLU that the batch norm before
    # it computes in its own pass has no forward time of its own
    rows = {b["layer"].split()[0]: b for b in result["breakdown"]["resnet20/train/8"]}
    assert "stage2.block0.shortcut.conv" in rows and "stage1" not in rows
    assert rows["stage1.block0.conv1"]["forward_ms"] > 0 and rows["stage1.block0.conv1"]["backward_ms"] > 0
    assert rows["stage1.block0.relu1"]["forward_ms"] == 0
    assert {b["type"] for b in result["breakdown"]["resnet20/train/8"]} >= {"Conv2D", "BatchNorm2D", "Add", "between"}
    assert "skipped (--no-torch)" in capsys.readouterr().out


def test_each_timed_block_follows_an_idle_settle_and_an_untimed_step(monkeypatch):
    """The idle before each block keeps the other library's spinning threads out of it, the
    untimed step wakes this one's, and neither is in the times. On a fake clock: nothing timed."""
    now, calls, sleeps = [0.0], [], []
    monkeypatch.setattr(run.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(run.time, "sleep", lambda s: (sleeps.append((len(calls), s)), now.__setitem__(0, now[0] + s)))

    def step(name, seconds):
        calls.append(name)
        now[0] += seconds
    steps = {"a": lambda: step("a", 0.001), "b": lambda: step("b", 0.003)}
    t = run.time_interleaved(steps, {"a": lambda: None, "b": lambda: None}, 0, 3, 1, settle=0.05)
    assert calls == ["a", "a", "b", "b"] * 3  # an untimed step, then the timed one
    assert sleeps == [(k, 0.05) for k in range(0, 12, 2)]  # the idle before each untimed step
    assert t == {"a": pytest.approx(0.001), "b": pytest.approx(0.003)}  # the step alone


def test_resnet20_flops_by_hand():
    """ResNet-20 on 28x28x1: the stem (1 -> 16), six 3x3 convs per stage at 28, 14 and 7 pixels (the
    first of stages 2 and 3 with stride 2 from the previous width), two 1x1 projections, the dense layer."""
    from cnn_gpu.models import resnet20
    macs = 28 * 28 * 9 * 1 * 16
    macs += 6 * 28 * 28 * 9 * 16 * 16
    macs += 14 * 14 * 9 * (16 * 32 + 5 * 32 * 32) + 14 * 14 * 16 * 32
    macs += 7 * 7 * 9 * (32 * 64 + 5 * 64 * 64) + 7 * 7 * 32 * 64
    macs += 64 * 10
    flops = model_flops(resnet20(input_shape=(28, 28, 1)), (28, 28, 1))
    assert flops["forward"] == 2 * macs
    assert flops["training"] == 3 * 2 * macs - 2 * 28 * 28 * 9 * 16  # no input gradient for the stem
