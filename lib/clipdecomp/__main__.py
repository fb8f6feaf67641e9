"""Command line: ``python -m clipdecomp decompose --model SPEC --data DATA --out DIR`` and ``verify DIR``.

Decomposes a dataset into a resumable on-disk cache (see :mod:`clipdecomp.cache`). Examples::

    python -m clipdecomp decompose --model toy --data toy --n-images 512 --out caches/toy
    python -m clipdecomp decompose --model ViT-B-16/laion2b_s34b_b88k --data imagefolder:~/imagenet/val \\
        --layers=-4: --batch-size 64 --device cuda --out caches/imagenet_b16
    python -m clipdecomp decompose --model toy --data waterbirds:~/waterbird_complete95_forest2water2 --out
    caches/wb
    python -m clipdecomp decompose --model ViT-L-14/openai --data 'wds:~/laion/{000000..000099}.tar' \\
        --caption-keys txt --out caches/laion_l14
    torchrun --nproc_per_node=8 -m clipdecomp decompose --model ViT-L-14/openai \\
        --data imagefolder:~/imagenet/val --out caches/imagenet_l14    # 8 processes build one cache together
    python -m clipdecomp verify caches/toy        # re-hash every file against the checksums written with it
    python -m clipdecomp second-order --model toy --data toy --n-images 512 --layer 3 --out caches/so3

Run the same command again after an interruption: finished shards are kept and the rest is computed
(with any number of processes). Run it again after ``verify`` reports damage: only the damaged shards
are recomputed. Every numeric option is checked and refused (never clamped) when out of range; errors
are one line, exit status 2.

Under ``torchrun`` every ``decompose`` option after ``-m clipdecomp`` must reach this program, but
torchrun's own parser completes abbreviations of its flags anywhere on the line; so no such option is
spelled as the start of a torchrun flag (tested). ``--n`` (which torchrun reads as ``--nnodes`` or
``--nproc-per-node``) is now ``--n-images``; plain ``python -m clipdecomp decompose`` still accepts
``--n``, with a note naming the new spelling.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["main", "parse_layers", "parser", "TORCHRUN_UNSAFE_ALIASES"]

TORCHRUN_UNSAFE_ALIASES = {"--n": "--n-images"}
"""``decompose`` options still read by plain ``python -m clipdecomp`` that torchrun swallows -> their names
now."""


def parse_layers(text: str) -> list[int] | None:
    """``"all"`` -> None (every layer), ``"none"`` -> [], ``"-4:"`` / ``"8:12"`` -> a range,
    ``"9,10,11"`` -> a list.

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
                raise ValueError(
                    "a range counts either from the end (-4:-1) or from the start (8:12), not both"
                )
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


def _keys(text: str) -> list[str]:
    """An argparse type: a comma-separated list of sidecar keys such as ``cls`` or ``txt,json``."""
    keys = [key.strip() for key in text.split(",")]
    if not all(keys):
        raise argparse.ArgumentTypeError(
            f"expected sidecar keys separated by commas (e.g. cls or txt), got {text!r}"
        )
    return keys


def _device(text: str):
    """The torch device a ``--device`` value names, refused when it does not exist on this machine.

    Under torchrun, ``auto`` and ``cuda`` mean this rank's own GPU, ``cuda:LOCAL_RANK``.
    """
    import torch

    from .distributed import launched_ranks, local_device
    from .notebook import pick_device

    accepted = "use auto, cpu, cuda, cuda:N or mps"
    try:
        device = pick_device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device name: {accepted}.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"--device {text}: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is "
                "False): use --device cpu, or run where a GPU and its driver are installed."
            )
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {text}: this machine has {count} CUDA GPU(s), numbered 0..{count - 1}."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: the Apple MPS backend is not available here: use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {text}: clipdecomp runs on cpu, cuda or mps; {accepted}.")
    if device.type == "cuda" and launched_ranks()[1] > 1:
        if device.index is None:
            return local_device("cuda")
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError(
                f"--device {text}: under torchrun every process of this host would use GPU {device.index}; "
                "give --device cuda (or auto) and each rank takes its own, cuda:LOCAL_RANK."
            )
    return device


def _dataset(args, preprocess):
    from .datasets import ImageFolderDataset, TarShardDataset, ToyDataset, WaterbirdsDataset

    kind, _, location = args.data.partition(":")
    strict = getattr(args, "strict", False)  # subcommands without --strict skip unreadable files
    if kind == "toy":
        return ToyDataset(args.n or 256, args.seed, preprocess, split=location or "uniform")
    if kind == "wds" and location and hasattr(args, "label_keys"):
        return TarShardDataset(
            location,
            preprocess,
            labels=args.label_keys or (),
            captions=args.caption_keys or (),
            strict=strict,
        )
    if kind in ("imagefolder", "waterbirds") and location:
        if kind == "imagefolder":
            return ImageFolderDataset(location, preprocess, strict=strict, progress=not args.no_progress)
        return WaterbirdsDataset(
            location, preprocess, split=args.split or "test", strict=strict, progress=not args.no_progress
        )
    tars = ", 'wds:PATH/{000000..000099}.tar'" if hasattr(args, "label_keys") else ""
    raise ValueError(
        f"--data {args.data!r}: use 'toy' (or 'toy:SPLIT'), 'imagefolder:PATH', 'waterbirds:PATH'{tars}."
    )


