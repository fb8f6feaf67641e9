"""Command line: ``python -m clipdecomp decompose --model SPEC --data DATA --out DIR`` and ``verify DIR``.

Decomposes a dataset into a resumable on-disk cache (see :mod:`clipdecomp.cache`). Examples::

    python -m clipdecomp decompose --model toy --data toy --n 512 --out caches/toy
    python -m clipdecomp decompose --model ViT-B-16/laion2b_s34b_b88k --data imagefolder:~/imagenet/val \\
        --layers=-4: --batch-size 64 --device cuda --out caches/imagenet_b16
    python -m clipdecomp decompose --model toy --data waterbirds:~/waterbird_complete95_forest2water2 --out caches/wb
    python -m clipdecomp verify caches/toy        # re-hash every file against the checksums written with it

Run the same command again after an interruption: finished shards are kept and the rest is computed.
Run it again after ``verify`` reports damage: only the damaged shards are recomputed. Every numeric
option is checked and refused (never clamped) when out of range; errors are one line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "parse_layers"]


def parse_layers(text: str) -> list[int] | None:
    """``"all"`` -> None (every layer), ``"none"`` -> [], ``"-4:"`` / ``"8:12"`` -> a range, ``"9,10,11"`` -> a list.

    Empty ranges (``"5:5"``, ``"6:2"``), ranges mixing counts from the end and the start (``"-2:3"``),
    empty items (``"1,,2"``) and repeated layers are refused rather than read as something else.
    """
    shown, text = text, text.strip().lower()
    if text == "all":
        return None
    if text == "none":
        return []
    usage = "use 'all', 'none', a range such as '-4:' or '8:12', or a list such as '9,10,11'"
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            start_i = int(start) if start.strip() else 0
            if stop.strip():
                stop_i = int(stop)
            elif start_i < 0:
                stop_i = 0
            else:
                raise ValueError("an open range needs a negative start, e.g. -4: for the last four")
            if start_i < 0 < stop_i:
                raise ValueError("a range counts either from the end (-4:-1) or from the start (8:12), not both")
            layers = list(range(start_i, stop_i))
            if not layers:
                raise ValueError("the range is empty: its start must be below its stop")
            return layers
        parts = text.split(",")
        if not all(part.strip() for part in parts):
            raise ValueError("an item of the list is empty")
        layers = [int(part) for part in parts]
        if len(set(layers)) != len(layers):
            raise ValueError("a layer is listed twice")
        return layers
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--layers {shown!r}: {usage} ({error}).") from None


def _integer(minimum: int):
    """An argparse type: a whole number >= ``minimum`` ("2.0", "1e3" and "" are refused)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _device(text: str):
    """The torch device a ``--device`` value names, refused when it does not exist on this machine."""
    import torch

    from .notebook import pick_device

    accepted = "use auto, cpu, cuda, cuda:N or mps"
    try:
        device = pick_device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device name: {accepted}.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {text}: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is "
                             "False): use --device cpu, or run where a GPU and its driver are installed.")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {text}: this machine has {count} CUDA GPU(s), numbered 0..{count - 1}.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: the Apple MPS backend is not available here: use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {text}: clipdecomp runs on cpu, cuda or mps; {accepted}.")
    return device


def _dataset(args, preprocess):
    from .datasets import ImageFolderDataset, ToyDataset, WaterbirdsDataset

    kind, _, location = args.data.partition(":")
    if kind == "toy":
        return ToyDataset(args.n or 256, args.seed, preprocess, split=location or "uniform")
    if kind in ("imagefolder", "waterbirds") and location:
        if kind == "imagefolder":
            return ImageFolderDataset(location, preprocess, progress=not args.no_progress)
        return WaterbirdsDataset(location, preprocess, split=args.split or "test", progress=not args.no_progress)
    raise ValueError(f"--data {args.data!r}: use 'toy' (or 'toy:SPLIT'), 'imagefolder:PATH' or 'waterbirds:PATH'.")


