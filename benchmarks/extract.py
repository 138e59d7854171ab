"""Extraction throughput vs the teacher's forward alone, and the text-trimming speedup.

Both measured in one run with the same teacher, batch and captions:
  ratio 1 = `kdpipe extract`'s split loop (decode, store, views, teacher, shard writing) images/s
            ÷ teacher forward only (images + captions, pre-decoded tensors) images/s
  ratio 2 = caption encoding untrimmed (77 tokens) ÷ trimmed to the batch's longest caption

    .venv/bin/python benchmarks/extract.py [--teacher shapes-vit] [--images 256] [--views 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from kdpipe.data.shapes import make_shapes
from kdpipe.extract import ExtractConfig, clean_captions, run
from kdpipe.teachers import load_teacher

RESULTS = Path(__file__).parent / "results" / "extract.jsonl"


def captions_of(world: Path, split: str = "train") -> list[list[str]]:
    info = json.loads((world / "annotations" / f"captions_{split}.json").read_text())
    by_image: dict[int, list[str]] = {}
    for a in info["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    return [clean_captions(c) for _, c in sorted(by_image.items())]


def time_forward(teacher, n_images: int, views: int, batch: int, captions: list[list[str]]) -> float:
    """Seconds for the teacher alone on n_images (x views) pre-decoded tensors + their captions."""
    size = teacher.preprocess.size
    pixels = torch.randn(batch * views, 3, size, size)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n_images, batch):
            teacher.encode_images(pixels[: min(batch, n_images - i) * views])
            teacher.encode_texts([c for cs in captions[i:i + batch] for c in cs], trim=True)
    return time.perf_counter() - start


def time_text(teacher, captions: list[list[str]], batch: int, trim: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(captions), batch):
            teacher.encode_texts([c for cs in captions[i:i + batch] for c in cs], trim=trim)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="shapes-vit", help="shapes-vit, tiny-clip or an open_clip name (random init)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--size", type=int, default=64, help="shapes-world image size")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        make_shapes(world, args.images, 0, size=args.size, seed=0)
        teacher = load_teacher(args.teacher, None, device=torch.device("cpu"), allow_random_init=True)
        caps = captions_of(world)
        time_forward(teacher, min(args.batch_size, args.images), args.views, args.batch_size, caps)  # warm-up
        cfg = ExtractConfig(teacher=args.teacher, data=str(world), out=str(Path(tmp) / "cache"),
                            views=args.views, batch_size=args.batch_size, workers=args.workers,
                            device="cpu", shard_size=128, progress=False, allow_random_init=True,
                            prompts=False)
        # the split loop's own time: teacher loading and prompts.h5 are one-off costs per cache
        t_extract = run(cfg)["train"]["seconds"]
        t_forward = time_forward(teacher, args.images, args.views, args.batch_size, caps)
        t_untrimmed = time_text(teacher, caps, args.batch_size, trim=False)
        t_trimmed = time_text(teacher, caps, args.batch_size, trim=True)

    row = {
        "bench": "extract", "teacher": args.teacher, "images": args.images, "views": args.views,
        "batch_size": args.batch_size, "workers": args.workers, "threads": torch.get_num_threads(),
        "extract_img_per_s": args.images / t_extract, "forward_img_per_s": args.images / t_forward,
        "extract_over_forward": t_forward / t_extract,
        "text_untrimmed_s": t_untrimmed, "text_trimmed_s": t_trimmed,
        "trim_speedup": t_untrimmed / t_trimmed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"teacher {args.teacher}, {args.images} images x {args.views} views, batch {args.batch_size}, "
          f"{args.workers} workers, {row['threads']} threads")
    print(f"extract  {row['extract_img_per_s']:8.1f} img/s")
    print(f"forward  {row['forward_img_per_s']:8.1f} img/s (teacher only, pre-decoded tensors)")
    print(f"extraction / forward-only throughput: {row['extract_over_forward']:.2f}")
    print(f"text: untrimmed {t_untrimmed:.2f}s, trimmed {t_trimmed:.2f}s -> trimming speedup {row['trim_speedup']:.2f}x")


if __name__ == "__main__":
    main()