def _check_decompose_options(args) -> None:
    """Refuse options the chosen data would ignore, and read the old spelling ``--n``."""
    if args.n_old is not None:
        if args.n is not None:
            raise ValueError("--n and --n-images are the same option: give --n-images only.")
        args.n, args.n_spelled = args.n_old, "--n"
    kind = args.data.partition(":")[0]
    if args.split is not None and kind != "waterbirds":
        raise ValueError(
            f"--split applies to waterbirds data only; --data {args.data!r} has no splits (for toy data "
            "write toy:SPLIT)."
        )
    if args.patch_detail is not None and not args.texts:
        raise ValueError(
            "--patch-detail applies only with --texts (it picks how the per-patch maps of the texts are "
            "summed): add --texts FILE or leave --patch-detail out."
        )
    for option, value in (("--label-keys", args.label_keys), ("--caption-keys", args.caption_keys)):
        if value is not None and kind != "wds":
            raise ValueError(
                f"{option} applies to tar shards (--data wds:...) only: the labels of {kind} data come "
                "with the dataset."
            )
    if args.strict and kind == "toy":
        raise ValueError(
            "--strict applies to datasets of files (imagefolder, waterbirds, wds); toy images are drawn, "
            "never unreadable."
        )
    if kind == "wds":
        for option, value in (("--n-images", args.n), ("--shard-size", args.shard_size)):
            if value is not None:
                raise ValueError(
                    f"{option} does not apply to tar shards: the cache keeps one shard per tar file and "
                    "every readable sample; choose the tar files with the brace range instead."
                )