def _decompose(args) -> None:
    import torch

    from . import load
    from .cache import DecompositionCache
    from .pools import load_pool

    if args.split is not None and not args.data.startswith("waterbirds:"):
        raise ValueError(f"--split applies to waterbirds data only; --data {args.data!r} has no splits (for toy data "
                         "write toy:SPLIT).")
    if args.patch_detail is not None and not args.texts:
        raise ValueError("--patch-detail applies only with --texts (it picks how the per-patch maps of the texts are "
                         "summed): add --texts FILE or leave --patch-detail out.")
    device = _device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    labels = load_pool(Path(args.texts)) if args.texts else None  # checked (a UTF-8 file) before the model loads
    started = time.perf_counter()
    torch.manual_seed(args.seed)  # random-init specs ("ViT-B-16") get the same weights on every run, so resuming works
    bundle = load(args.model, device=device)
    dataset = _dataset(args, bundle.preprocess)
    indices = None
    if args.n is not None and not args.data.startswith("toy"):
        if args.n > len(dataset):
            raise ValueError(f"--n {args.n}: the dataset {args.data} has only {len(dataset)} images; give --n "
                             f"{len(dataset)} or less, or leave --n out to decompose them all.")
        indices = np.unique(np.linspace(0, len(dataset) - 1, args.n).round().astype(np.int64))
    texts = bundle.encode_text(labels) if labels is not None else None
    cache = DecompositionCache.build(
        bundle, dataset, args.out, batch_size=args.batch_size, layers=args.layers, text_directions=texts,
        text_labels=labels, patch_detail=args.patch_detail, indices=indices, shard_size=args.shard_size,
        dtype=args.dtype, num_workers=args.workers, progress=not args.no_progress)
    print(f"{cache} in {time.perf_counter() - started:.1f} s")


def _verify(args) -> None:
    from .cache import DecompositionCache

    started = time.perf_counter()
    cache = DecompositionCache.open(args.folder, verify=True)
    n_files = sum(len(record["files"]) for record in cache.manifest["shards"].values())
    print(f"{args.folder}: {len(cache)} images in {cache.manifest['n_shards']} shards; all {n_files} files match the "
          f"sha256 recorded when they were written ({cache.nbytes / 1e6:.1f} MB read in "
          f"{time.perf_counter() - started:.1f} s).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clipdecomp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("decompose", help="decompose a dataset into an on-disk cache")
    run.add_argument("--model", required=True, help="model spec for clipdecomp.load, e.g. toy or ViT-B-16/laion2b_s34b_b88k")
    run.add_argument("--data", required=True, help="toy[:SPLIT], imagefolder:PATH or waterbirds:PATH")
    run.add_argument("--out", required=True, help="cache folder (created; rerun the command to resume or repair)")
    run.add_argument("--n", type=_integer(1), help="toy: number of images (default 256); folders: an evenly spaced "
                                                  "subset of at most the dataset's size")
    run.add_argument("--seed", type=_integer(0), default=0, help="toy sampling seed and random-init seed")
    run.add_argument("--split", choices=["train", "val", "test", "all"], help="Waterbirds split (default test)")
    run.add_argument("--batch-size", type=_integer(1), default=32)
    run.add_argument("--layers", type=parse_layers, default=None,
                     help="layers that keep per-head detail: all (default), none, 8:12, 9,10,11 or the last four "
                          "as --layers=-4: (with '=': a leading '-' would read as an option)")
    run.add_argument("--texts", help="UTF-8 file with one text per line: per-patch terms are dotted with their "
                                     "embeddings")
    run.add_argument("--patch-detail", choices=["layer", "head", "sum"],
                     help="with --texts: layer (default), head or sum")
    run.add_argument("--shard-size", type=_integer(1), default=1024)
    run.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    run.add_argument("--workers", type=_integer(0), default=0, help="DataLoader processes decoding images")
    run.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N, mps")
    run.add_argument("--threads", type=_integer(1), help="torch CPU threads")
    run.add_argument("--no-progress", action="store_true")
    check = commands.add_parser("verify", help="re-hash every file of a cache against the checksums recorded with it")
    check.add_argument("folder", help="the cache folder")
    args = parser.parse_args(argv)
    from .cache import CacheLockedError, CorruptCacheError, IncompleteCacheError
    from .loading import WeightsUnavailableError

    try:
        _decompose(args) if args.command == "decompose" else _verify(args)
    except (ValueError, IndexError, OSError, NotImplementedError, OverflowError, CacheLockedError, CorruptCacheError,
            IncompleteCacheError, WeightsUnavailableError) as error:  # the message says what to do; no traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
