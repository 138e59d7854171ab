"""Measuring a model: parameters, serialised size, FLOPs, latency, throughput, ONNX export/check/latency.

Each function measures one thing on a callable or module it is given and knows nothing of
runs, teachers or students; the bench stage (``kdpipe.bench``) decides what to measure and
writes the results.

Callers put the module (and whatever ``fn`` closes over) on ``device`` first; the
functions here move only the example tensors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from . import runtime
from .errors import BadValue

log = logging.getLogger("kdpipe")

Fn = Callable[[Tensor], Any]


# ---------------------------------------------------------------------------- size


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once, as ``parameters()`` yields them)."""
    return sum(p.numel() for p in module.parameters())


def size_bytes(module: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the safetensors file holding the state dict with floating tensors cast to dtype.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) keep their dtype, as a real
    half-precision export would. Tensors are copied, so tied weights count once per key.
    """
    state = {
        k: v.detach().to(dtype=dtype if v.is_floating_point() else v.dtype, device="cpu", copy=True).contiguous()
        for k, v in module.state_dict().items()
    }
    return len(safetensors_bytes(state))


# --------------------------------------------------------------------------- compute


def flops_per_sample(fn: Fn, example: Tensor) -> int:
    """FLOPs of one forward per sample: example [B, ...] -> total / B.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: 2 x multiply-adds of matmuls,
    convolutions and attention; element-wise ops (activations, norms) are not counted.
    """
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn(example)
    return counter.get_total_flops() // example.shape[0]


def _timed_calls(fn: Fn, example: Tensor, warmup: int, iters: int, device: torch.device) -> list[float]:
    """Seconds per call of fn(example), each call synchronised, after warm-up calls."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn(example)
        runtime.synchronize(device)
        for _ in range(iters):
            start = time.perf_counter()
            fn(example)
            runtime.synchronize(device)
            times.append(time.perf_counter() - start)
    return times


def _summary_ms(seconds: Iterable[float]) -> dict[str, float]:
    ms = np.asarray(list(seconds)) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean())}