def _decompose(args) -> None:
    import torch

    from . import load
    from .cache import DecompositionCache
    from .distributed import init_from_environment
    from .pools import load_pool

    _check_decompose_options(args)
    device = _device(args.device)
    rank = torch.distributed.get_rank() if init_from_environment(device) else 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    labels = (
        load_pool(Path(args.texts)) if args.texts else None
    )  # checked (a UTF-8 file) before the model loads
    started = time.perf_counter()
    torch.manual_seed(
        args.seed
    )  # random-init specs ("ViT-B-16") get the same weights on every run, so resuming works
    bundle = load(args.model, device=device)
    dataset = _dataset(args, bundle.preprocess)
    indices = None
    if args.n is not None and not args.data.startswith("toy"):
        if args.n > len(dataset):
            spelled = getattr(args, "n_spelled", "--n-images")
            raise ValueError(
                f"{spelled} {args.n}: the dataset {args.data} has only {len(dataset)} images; give "
                f"{spelled} {len(dataset)} or less, or leave it out to decompose them all."
            )
        indices = np.unique(np.linspace(0, len(dataset) - 1, args.n).round().astype(np.int64))
    texts = bundle.encode_text(labels) if labels is not None else None
    cache = DecompositionCache.build(
        bundle,
        dataset,
        args.out,
        batch_size=args.batch_size,
        layers=args.layers,
        text_directions=texts,
        text_labels=labels,
        patch_detail=args.patch_detail,
        indices=indices,
        shard_size=args.shard_size,
        dtype=args.dtype,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    if rank == 0:  # one line per job, not per process
        print(f"{cache} in {time.perf_counter() - started:.1f} s")
    if getattr(args, "n_spelled", None) == "--n":  # after the work, so that an error stays one line
        warnings.warn(
            "--n is now spelled --n-images (torchrun reads --n as its own --nnodes or --nproc-per-node); "
            "write --n-images.",
            FutureWarning,
            stacklevel=2,
        )


def _verify(args) -> None:
    from .cache import DecompositionCache

    started = time.perf_counter()
    cache = DecompositionCache.open(args.folder, verify=True)
    n_files = sum(len(record["files"]) for record in cache.manifest["shards"].values())
    print(
        f"{args.folder}: {len(cache)} images in {cache.manifest['n_shards']} shards; all {n_files} files "
        f"match the "
        f"sha256 recorded when they were written ({cache.nbytes / 1e6:.1f} MB read in "
        f"{time.perf_counter() - started:.1f} s)."
    )


def _second_order(args) -> None:
    import torch

    from . import load
    from .second_order import SecondOrderStats

    if args.split is not None and not args.data.startswith("waterbirds:"):
        raise ValueError(f"--split applies to waterbirds data only; --data {args.data!r} has no splits.")
    device = _device(args.device)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    bundle = load(args.model, device=device)
    dataset = _dataset(args, bundle.preprocess)
    indices = None
    if args.n is not None and not args.data.startswith("toy"):
        if args.n > len(dataset):
            raise ValueError(f"--n-images {args.n}: the dataset {args.data} has only {len(dataset)} images.")
        indices = np.unique(np.linspace(0, len(dataset) - 1, args.n).round().astype(np.int64))
    stats = SecondOrderStats.build(
        bundle,
        dataset,
        args.out,
        args.layer,
        top_k=args.top_k,
        indices=indices,
        batch_size=args.batch_size,
        checkpoint_every=args.checkpoint_every,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    print(f"{stats} in {time.perf_counter() - started:.1f} s")


def parser() -> argparse.ArgumentParser:
    """The command line's parser: every subcommand and option."""
    parser = argparse.ArgumentParser(
        prog="python -m clipdecomp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("decompose", help="decompose a dataset into an on-disk cache")
    run.add_argument(
        "--model",
        required=True,
        help="model spec for clipdecomp.load, e.g. toy or ViT-B-16/laion2b_s34b_b88k",
    )
    run.add_argument(
        "--data",
        required=True,
        help="toy[:SPLIT], imagefolder:PATH, waterbirds:PATH or "
        "wds:PATH/{000000..000099}.tar (webdataset tar shards)",
    )
    run.add_argument(
        "--out", required=True, help="cache folder (created; rerun the command to resume or repair)"
    )
    run.add_argument(
        "--n-images",
        dest="n",
        type=_integer(1),
        help="toy: number of images (default 256); folders: an evenly spaced subset of at most the "
        "dataset's size",
    )
    run.add_argument(
        "--n", dest="n_old", type=_integer(1), help=argparse.SUPPRESS
    )  # old name: not under torchrun
    run.add_argument("--seed", type=_integer(0), default=0, help="toy sampling seed and random-init seed")
    run.add_argument(
        "--split", choices=["train", "val", "test", "all"], help="Waterbirds split (default test)"
    )
    run.add_argument(
        "--label-keys", type=_keys, help="wds: sidecar keys holding an integer label each, e.g. cls"
    )
    run.add_argument("--caption-keys", type=_keys, help="wds: sidecar keys holding a caption each, e.g. txt")
    run.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image or corrupt sample "
        "instead of skipping it (with a count and a warning)",
    )
    run.add_argument("--batch-size", type=_integer(1), default=32)
    run.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        help="layers that keep per-head detail: all (default), none, 8:12, 9,10,11 or the last four "
        "as --layers=-4: (with '=': a leading '-' would read as an option)",
    )
    run.add_argument(
        "--texts", help="UTF-8 file with one text per line: per-patch terms are dotted with their embeddings"
    )
    run.add_argument(
        "--patch-detail", choices=["layer", "head", "sum"], help="with --texts: layer (default), head or sum"
    )
    run.add_argument(
        "--shard-size",
        type=_integer(1),
        help="images per cache shard (default 1024; tar shards: one cache shard per tar file)",
    )
    run.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    run.add_argument("--workers", type=_integer(0), default=0, help="DataLoader processes decoding images")
    run.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N, mps")
    run.add_argument("--threads", type=_integer(1), help="torch CPU threads")
    run.add_argument("--no-progress", action="store_true")
    check = commands.add_parser(
        "verify", help="re-hash every file of a cache against the checksums recorded with it"
    )
    check.add_argument("folder", help="the cache folder")
    second = commands.add_parser(
        "second-order", help="stream one MLP layer's second-order statistics to a folder"
    )
    for flag, help_text in (
        ("--model", "model spec for clipdecomp.load"),
        ("--data", "toy[:SPLIT], imagefolder:PATH or waterbirds:PATH"),
        ("--out", "statistics folder (created; rerun to resume)"),
    ):
        second.add_argument(flag, required=True, help=help_text)
    second.add_argument(
        "--layer", type=int, required=True, help="the MLP layer (negative counts from the end)"
    )
    second.add_argument(
        "--top-k", type=_integer(1), default=100, help="images kept per neuron (the paper: 100)"
    )
    second.add_argument(
        "--n-images",
        dest="n",
        type=_integer(1),
        help="toy: number of images; folders: an evenly spaced subset",
    )
    second.add_argument("--seed", type=_integer(0), default=0, help="toy sampling seed and random-init seed")
    second.add_argument(
        "--split", choices=["train", "val", "test", "all"], help="Waterbirds split (default test)"
    )
    for flag, default in (("--batch-size", 32), ("--checkpoint-every", 1024), ("--workers", 0)):
        second.add_argument(flag, type=_integer(1 if flag != "--workers" else 0), default=default)
    second.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N, mps")
    second.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    command_line = parser()
    args = command_line.parse_args(argv)
    import torch.distributed

    from .cache import CacheLockedError, CorruptCacheError, IncompleteCacheError, OtherRankFailedError
    from .loading import WeightsUnavailableError

    joined = torch.distributed.is_initialized()
    try:
        {"decompose": _decompose, "verify": _verify, "second-order": _second_order}[args.command](args)
    except (
        ValueError,
        IndexError,
        OSError,
        NotImplementedError,
        OverflowError,
        CacheLockedError,
        CorruptCacheError,
        IncompleteCacheError,
        OtherRankFailedError,
        WeightsUnavailableError,
    ) as error:  # one line, no traceback
        command_line.exit(2, f"{command_line.prog} {args.command}: error: {error}\n")
    finally:
        if not joined and torch.distributed.is_initialized():  # the group this command joined (torchrun)
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
