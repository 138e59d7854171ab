"""Unit tests for the measuring primitives in kdpipe.measure (and the bench stage's table)."""

from __future__ import annotations

import time

import onnx
import pytest
import torch
from rich.console import Console
from safetensors.torch import save
from torch import nn

from kdpipe.bench import render_table
from kdpipe.measure import (
    check_onnx,
    count_params,
    export_onnx,
    flops_per_sample,
    latency,
    measure_tower,
    onnx_latency,
    ratio_table,
    size_bytes,
    throughput,
)


def tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6),
    )
    # non-trivial BN statistics, so a wrong eval/train mode in the export would show
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_count_params():
    assert count_params(nn.Linear(16, 8)) == 16 * 8 + 8
    assert count_params(tiny_convnet()) == (3 * 8 * 9 + 8) + 16 + (8 * 8 * 9 + 8) + (8 * 6 + 6)


def test_flops_linear_and_conv():
    assert flops_per_sample(nn.Linear(16, 8), torch.randn(4, 16)) == 2 * 16 * 8
    conv = nn.Conv2d(3, 4, 3, padding=1)
    assert flops_per_sample(conv, torch.randn(2, 3, 8, 8)) == 2 * 3 * 4 * 9 * 8 * 8


def test_size_fp16_is_about_half():
    lin = nn.Linear(256, 256)
    s32, s16 = size_bytes(lin), size_bytes(lin, torch.float16)
    n = count_params(lin)
    assert 4 * n < s32 < 4 * n + 256  # data plus a small JSON header
    assert 2 * n < s16 < 2 * n + 256
    assert s16 / s32 == pytest.approx(0.5, abs=0.01)


def test_size_keeps_integer_buffers():
    bn = nn.BatchNorm1d(100)  # 4 float tensors + the int64 num_batches_tracked
    state = bn.state_dict()
    kept = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    all_cast = {k: v.half() for k, v in state.items()}
    assert size_bytes(bn, torch.float16) == len(save(kept)) != len(save(all_cast))


def test_latency_fields_and_order():
    def sleepy(x):
        time.sleep(0.002)
        return x

    lat = latency(sleepy, torch.zeros(1, 3), warmup=1, iters=10)
    assert set(lat) == {"p50_ms", "p90_ms", "mean_ms"}
    assert 2.0 <= lat["p50_ms"] <= lat["p90_ms"]
    assert lat["mean_ms"] >= 2.0


def test_throughput_counts_samples():
    def sleepy(x):
        time.sleep(0.01)
        return x

    rate = throughput(sleepy, torch.zeros(8, 3), iters=5, warmup=1)
    assert 300 < rate <= 800  # 8 samples per >= 10 ms call


def test_measure_tower_and_ratios():
    teacher, student = nn.Linear(64, 64), nn.Linear(64, 8)
    x1, xn = torch.randn(1, 64), torch.randn(16, 64)
    t = measure_tower("teacher", teacher, x1, xn, teacher, iters=5, throughput_iters=3)
    s = measure_tower("student", student, x1, xn, student, iters=5, throughput_iters=3)
    assert t["params"] == 64 * 64 + 64 and t["flops_per_sample"] == 2 * 64 * 64
    assert t["batch_n"] == 16 and t["device"] == "cpu" and t["threads"] == torch.get_num_threads()
    assert t["latency_b1_p50_ms"] <= t["latency_b1_p90_ms"] and t["throughput"] > 0
    r = ratio_table(t, {"student": s})["student"]
    assert r["params"] == t["params"] / s["params"] == pytest.approx(4160 / 520)
    assert r["flops_per_sample"] == 8.0
    assert r["size_fp16_bytes"] == t["size_fp16_bytes"] / s["size_fp16_bytes"]
    assert r["latency_b1_p50_ms"] == t["latency_b1_p50_ms"] / s["latency_b1_p50_ms"]
    assert r["throughput"] == s["throughput"] / t["throughput"]


