"""Cached training vs student-only and vs online-teacher training, measured in one run.

Same student, loss, batch size and batches throughout (D = 512, the ViT-B-32 dim):
  cached  = `kdpipe.train.train_step` fed by the cache loader (tar read, JPEG decode, view
            replay, collate, in DataLoader workers) — what `kdpipe train` runs;
  student = the same train_step on the same batches pre-decoded in memory (no data cost);
  online  = the same train_step, with an open_clip ViT-B-32 teacher (random init: timing only)
            run live on each batch's images and captions to make the targets, through
            `kdpipe.teachers.Teacher` as extraction runs it (captions trimmed to the batch's
            longest, as `kdpipe extract` does);
  teacher = the teacher's forward alone on those batches (a component timing).
Ratios: cached ÷ student throughput (the data path's overhead; target ≥ 0.9) and the cached
speedup over online training, next to the speedup predicted from the components:
(t_student + t_teacher) / t_student, i.e. what a free data path would give. The kinds
alternate round by round and each ratio is the median over rounds, so a load spike from
another process spoils one round, not the figure.

The cache holds shapes-world images stored at --store-size (JPEG, as `kdpipe extract` stores
them) with real views, and random unit embeddings (their values do not change the timing).

    .venv/bin/python benchmarks/train.py [--images 256] [--batch-size 32] [--rounds 5] [--block 1] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from kdpipe import store
from kdpipe import train as T
from kdpipe import cachereader
from kdpipe.data import views as V
from kdpipe.data import open_source
from kdpipe.data.shapes import make_shapes

RESULTS = Path(__file__).parent / "results" / "train.jsonl"
TEACHER = "ViT-B-32"


def teacher_fingerprint(dim: int, size: int) -> dict:
    return {"name": f"{TEACHER} (bench, random)", "pretrained": None, "checkpoint_sha256": None,
            "open_clip_version": "n/a", "quickgelu": False,
            "preprocess": {"size": size, "mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                           "resize_mode": "shortest"},
            "embed_dim": dim, "logit_scale": 100.0, "context_length": 77}


def write_cache(root: Path, world: Path, dim: int, views: int, size: int, store_size: int, shard_size: int) -> None:
    """A cache of the world's images (stored, views drawn as extract does) with random embeddings."""
    rng = np.random.default_rng(0)
    source = open_source(str(world), shard_size=shard_size)
    manifest = store.Manifest(root, {"format": store.FORMAT_VERSION, "teacher": teacher_fingerprint(dim, size),
                                     "embed_dim": dim, "logit_scale": 100.0, "dtype": "float16", "views": views,
                                     "classnames": None, "splits": {}})

    def unit_vectors(n: int) -> np.ndarray:
        x = rng.standard_normal((n, dim)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    for split in source.splits():
        for unit in source.units(split):
            samples = []
            for r in unit.records():
                jpg, stored = V.store_image(V.decode_image(r.path), store_size)
                vs = [v.to_dict() for v in V.sample_views(views, stored.width, stored.height, seed=r.key)]
                samples.append(store.CachedSample(r.key, jpg, vs, unit_vectors(views), unit_vectors(len(r.captions)),
                                                  np.ones(views, np.float32), np.ones(len(r.captions), np.float32),
                                                  list(r.captions), -1))
            manifest.add_shard(split, store.write_shard(root / split, unit.index, samples, dim))
    manifest.save()


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def interleaved(setup: T.Setup, stream: cachereader.StreamConfig, batches: list[dict], teacher: "OnlineTeacher",
                rounds: int, block: int) -> dict[str, list[float]]:
    """Seconds per block of ``block`` steps, for each kind, alternating kinds round by round.

    Alternating keeps the three measurements under the same machine load (other processes,
    thermal state); the cached kind draws from one live loader, as `kdpipe train` does.
    """
    loader = cachereader.epoch_batches(stream, len(batches))
    T.train_step(setup, next(loader))  # warm-up (first batch, allocator, worker start)
    T.train_step(setup, batches[0])
    teacher.targets(batches[0])
    out: dict[str, list[float]] = {"cached": [], "student": [], "online": [], "teacher": []}
    for r in range(rounds):
        chunk = batches[1 + r * block: 1 + (r + 1) * block]
        out["cached"].append(sum(timed(T.train_step, setup, next(loader)) for _ in chunk))
        out["student"].append(sum(timed(T.train_step, setup, b) for b in chunk))
        t_teacher = t_online = 0.0
        for b in chunk:
            start = time.perf_counter()
            online = teacher.targets(b)
            t_teacher += time.perf_counter() - start
            T.train_step(setup, online)
            t_online += time.perf_counter() - start
        out["online"].append(t_online)
        out["teacher"].append(t_teacher)
    return out


class OnlineTeacher:
    """The teacher run live on each batch, through kdpipe's own ``Teacher``: the same image forward and
    the same text path as extraction, captions trimmed to the batch's longest (causal towers), so
    "cached ÷ online" compares like with like."""

    def __init__(self, name: str = TEACHER) -> None:
        from kdpipe.teachers import load_teacher

        self.teacher = load_teacher(name, None, device="cpu", allow_random_init=True)  # random init: timing only

    @torch.no_grad()
    def targets(self, batch: dict) -> dict:
        """The batch with t_img / t_txt computed by the live teacher."""
        pre = self.teacher.preprocess
        pixels = cachereader.normalize_images(batch["image"], pre.mean, pre.std)
        img = torch.nn.functional.normalize(self.teacher.encode_images(pixels), dim=-1)
        txt = torch.nn.functional.normalize(self.teacher.encode_texts(batch["captions"], trim=True), dim=-1)
        return {**batch, "t_img": img, "t_txt": txt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="mobilenetv3")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (cached, student, online)")
    ap.add_argument("--block", type=int, default=1, help="steps per kind per round")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--store-size", type=int, default=256)
    ap.add_argument("--losses", default="fd=7.8,crd=1,icl=1")
    args = ap.parse_args()
    n_batches = 1 + args.rounds * args.block
    if args.images < n_batches * args.batch_size:
        ap.error(f"--images must be at least (1 + rounds x block) x batch = {n_batches * args.batch_size}")

    with tempfile.TemporaryDirectory() as tmp:
        world, cache = Path(tmp) / "world", Path(tmp) / "cache"
        make_shapes(world, args.images, 8, size=args.store_size, seed=0)
        write_cache(cache, world, 512, 2, args.image_size, args.store_size, shard_size=64)
        cfg = T.TrainConfig(student=args.student, cache=str(cache), out=str(Path(tmp) / "run"), epochs=1,
                            batch_size=args.batch_size, workers=args.workers, image_size=args.image_size,
                            losses=args.losses, precision="fp32", device="cpu", progress=False, warmup_steps=1)
        setup = T.build_setup(cfg)
        stream = replace(setup.stream, epoch=0)
        batches = list(cachereader.epoch_batches(replace(stream, workers=0), n_batches))  # the same batches, in memory
        online = OnlineTeacher()
        times = interleaved(setup, stream, batches, online, args.rounds, args.block)

    steps = args.rounds * args.block
    total = {k: sum(v) for k, v in times.items()}
    sps = {k: steps * args.batch_size / total[k] for k in ("cached", "student", "online")}
    # Headline ratios: the median over rounds of each round's ratio (a load spike from another
    # process hits one round, not the median); the totals' ratios are kept next to them.
    rounds = list(zip(times["cached"], times["student"], times["online"], times["teacher"]))
    per_round = [s_ / c for c, s_, _, _ in rounds]
    speedups = [o / c for c, _, o, _ in rounds]
    predicted = [(s_ + t) / s_ for _, s_, _, t in rounds]
    row = {
        "bench": "train", "student": args.student, "teacher_online": TEACHER, "images": args.images,
        "batch_size": args.batch_size, "rounds": args.rounds, "block": args.block, "workers": args.workers,
        "image_size": args.image_size, "store_size": args.store_size, "losses": args.losses,
        "online_text_trimmed": online.teacher.can_trim,
        "threads": torch.get_num_threads(),
        "cached_samples_per_s": sps["cached"], "student_only_samples_per_s": sps["student"],
        "online_samples_per_s": sps["online"], "teacher_forward_s_per_step": total["teacher"] / steps,
        "student_step_s": total["student"] / steps,
        "cached_over_student": statistics.median(per_round),
        "cached_over_student_per_round": per_round,
        "cached_over_student_totals": sps["cached"] / sps["student"],
        "speedup_cached_over_online": statistics.median(speedups),
        "speedup_predicted": statistics.median(predicted),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"student {args.student} @ {args.image_size}px, batch {args.batch_size}, {steps} timed steps per kind "
          f"({args.rounds} alternating rounds), "
          f"{args.workers} workers, {row['threads']} threads, losses {args.losses}")
    print(f"cached training    {sps['cached']:8.1f} samples/s")
    print(f"student only       {sps['student']:8.1f} samples/s (same batches, pre-decoded)")
    print(f"online teacher     {sps['online']:8.1f} samples/s ({TEACHER} live, {row['teacher_forward_s_per_step']:.2f} "
          f"s/step of teacher forward)")
    print(f"cached / student-only: {row['cached_over_student']:.2f} median of rounds (target >= 0.9; per round "
          f"{', '.join(f'{r:.2f}' for r in per_round)}; totals {row['cached_over_student_totals']:.2f})")
    print(f"cached / online: {row['speedup_cached_over_online']:.2f}x median of rounds "
          f"(predicted from components (t_student + t_teacher) / t_student: {row['speedup_predicted']:.2f}x)")


if __name__ == "__main__":
    main()
