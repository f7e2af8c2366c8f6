"""``vlmtrain shards``, ``demo-data``, ``demo-chat`` and ``demo-video``: writing WebDataset shards from annotations,
and the demo sets."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from vlmtrain.cli.arguments import folder, positive_int
from vlmtrain.data.annotations import MAPPED_KEYS
from vlmtrain.errors import UserError


def cmd_shards(args: argparse.Namespace) -> None:
    from vlmtrain.data.annotations import parse_columns, read_annotations
    from vlmtrain.data.shards import check_image_paths, parse_bytes, write_shards

    max_bytes = parse_bytes(args.shard_size) if args.shard_size else None
    if not args.images.is_dir():
        raise UserError(f"--images {args.images}: no such folder (image and video paths are relative to it)")
    columns = parse_columns(args.columns) if args.columns else None
    check = partial(check_image_paths, image_root=args.images, outside_images=args.allow_outside_images)
    annotations = read_annotations(args.annotations, args.format, columns, check)  # the whole file, before any image is read
    total = len(annotations.records) + len(annotations.bad)
    if annotations.bad and not args.skip_bad:
        for bad in annotations.bad:
            print(f"error: {bad}", file=sys.stderr)
        raise UserError(f"{len(annotations.bad)} of {total} records are malformed; nothing written (--skip-bad writes the other "
                        f"{len(annotations.records)})")
    for bad in annotations.bad:
        print(f"left out {bad}")
    formats = ", ".join(f"{count} {kind}" for kind, count in sorted(annotations.formats.items()))
    print(f"{args.annotations}: {len(annotations.records)} records ({formats})")
    if annotations.unread:
        unread = ", ".join(f"{key} ({count} records)" for key, count in sorted(annotations.unread.items()))
        print(f"kept in the records but not trained on: {unread}")
    if annotations.renamed:
        print(f"{annotations.renamed} records repeat the key (id) of an earlier one: they get keys of their own "
              "(KEY_2, KEY_3, ...) and keep their id")
    if not annotations.records:
        raise UserError(f"no usable record in {args.annotations}: nothing written")
    report = write_shards(
        annotations.records, args.images, args.out, args.prefix, args.samples_per_shard, max_bytes, args.workers,
        progress=True, outside_images=args.allow_outside_images, left_out=[str(bad) for bad in annotations.bad],
        skip_bad=args.skip_bad,
    )
    for key, reason in report.rejected:
        print(f"rejected {key}: {reason}")
    if not report.samples:
        first = "; ".join(f"{key}: {reason}" for key, reason in report.rejected[:3])
        raise UserError(f"wrote 0 samples: all {len(report.rejected)} records were rejected (first: {first})")
    if report.videos_with_audio:
        print(f"{report.videos_with_audio} videos have an audio track: stored, ignored in training (vlmtrain trains no audio)")
    print(f"wrote {report.samples} samples in {len(report.shards)} shards to {args.out} (index: {args.prefix}-index.json)")


def cmd_demo_data(args: argparse.Namespace) -> None:
    from vlmtrain.data.demo import demo_is_current, demo_manifest, make_demo_shards

    if not args.force and demo_is_current(args.out, demo_manifest(args.train, args.val, args.seed, args.samples_per_shard)):
        print(f"{args.out} already holds this demo set (--force renders it again)")
        return
    reports = make_demo_shards(args.out, args.train, args.val, args.seed, args.samples_per_shard)
    for split, report in reports.items():
        print(f"{split}: {report.samples} samples in {len(report.shards)} shards under {args.out}")


def cmd_demo_chat(args: argparse.Namespace) -> None:
    from vlmtrain.data.demo_chat import make_chat_set

    files = make_chat_set(args.out, args.train, args.val)
    print(
        f"wrote {', '.join(str(path) for path in files.values())} (LLaVA JSON) and {args.out / 'images'}; next: vlmtrain shards "
        f"{files['train']} {args.out} --images {args.out / 'images'} --prefix train --samples-per-shard 128"
    )


def cmd_demo_video(args: argparse.Namespace) -> None:
    from vlmtrain.data.demo_video import make_video_set

    files = make_video_set(args.out, args.train, args.val, detail=args.detail)
    print(
        f"wrote {', '.join(str(path) for path in files.values())} (LLaMA-Factory's video format) and {args.out / 'videos'}; "
        f"next: vlmtrain shards {files['train']} {args.out} --images {args.out / 'videos'} --prefix train --samples-per-shard 64"
    )


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add this group's commands to the ``vlmtrain`` parser."""
    sub = commands.add_parser("shards", help="write WebDataset shards from images and annotations (records, LLaVA, messages)")
    sub.add_argument(
        "annotations", type=Path,
        help="JSON Lines, a JSON array (LLaVA), CSV (an images column: a.jpg;b.jpg), Parquet, Arrow, or a datasets folder",
    )
    sub.add_argument("out", type=folder)
    sub.add_argument("--images", type=Path, default=Path("."), help="folder the image and video paths are relative to")
    sub.add_argument(
        "--format",
        default="auto",
        choices=("auto", "records", "llava", "messages"),
        help="record format (auto: told by each record's keys)",
    )
    sub.add_argument(
        "--columns",
        help="the file's names for the keys vlmtrain reads, as LLaMA-Factory's dataset_info.json columns: "
        f"messages=conversations,images=image (keys: {', '.join(MAPPED_KEYS)})",
    )
    sub.add_argument(
        "--skip-bad", action="store_true", help="write the good records and list the malformed ones (default: write nothing)"
    )
    sub.add_argument(
        "--allow-outside-images", action="store_true", help="read image and video paths outside --images (.., absolute, symlinks)"
    )
    sub.add_argument("--prefix", default="shard")
    sub.add_argument("--samples-per-shard", type=positive_int, default=10000)
    sub.add_argument("--shard-size", help="close a shard before it passes this size, e.g. 512MB")
    sub.add_argument("--workers", type=positive_int, default=1, help="processes reading and checking images")
    sub.set_defaults(handler=cmd_shards)

    sub = commands.add_parser("demo-data", help="render the demo task (words on real photos) into shards")
    sub.add_argument("--out", type=folder, default=Path("data/generated/demo"))
    sub.add_argument("--train", type=positive_int, default=2048)
    sub.add_argument("--val", type=positive_int, default=64)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--samples-per-shard", type=positive_int, default=128)
    sub.add_argument("--force", action="store_true", help="render even when OUT already holds this set")
    sub.set_defaults(handler=cmd_demo_data)

    sub = commands.add_parser("demo-chat", help="write the chat demo: two-image conversations as LLaVA JSON, with their images")
    sub.add_argument("--out", type=folder, default=Path("data/generated/chat"))
    sub.add_argument("--train", type=positive_int, default=640)
    sub.add_argument("--val", type=positive_int, default=32)
    sub.set_defaults(handler=cmd_demo_chat)

    sub = commands.add_parser("demo-video", help="write the video demo: clips with a word in each half, LLaMA-Factory's format")
    sub.add_argument("--out", type=folder, default=Path("data/generated/video"))
    sub.add_argument("--train", type=positive_int, default=256)
    sub.add_argument("--val", type=positive_int, default=32)
    sub.add_argument(
        "--detail", action="store_true",
        help="the detail set: one frame of each clip covered with a small word, asked for, that frame a key frame at 1120 tokens",
    )
    sub.set_defaults(handler=cmd_demo_video)
