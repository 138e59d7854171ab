"""Whitening fit time vs its practical limit, an in-memory float64 XᵀX over the same rows.

For each size N (total embedding rows: image views + captions, D = 512 by default) the
script writes synthetic shards with ``kdpipe.store.write_shard`` into a temp dir, then in the
same run measures:
  fit  = `kdpipe.whiten` streaming every train shard from disk (h5 read, fp16 -> float64,
         NaN check, centred moments for image and text, joint merge) + eigh and ZCA for
         the three modes;
  xtx  = X.T @ X on all N rows already in memory as one float64 array (loading not timed);
  ratio = fit / xtx  (1.0 = no overhead over the bare matmul);
  run  = the whole `fit-whitening` stage (fit + write + train check pass + held-out checks).
The shards were just written, so reads come from the page cache (warm), as on a re-run.

    .venv/bin/python benchmarks/whiten.py [--sizes 100000 600000] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdpipe import store, whiten
from kdpipe.targetspace import FIT_MODES

RESULTS = Path(__file__).parent / "results" / "whiten.jsonl"


def synthetic_rows(rng: np.random.Generator, n: int, mix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """n correlated, L2-normalised fp16 rows [n, D]."""
    x = rng.standard_normal((n, mix.shape[0]), dtype=np.float32) @ mix + offset
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_cache(root: Path, n_rows: int, dim: int, views: int, captions: int, shard_size: int, seed: int = 0) -> int:
    """A cache whose train split holds ~n_rows embedding rows (+ a small val split). -> images."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    mix = (q * np.geomspace(1.0, 0.02, dim)).astype(np.float32)  # CLIP-like spread of variances
    offsets = {m: rng.standard_normal(dim).astype(np.float32) * 0.05 for m in ("img", "txt")}
    n_images = max(1, n_rows // (views + captions))
    manifest = store.Manifest(root, {"format": store.FORMAT_VERSION, "teacher": {"name": "bench", "pretrained": None},
                                     "embed_dim": dim, "logit_scale": 100.0, "dtype": "float16", "views": views,
                                     "classnames": None, "splits": {}})
    for split, n in (("train", n_images), ("val", min(n_images, 1000))):
        for index, start in enumerate(range(0, n, shard_size)):
            count = min(shard_size, n - start)
            img = synthetic_rows(rng, count * views, mix, offsets["img"]).reshape(count, views, dim)
            txt = synthetic_rows(rng, count * captions, mix, offsets["txt"]).reshape(count, captions, dim)
            samples = [store.CachedSample(f"{split}{start + i:08d}", b"", [], img[i], txt[i],
                                          np.ones(views, np.float32), np.ones(captions, np.float32),
                                          [""] * captions) for i in range(count)]
            manifest.add_shard(split, store.write_shard(root / split, index, samples, dim))
    manifest.save()
    return n_images


def time_fit(root: Path) -> float:
    cache = store.open_cache(root)
    start = time.perf_counter()
    moments = whiten.accumulate(cache)
    whiten.fit_modes(moments, list(FIT_MODES), 1e-4, "zca")
    return time.perf_counter() - start


def time_xtx(root: Path, repeats: int = 2) -> tuple[float, int]:
    """Best-of-``repeats`` seconds of X.T @ X, X = every train row in memory, float64."""
    cache = store.open_cache(root)
    x = np.concatenate([a for s in cache.iter_h5("train") for a in whiten.modality_rows(s).values()]).astype(np.float64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _ = x.T @ x
        best = min(best, time.perf_counter() - start)
    return best, len(x)


def bench_size(n_rows: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp) / "cache"
        start = time.perf_counter()
        n_images = write_cache(root, n_rows, args.dim, args.views, args.captions, args.shard_size)
        t_write = time.perf_counter() - start
        if args.warmup:
            time_fit(root)
        t_fit = min(time_fit(root) for _ in range(args.repeats))
        t_xtx, rows = time_xtx(root, args.repeats)
        start = time.perf_counter()
        whiten.run(whiten.WhitenConfig(cache=root, progress=False))
        t_run = time.perf_counter() - start
    return {"rows": rows, "images": n_images, "fit_s": t_fit, "xtx_s": t_xtx, "ratio": t_fit / t_xtx,
            "run_s": t_run, "write_s": t_write}


def print_table(rows: list[dict], dim: int) -> None:
    from rich.table import Table

    from kdpipe.progress import console

    table = Table(title=f"fit-whitening vs in-memory float64 XᵀX (D = {dim})")
    for col in ("rows", "images", "fit s", "XᵀX s", "fit / XᵀX", "whole stage s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['rows']:,}", f"{r['images']:,}", f"{r['fit_s']:.2f}", f"{r['xtx_s']:.2f}",
                      f"{r['ratio']:.2f}", f"{r['run_s']:.2f}")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 600_000], help="total embedding rows")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--captions", type=int, default=5)
    ap.add_argument("--shard-size", type=int, default=2000, help="images per shard")
    ap.add_argument("--repeats", type=int, default=1, help="best of this many timings")
    ap.add_argument("--warmup", action="store_true", help="one untimed fit first")
    ap.add_argument("--tmp", default=None, help="folder for the temporary caches")
    args = ap.parse_args()
    results = []
    for n in args.sizes:
        results.append(bench_size(n, args))
        print(json.dumps(results[-1]), file=sys.stderr)
    print_table(results, args.dim)
    line = {"bench": "whiten", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "dim": args.dim, "views": args.views,
            "captions": args.captions, "shard_size": args.shard_size, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "numpy": np.__version__, "machine": platform.machine(),
            "command": " ".join(["benchmarks/whiten.py", *sys.argv[1:]]), "results": results}
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
