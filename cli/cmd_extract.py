"""`kdpipe extract`: run the teacher once and write the embedding cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .errors import user_errors
from .options import config_option, stage_config
from kdpipe.progress import console


def extract(
    ctx: typer.Context,
    teacher: Optional[list[str]] = typer.Option(None, "--teacher", "-t", help="Teacher (required, here or in "
                                                "--config): a shipped config (tiny-clip, shapes-vit), an open_clip "
                                                "model name (ViT-B-32, ...), a model-config JSON path or an "
                                                "open_clip folder as local-dir:DIR (e.g. a `kdpipe pretrain-teacher` "
                                                "output). Repeat it for several teachers in one cache: the first "
                                                "runs as usual, each other one then over the stored views."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Input (required, here or in --config): a "
                                       "COCO-layout root (annotations/captions_*.json + image folders, e.g. from "
                                       "`kdpipe make-shapes`); COCO or Flickr30k/Flickr8k images with Karpathy's "
                                       "--split-file; a .csv/.tsv of image paths and captions (--csv-*); "
                                       "WebDataset tars (a.tar, 'shards/{00000..00009}.tar', 'pipe:...'); Parquet "
                                       "files of image bytes and captions (a.parquet, 'shards/*.parquet', a folder "
                                       "of them or of train/ and val/ folders); a Hugging Face dataset saved "
                                       "with save_to_disk (its splits; validation -> val); or a labelled set, for "
                                       "`train --labels`: an image folder (ROOT/CLASS/*.jpg, or ROOT/train/CLASS and "
                                       "ROOT/val/CLASS; optional ROOT/classnames.txt) or CIFAR-10/100 python batches "
                                       "(cifar-10-batches-py/, cifar-100-python/ or the folder holding it; test -> val)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache directory to write (required, here or in "
                                       "--config; re-running resumes it)."),
    pretrained: Optional[list[str]] = typer.Option(None, "--pretrained", "-p", help="open_clip pretrained tag "
                                                   "(e.g. laion2b_s34b_b79k, openai) or a local .pt/.bin/.safetensors "
                                                   "file; with several --teacher, one each in order (none: no "
                                                   "weights)."),
    views: int = typer.Option(4, "--views", min=1, help="Views per image; view 0 is the teacher's eval "
                              "transform (its open_clip resize_mode: shortest, squash or longest), the rest "
                              "random resized crops + flips the trainer replays exactly."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Images per teacher forward."),
    workers: int = typer.Option(2, "--workers", "-w", min=0, help="DataLoader workers that decode images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    dist_timeout: float = typer.Option(30.0, "--dist-timeout", min=0.1,
                                  help="Minutes a collective (all-gather, barrier) may wait under "
                                  "torchrun/srun before the run fails (NCCL's own default is 10); ranks idle "
                                  "while others finish their work never time out."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Karpathy's dataset_coco.json (--data: "
                                              "the COCO root), dataset_flickr30k.json or dataset_flickr8k.json "
                                              "(--data: the folder of the images, e.g. flickr30k-images): defines "
                                              "train (with restval), val and test; val/test images are removed "
                                              "from train."),
    keep_leaky: bool = typer.Option(False, "--keep-leaky", help="Keep Karpathy val/test images in train."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Extract without the images a CSV or a "
                                      "Flickr split file names but the disk lacks (by default they stop the run, "
                                      "before the teacher loads, naming the first few)."),
    csv_img_key: str = typer.Option("filepath", "--csv-img-key", help="CSV input: the column of image paths "
                                    "(open_clip's option; relative paths are read from the CSV's folder)."),
    csv_caption_key: str = typer.Option("title", "--csv-caption-key", help="CSV input: the column of captions "
                                        "(open_clip's option); rows naming the same image are its captions."),
    csv_separator: Optional[str] = typer.Option(None, "--csv-separator", show_default="tab for .tsv, comma for "
                                                ".csv", help="CSV input: the column separator (one character; "
                                                "'\\t' or tab for a tab). A .csv whose header has the columns only "
                                                "when split at tabs (open_clip's default) is read as tab-separated."),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="CSV or tar input: another input of the "
                                           "same layouts as --data, extracted as the val split."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="CSV or tar input: put "
                                                 "this fraction of it, between 0 and 1, in the val split (e.g. 0.01), "
                                                 "chosen by a hash of each sample's key: the same images on "
                                                 "every run and any number of processes."),
    image_column: Optional[str] = typer.Option(None, "--image-column", show_default="jpg, else image, img, png, "
                                               "webp", help="Parquet / Hugging Face input: the column of image "
                                               "bytes (binary, or a {bytes, path} struct as HF's Image)."),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", show_default="txt, else caption, "
                                                 "captions, text", help="Parquet / Hugging Face input: the "
                                                 "column of captions (a string or a list of strings)."),
    label_column: Optional[str] = typer.Option(None, "--label-column", show_default="label or cls if there",
                                               help="Parquet / Hugging Face input: an integer class-label column "
                                               "(a ClassLabel's names become the class names)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing cache at --out."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Images per shard."),
    store_size: int = typer.Option(256, "--store-size", min=32, help="Stored image's shorter side, at most. "
                                   "Must be >= the teacher's input size; below ~1.95x it (e.g. 438 for 224 px) "
                                   "the smallest random views are upsampled (a warning says by how much)."),
    split: Optional[list[str]] = typer.Option(None, "--split", help="Only these splits (repeatable)."),
    allow_random_init: bool = typer.Option(False, "--allow-random-init", help="Allow an open_clip model "
                                           "without --pretrained (random weights; for testing only)."),
    prompts: bool = typer.Option(True, "--prompts/--no-prompts", help="Write prompts.h5: teacher embeddings "
                                 "of zero-shot class prompts (shapes, CIFAR-10/100, the data's own labels)."),
    prompt_set: Optional[list[str]] = typer.Option(None, "--prompt-set", help="Also encode this named prompt "
                                                   "set into prompts.h5 (repeatable): imagenet (1000 classes x "
                                                   "OpenAI's 80 templates, as open_clip's ImageNet eval) or "
                                                   "imagenet-simple (x 7), for `kdpipe eval --zeroshot "
                                                   "imagenet:PATH` of image-only students. Re-running on a "
                                                   "finished cache keeps its shards and adds only the missing sets."),
    add_teacher: bool = typer.Option(False, "--add-teacher", help="Add --teacher to the existing cache at --out "
                                     "(no --data): it sees the stored images and views, replayed at its input "
                                     "size, and its embeddings go to SPLIT/teachers/NAME/; the other teachers' "
                                     "files are never rewritten, and re-running resumes."),
    teacher_name: Optional[str] = typer.Option(None, "--teacher-name", help="With --add-teacher: the teacher's "
                                               "name in the cache (default: its label, e.g. ViT-B-32)."),
    overwrite_teacher: Optional[str] = typer.Option(None, "--overwrite-teacher", metavar="NAME", help="With "
                                                    "--add-teacher: replace the added teacher NAME, whose "
                                                    "weights differ (its files are removed first)."),
    config: Optional[Path] = config_option(),
) -> None:
    """Run TEACHER once over DATA and write image/text embeddings of every view and caption to OUT."""
    from kdpipe.extract import ExtractConfig, run, teacher_options

    with user_errors():
        cfg = stage_config(ctx, ExtractConfig, config, dict(
            **teacher_options(teacher, pretrained), data="" if add_teacher and data is None else data,
            out=str(out) if out else None, views=views,
            batch_size=batch_size, workers=workers, device=device, precision=precision,
            dist_timeout=dist_timeout,
            split_file=str(split_file) if split_file else None, keep_leaky=keep_leaky,
            skip_missing=skip_missing, csv_img_key=csv_img_key, csv_caption_key=csv_caption_key,
            csv_separator=csv_separator, val_data=val_data, val_fraction=val_fraction,
            image_column=image_column, caption_column=caption_column, label_column=label_column,
            overwrite=overwrite, shard_size=shard_size, store_size=store_size,
            splits=split or None, allow_random_init=allow_random_init,
            prompts=prompts, prompt_sets=prompt_set or None, add_teacher=add_teacher, teacher_name=teacher_name,
            overwrite_teacher=overwrite_teacher), params={"splits": "split", "prompt_sets": "prompt_set",
                                                                 "extra_teachers": "teacher",
                                                                 "extra_pretrained": "pretrained"})
        result = run(cfg)
    if "stopped" in result:
        console.print(f"[yellow]stopped[/] by {result['stopped']}: {escape(cfg.out)} holds the finished shards; "
                      "re-run the same command to resume", soft_wrap=True)
        return
    for name, info in result.items():
        console.print(f"[green]{name}[/]: {info['count']} images, {info['captions']} captions, "
                      f"{info['shards']} shards, skipped {info['skipped'] or 'none'} ({info['seconds']:.1f} s)")
    console.print(f"cache: {cfg.out}/manifest.json")


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