def test_ratio_table_directions_and_missing():
    teacher = {"params": 1000, "latency_b1_p50_ms": 10.0, "throughput": 50.0}
    students = {"a": {"params": 100, "latency_b1_p50_ms": 0.0, "throughput": 200.0}}
    r = ratio_table(teacher, students)["a"]
    assert r["params"] == 10.0  # 10x fewer parameters
    assert r["throughput"] == 4.0  # 4x the samples per second
    assert r["latency_b1_p50_ms"] is None  # zero denominator
    assert r["flops_per_sample"] is None  # not measured


def test_onnx_export_dynamic_batch(tmp_path):
    net = tiny_convnet().train()  # export must switch to eval and switch back
    path = export_onnx(net, torch.randn(1, 3, 16, 16), tmp_path / "sub" / "tower.onnx")
    assert path.exists() and net.training
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")  # symbolic batch axis
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        assert check_onnx(path, net, x) < 1e-4
    assert net.training
    lat = onnx_latency(path, torch.randn(1, 3, 16, 16), warmup=1, iters=5, threads=1)
    assert 0 < lat["p50_ms"] <= lat["p90_ms"]


def test_check_onnx_sees_a_different_model(tmp_path):
    net = tiny_convnet()
    path = export_onnx(net, torch.randn(2, 3, 16, 16), tmp_path / "tower.onnx", exporter="torchscript")
    with torch.no_grad():
        net[-1].bias += 1.0
    assert check_onnx(path, net, torch.randn(2, 3, 16, 16)) == pytest.approx(1.0, abs=1e-4)


def test_export_onnx_rejects_unknown_exporter(tmp_path):
    with pytest.raises(ValueError, match="torchscript"):
        export_onnx(tiny_convnet(), torch.randn(1, 3, 8, 8), tmp_path / "x.onnx", exporter="magic")


def test_render_table():
    rows = [
        {"name": "teacher", "params": 1_234_567, "latency_b1_p50_ms": 12.3456, "ratio": None},
        {"name": "student", "params": 1000, "throughput": 4321.5},
    ]
    table = render_table(rows, title="bench")
    assert [c.header for c in table.columns] == ["name", "params", "latency_b1_p50_ms", "ratio", "throughput"]
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "1,234,567" in text and "12.3" in text and "4,322" in text and "-" in text


def test_export_onnx_falls_back_when_an_exporter_fails(tmp_path, monkeypatch, caplog):
    import kdpipe.measure as bench

    def broken(module, example, path):
        raise RuntimeError("no onnxscript here")

    monkeypatch.setitem(bench._EXPORTERS, "dynamo", broken)
    monkeypatch.setattr(bench, "_exporter_order", lambda e: ["dynamo", "torchscript"] if e == "auto" else [e])
    net = tiny_convnet()
    with caplog.at_level("WARNING", logger="kdpipe"):
        path = export_onnx(net, torch.randn(1, 3, 16, 16), tmp_path / "tower.onnx")
    assert "dynamo export failed" in caplog.text
    assert check_onnx(path, net, torch.randn(2, 3, 16, 16)) < 1e-4
    with pytest.raises(RuntimeError, match="no onnxscript"):
        export_onnx(net, torch.randn(1, 3, 16, 16), tmp_path / "x.onnx", exporter="dynamo")


def test_check_onnx_relative_judges_round_off_at_the_outputs_scale(tmp_path):
    net = tiny_convnet()
    with torch.no_grad():
        net[-1].weight *= 1e4  # a head with large outputs (as one mapping back from a whitened space)
        net[-1].bias *= 1e4
    x = torch.randn(2, 3, 16, 16)
    path = export_onnx(net, x, tmp_path / "tower.onnx", exporter="torchscript")
    absolute, relative = check_onnx(path, net, x), check_onnx(path, net, x, relative=True)
    with torch.no_grad():
        scale = float(net.eval()(x).abs().max())
    assert relative == pytest.approx(absolute / scale) and relative < 1e-5