def latency(
    fn: Fn,
    example: Tensor,
    warmup: int = 5,
    iters: int = 30,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Per-call latency of fn(example) in milliseconds: {"p50_ms", "p90_ms", "mean_ms"}.

    Usually example is a batch of one [1, ...]. Every call is timed alone (synchronised on
    CUDA), so the percentiles describe single requests, not a pipelined stream.
    """
    device = torch.device(device)
    return _summary_ms(_timed_calls(fn, example.to(device), warmup, iters, device))


def throughput(
    fn: Fn,
    example_batch: Tensor,
    iters: int = 10,
    device: torch.device | str = "cpu",
    warmup: int = 2,
) -> float:
    """Samples per second of fn over back-to-back calls on example_batch [N, ...]."""
    device = torch.device(device)
    example_batch = example_batch.to(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fn(example_batch)
        runtime.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn(example_batch)
        runtime.synchronize(device)
        elapsed = time.perf_counter() - start
    return example_batch.shape[0] * iters / elapsed


def measure_tower(
    name: str,
    fn: Fn,
    example_1: Tensor,
    example_n: Tensor,
    module: nn.Module,
    device: torch.device | str = "cpu",
    warmup: int = 5,
    iters: int = 30,
    throughput_iters: int = 10,
) -> dict[str, Any]:
    """All numbers for one tower (e.g. "teacher/image"): fn runs the tower on a batch.

    example_1 [1, ...] for latency, example_n [N, ...] for throughput; module is what
    gets counted and sized (the tower's weights). Returns a flat JSON-ready dict.
    """
    device = torch.device(device)
    lat = latency(fn, example_1, warmup=warmup, iters=iters, device=device)
    return {
        "name": name,
        "params": count_params(module),
        "size_fp32_bytes": size_bytes(module, torch.float32),
        "size_fp16_bytes": size_bytes(module, torch.float16),
        "flops_per_sample": flops_per_sample(fn, example_1.to(device)),
        "latency_b1_p50_ms": lat["p50_ms"],
        "latency_b1_p90_ms": lat["p90_ms"],
        "throughput": throughput(fn, example_n, iters=throughput_iters, device=device),
        "batch_n": int(example_n.shape[0]),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


# Bigger is worse for these (teacher / student = "times smaller / faster") ...
_COST_KEYS = ("params", "size_fp32_bytes", "size_fp16_bytes", "flops_per_sample", "latency_b1_p50_ms",
              "latency_b1_p90_ms")
# ... and better for this one (student / teacher = "times faster").
_RATE_KEYS = ("throughput",)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def ratio_table(teacher: Mapping[str, Any], students: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """How many times smaller / faster each student is than the teacher.

    teacher and students[name] are ``measure_tower`` dicts. Cost keys give teacher /
    student, throughput gives student / teacher, so > 1 always means the student wins.
    A missing value or zero denominator gives None.
    """
    out = {}
    for name, s in students.items():
        row = {k: _ratio(teacher.get(k), s.get(k)) for k in _COST_KEYS}
        row.update({k: _ratio(s.get(k), teacher.get(k)) for k in _RATE_KEYS})
        out[name] = row
    return out


# ---------------------------------------------------------------------------- ONNX


ONNX_NAMES = ("image", "embedding")  # the input's and the output's name unless a caller names them


def _export_dynamo(module: nn.Module, example: Tensor, path: Path, names: tuple[str, str] = ONNX_NAMES) -> None:
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        module, (example,), str(path), dynamo=True, input_names=[names[0]], output_names=[names[1]],
        dynamic_shapes=({0: batch},), external_data=False,
    )


def _export_torchscript(module: nn.Module, example: Tensor, path: Path, names: tuple[str, str] = ONNX_NAMES) -> None:
    with warnings.catch_warnings():
        # torch >= 2.9 warns that this exporter is legacy; it is the one that needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent Python ifs in timm/torch
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, input_names=[names[0]], output_names=[names[1]],
            dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}},
        )


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _exporter_order(exporter: str) -> list[str]:
    """Exporters to try in turn; "auto" skips dynamo where onnxscript is missing (torch needs it)."""
    if exporter != "auto":
        return [exporter]
    if importlib.util.find_spec("onnxscript") is None:
        return ["torchscript"]
    return ["dynamo", "torchscript"]


def export_onnx(module: nn.Module, example: Tensor, path: str | os.PathLike, exporter: str = "auto",
                names: tuple[str, str] = ONNX_NAMES) -> Path:
    """Export a tower to ONNX with a dynamic batch axis: example [B, ...] (images [B, 3, S, S]).

    ``names``: (input, output), by default "image" [batch, 3, S, S] and "embedding" [batch, D]. ``exporter``: "dynamo"
    (torch.export, torch's default since 2.9, needs the onnxscript package), "torchscript"
    (legacy, works with torch alone) or "auto": dynamo when onnxscript is installed,
    falling back to torchscript if it fails. The module is exported in eval mode and its
    training flag restored afterwards.
    """
    if exporter not in ("auto", *_EXPORTERS):
        raise BadValue(f"unknown ONNX exporter {exporter!r}; use auto, {', '.join(_EXPORTERS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a batch of 1 would let the tracer treat the batch size as a constant
    device = next(module.parameters(), example).device
    example = example[:1].expand(2, *example.shape[1:]).contiguous().to(device)
    order = _exporter_order(exporter)
    was_training, fastpath = module.training, torch.backends.mha.get_fastpath_enabled()
    module.eval()
    # nn.MultiheadAttention's inference fast path (taken when no parameter needs a gradient, as in a
    # loaded teacher) is one fused operator that ONNX has no export for: trace the plain path
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for i, name in enumerate(order):
            try:
                # default names are not passed: an exporter taking (module, example, path) stays valid
                _EXPORTERS[name](module, example, path, *([] if names == ONNX_NAMES else [names]))
                return path
            except Exception as err:  # noqa: BLE001 - any exporter failure -> try the next one
                if i == len(order) - 1:
                    raise
                log.warning("ONNX %s export failed (%s: %s); trying %s", name, type(err).__name__, err, order[i + 1])
    finally:
        module.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def _onnx_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort  # optional dependency: kdpipe[onnx]

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: str | os.PathLike, module: nn.Module, example: Tensor, relative: bool = False) -> float:
    """Largest absolute difference between ONNX Runtime (CPU) and PyTorch on example [B, ...].

    ``relative``: divided by PyTorch's largest absolute output, so float32 round-off is judged
    against the output's scale (a tower whose head maps back from a whitened space outputs large
    values, and its absolute round-off grows with them).
    """
    session = _onnx_session(path)
    x = example.detach().cpu()
    x = x.float() if x.is_floating_point() else x  # token ids stay integers
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            device = next(module.parameters(), x).device
            torch_out = module(x.to(device)).float().cpu().numpy()
    finally:
        module.train(was_training)
    diff = float(np.abs(onnx_out - torch_out).max())
    return diff / max(float(np.abs(torch_out).max()), 1e-12) if relative else diff


def onnx_latency(
    path: str | os.PathLike,
    example: Tensor,
    warmup: int = 5,
    iters: int = 30,
    threads: int | None = None,
) -> dict[str, float]:
    """ONNX Runtime CPU latency of one call on example in ms: {"p50_ms", "p90_ms", "mean_ms"}."""
    session = _onnx_session(path, threads)
    feed = {session.get_inputs()[0].name: example.detach().cpu().float().numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return _summary_ms(times)
