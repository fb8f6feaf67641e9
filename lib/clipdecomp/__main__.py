"""Command line: ``python -m clipdecomp decompose --model SPEC --data DATA --out DIR``.

Decomposes a dataset into a resumable on-disk cache (see :mod:`clipdecomp.cache`). Examples::

    python -m clipdecomp decompose --model toy --data toy --n 512 --out caches/toy
    python -m clipdecomp decompose --model ViT-B-16/laion2b_s34b_b88k --data imagefolder:~/imagenet/val \\
        --layers=-4: --batch-size 64 --device cuda --out caches/imagenet_b16
    python -m clipdecomp decompose --model toy --data waterbirds:~/waterbird_complete95_forest2water2 --out caches/wb

Run the same command again after an interruption: finished shards are kept and the rest is computed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "parse_layers"]


def parse_layers(text: str) -> list[int] | None:
    """``"all"`` -> None (every layer), ``"none"`` -> [], ``"-4:"`` / ``"8:12"`` -> a range, ``"9,10,11"`` -> a list."""
    text = text.strip().lower()
    if text == "all":
        return None
    if text == "none":
        return []
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            start_i = int(start) if start else 0
            stop_i = int(stop) if stop else 0 if start_i < 0 else None
            if stop_i is None:
                raise ValueError("an open range needs a negative start, e.g. -4:")
            return list(range(start_i, stop_i))
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--layers {text!r}: use 'all', 'none', a range such as '-4:' or '8:12', or a list such as '9,10,11' "
            f"({error}).") from None


def _dataset(args, preprocess):
    from .datasets import ImageFolderDataset, ToyDataset, WaterbirdsDataset

    kind, _, location = args.data.partition(":")
    if kind == "toy":
        return ToyDataset(args.n or 256, args.seed, preprocess, split=location or "uniform")
    if kind in ("imagefolder", "waterbirds") and location:
        if kind == "imagefolder":
            return ImageFolderDataset(location, preprocess)
        return WaterbirdsDataset(location, preprocess, split=args.split)
    raise SystemExit(f"--data {args.data!r}: use 'toy' (or 'toy:SPLIT'), 'imagefolder:PATH' or 'waterbirds:PATH'.")


def _decompose(args) -> None:
    import torch

    from . import load
    from .cache import DecompositionCache
    from .notebook import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(args.seed)  # random-init specs ("ViT-B-16") get the same weights on every run, so resuming works
    bundle = load(args.model, device=pick_device(args.device))
    dataset = _dataset(args, bundle.preprocess)
    indices = None
    if args.n and not args.data.startswith("toy") and args.n < len(dataset):
        indices = np.unique(np.linspace(0, len(dataset) - 1, args.n).round().astype(np.int64))
    texts = labels = None
    if args.texts:
        labels = [line.strip() for line in Path(args.texts).read_text().splitlines() if line.strip()]
        texts = bundle.encode_text(labels)
    cache = DecompositionCache.build(
        bundle, dataset, args.out, batch_size=args.batch_size, layers=args.layers, text_directions=texts,
        text_labels=labels, patch_detail=args.patch_detail, indices=indices, shard_size=args.shard_size,
        dtype=args.dtype, num_workers=args.workers, progress=not args.no_progress)
    print(f"{cache} in {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clipdecomp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("decompose", help="decompose a dataset into an on-disk cache")
    run.add_argument("--model", required=True, help="model spec for clipdecomp.load, e.g. toy or ViT-B-16/laion2b_s34b_b88k")
    run.add_argument("--data", required=True, help="toy[:SPLIT], imagefolder:PATH or waterbirds:PATH")
    run.add_argument("--out", required=True, help="cache folder (created; rerun the command to resume)")
    run.add_argument("--n", type=int, help="toy: number of images (default 256); folders: an evenly spaced subset")
    run.add_argument("--seed", type=int, default=0, help="toy sampling seed and random-init seed")
    run.add_argument("--split", default="test", choices=["train", "val", "test", "all"], help="Waterbirds split")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--layers", type=parse_layers, default=None,
                     help="layers that keep per-head detail: all (default), none, 8:12, 9,10,11 or the last four "
                          "as --layers=-4: (with '=': a leading '-' would read as an option)")
    run.add_argument("--texts", help="file with one text per line: per-patch terms are dotted with their embeddings")
    run.add_argument("--patch-detail", default="layer", choices=["layer", "head", "sum"])
    run.add_argument("--shard-size", type=int, default=1024)
    run.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    run.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images")
    run.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from .cache import CacheLockedError, IncompleteCacheError
    from .loading import WeightsUnavailableError

    try:
        _decompose(args)
    except (ValueError, FileNotFoundError, FileExistsError, IndexError, NotImplementedError, CacheLockedError,
            IncompleteCacheError, WeightsUnavailableError) as error:  # bad input: the message says what to do; no traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
