"""Decompose a whole dataset once, streaming the terms to disk in memory-mappable shards.

The paper's experiments need the direct terms of every image (50,000 for ImageNet val), far more than
fits in memory at full detail. :meth:`DecompositionCache.build` runs :func:`clipdecomp.decompose`
batch by batch and keeps only the reductions chosen up front:

==============  ===================  ========================================================
field           shape                what
==============  ===================  ========================================================
``embedding``   [n, d']              the CLS-embedding term
``attns``       [n, L, d']           each attention layer's term
``mlps``        [n, L, d']           each MLP's term
``heads``       [n, L', H, d']       per-head terms of ``head_layers`` (summed over patches)
``cls_to_cls``  [n, L, d']           CLS-attends-to-CLS terms, summed over heads
``norm``        [n]                  ``||y||`` before normalisation (always fp32)
``pool_mlp``    [n, d']              attention-pool towers (SigLIP): the pool MLP's term
``patch_text``  see ``patch_detail`` per-patch terms of ``head_layers`` dotted with T text
                                     directions (only when ``text_directions`` is given)
==============  ===================  ========================================================

``patch_detail`` picks how far ``patch_text`` is summed: ``"layer"`` (default) sums over heads ->
[n, L', N, T] (per-layer heat maps); ``"head"`` keeps [n, L', N, H, T] (joint head x patch maps, for
few texts); ``"sum"`` sums over layers and heads -> [n, N, T] (the paper's segmentation maps). Token 0
is the CLS key (an all-zero slot on towers without one); maps over the patch grid use ``[..., 1:, :]``.

Storage: terms in fp16 (or ``dtype="float32"``); reductions such as :meth:`~DecompositionCache.mean`
accumulate in float64 and return fp32. One folder per ``shard_size`` images, each a set of ``.npy``
files opened with ``mmap_mode="r"``; :class:`ShardedArray` presents a field's shards as one array.
Labels, dataset indices and per-image ids are saved in every shard beside the terms, never
reconstructed from file order.

Integrity: when a shard is written, ``manifest.json`` records its row count, first and last image id,
and every file's size, shape, dtype and sha256. Every :meth:`~DecompositionCache.open` checks sizes,
shapes, row counts and the checksums of the small files (ids, dataset indices, labels), so a
truncated, swapped or duplicated shard is named instead of read; :meth:`~DecompositionCache.verify`
(``python -m clipdecomp verify DIR``) re-hashes every file, which also finds values overwritten in
place. A build that reuses shards verifies them fully first, and recomputes only the damaged ones:
running the same build again is the repair.

Safety: a shard is written to a temporary folder (``.shard_00003.clipdecomp-tmp-PID``) and renamed
into place, so a killed run leaves only whole shards; building again with the same arguments keeps
them and computes the rest. The builder writes only into a new folder, an empty one, or its own cache,
and removes nothing but its own temporaries and the damaged shards it recomputes. A build that fails
before its first shard leaves the folder as it found it. An exclusive ``flock`` on the folder itself
(no lock file; released by the OS even when a run is killed, and never held by DataLoader workers)
makes a second concurrent build fail at once with :class:`CacheLockedError`. A complete cache on
read-only storage is reused without writing anything; a full disk or read-only storage during a build
is one :class:`CacheStorageError` saying what, where and how much space was needed, and the cache
stays resumable. The manifest stores a content key (model, weights, open_clip version, preprocessing,
dataset, selection, reductions); building or opening with a different key raises
:class:`StaleCacheError` naming what differs, so a stale cache is never read.

Many processes: called on every rank of an initialised ``torch.distributed`` process group (``torchrun
... -m clipdecomp decompose`` does this itself), :meth:`~DecompositionCache.build` builds one cache with
all of them (see :mod:`clipdecomp.distributed`). Every rank computes the content key and they must
agree; rank 0 checks the folder, takes its lock for the whole job (the ranks work inside it) and alone
writes ``manifest.json``; all ranks share the full verification of the shards already there; the
missing shards are dealt out in turn (``todo[rank::world_size]``); each rank writes whole shards
atomically, recording each in its own journal (``journal_rank00003.json``) before renaming it into
place; when every rank is done, rank 0 merges the journals into the manifest and marks it complete.
A shard's terms depend only on its own images and batches (batches never cross a shard), so the files
are bitwise the ones a single process writes. A killed rank or job resumes with any number of ranks,
one included: the journals of the killed job are merged, and only missing shards are computed.

Tar shards: a :class:`~clipdecomp.datasets.ShardedDataset` such as
:class:`~clipdecomp.datasets.TarShardDataset` is streamed, one cache shard per tar file (the shard
count is known up front, the image count when the last shard is written). Its samples' ids, labels,
captions (``captions``) and positions within their tar (``indices``) are stored per shard; corrupt
samples skipped while streaming are recorded per shard and listed by :attr:`~DecompositionCache.skipped`.

Example:
    >>> from clipdecomp.datasets import ToyDataset
    >>> data = ToyDataset(40, seed=1, preprocess=bundle.preprocess)
    >>> cache = DecompositionCache.build(bundle, data, tmp_path / "toy", layers=range(-4, 0), progress=False)
    >>> cache.heads.shape                                   # 40 images, 4 layers, 4 heads, d' = 64
    (40, 4, 4, 64)
    >>> cache.mean("heads").shape                           # fp32 means, for mean-ablation
    (4, 4, 64)
    >>> cache = cache.verify()                              # re-hash every file: CorruptCacheError if damaged
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import open_clip
import torch

from .checks import check_choice, check_int, check_texts_list
from .datasets import DecomposableDataset, ShardedDataset
from .decomposition import Decomposition, _check_layers, decompose
from .distributed import OtherRankFailedError, Ranks
from .distributed import __file__ as _DISTRIBUTED_FILE
from .loading import ClipBundle, file_sha256
from .progress import progress_bar
from .towers import vision_tower

try:
    import fcntl
except ImportError:  # Windows: no flock; builds still work but are not guarded against concurrent writers
    fcntl = None

__all__ = [
    "DecompositionCache",
    "ShardedArray",
    "StaleCacheError",
    "CacheLockedError",
    "IncompleteCacheError",
    "CorruptCacheError",
    "CacheStorageError",
    "OtherRankFailedError",
    "cache_key",
]

FORMAT = 2
FIELDS = ("embedding", "attns", "mlps", "heads", "cls_to_cls", "norm", "pool_mlp", "patch_text")
PatchDetail = Literal["layer", "head", "sum"]

_SHARD = re.compile(r"shard_\d{5}")
_SHARD_FILE = re.compile(
    r"(?:embedding|attns|mlps|heads|cls_to_cls|norm|pool_mlp|patch_text|ids|indices"
    r"|label_.+|caption_.+)\.npy"
)
_JOURNAL = re.compile(r"journal_rank\d{5}\.json")  # the shards one rank of a job has written
_TEMP = re.compile(
    r"\.(?:shard_\d{5}|manifest\.json|text_directions\.npy|journal_rank\d{5}\.json)"
    r"\.clipdecomp-tmp-\d+"
)
_SMALL_FILE = re.compile(
    r"(?:ids|indices|label_.+|caption_.+)\.npy"
)  # loaded whole on open, so hashed on every open
_FORMAT_1_LEFTOVER = re.compile(r"\.lock|\.shard_\d{5}\.tmp-\d+")  # the lock file and temporaries of format 1
REPAIR = (
    "Build it again with the same arguments (the same DecompositionCache.build call or `python -m "
    "clipdecomp decompose` command) to recompute only the damaged shards, or delete the folder."
)


class StaleCacheError(ValueError):
    """The cache on disk was built from a different model, dataset or reductions than requested."""


class CacheLockedError(RuntimeError):
    """Another run is writing this cache folder right now."""


class IncompleteCacheError(RuntimeError):
    """The cache folder holds an unfinished build (e.g. a killed run): build again to resume."""


class CorruptCacheError(RuntimeError):
    """Files of a cache no longer match what was recorded when they were written; ``problems`` names each."""

    def __init__(self, folder: Path, problems: Sequence[str], repair: str = REPAIR):
        self.folder, self.problems, self.repair = Path(folder), list(problems), repair
        more = len(self.problems) - 6
        shown = "; ".join(self.problems[:6]) + (f"; and {more} more" if more > 0 else "")
        super().__init__(f"The cache in {folder} is damaged: {shown}. {repair}")

    def __reduce__(self):  # picklable, so the error can travel between processes
        return type(self), (self.folder, self.problems, self.repair)


class CacheStorageError(OSError):
    """The cache could not be written: disk full, read-only storage or no permission (one clear line).

    ``errno`` and ``filename`` are those of the failed write; ``str()`` is the whole explanation.
    """

    def __str__(self) -> str:
        return str(self.args[0])


class ShardedArray:
    """The rows of several memory-mapped ``.npy`` shards, read as one array whose axis 0 is the image.

    Indexing reads only the rows asked for: ``a[i]``, ``a[10:20]``, ``a[mask]``, ``a[[3, 1]]``, and
    tuples such as ``a[:, 2]``. ``np.asarray(a)`` loads everything. :meth:`chunks` streams shard-sized
    blocks for reductions that must not load the whole field.
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]),) + tuple(parts[0].shape[1:])
        self.dtype = parts[0].dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.parts)})"

    def __getitem__(self, key) -> np.ndarray:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, (bool, np.bool_)):
            raise TypeError(
                "index the image axis with an int, a slice, a boolean mask or a list of ints, not a bool."
            )
        if isinstance(rows, (int, np.integer)):
            index = int(rows) + (len(self) if rows < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"row {rows} out of range for {len(self)} images.")
            shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
            return np.asarray(self.parts[shard][(index - self.offsets[shard],) + tuple(rest)])
        index = np.arange(len(self))[rows]
        if index.ndim != 1:
            raise IndexError(
                "index the first (image) axis with an int, a slice, a boolean mask or a 1-D list of ints."
            )
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        blocks = {}
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            blocks[int(shard)] = (
                where,
                np.asarray(self.parts[shard][(index[where] - self.offsets[shard],) + tuple(rest)]),
            )
        template = np.asarray(self.parts[0][(slice(0, 0),) + tuple(rest)])
        out = np.empty((len(index),) + template.shape[1:], dtype=self.dtype)
        for where, block in blocks.values():
            out[where] = block
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def chunks(self, rows: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, block)`` with blocks of at most ``rows`` rows, in order."""
        rows = check_int("rows", rows, minimum=1)
        for offset, part in zip(self.offsets, self.parts):
            for start in range(0, len(part), rows):
                yield int(offset) + start, np.asarray(part[start : start + rows])

    def mean(self) -> np.ndarray:
        """Mean over images, accumulated in float64, returned as float32."""
        total = np.zeros(self.shape[1:], dtype=np.float64)
        for _, block in self.chunks():
            total += block.sum(0, dtype=np.float64)
        return (total / max(len(self), 1)).astype(np.float32)


def _model_fingerprint(bundle: ClipBundle) -> str:
    """The weights file's sha256, or for random-init models a sha256 of the image tower's parameters."""
    if bundle.weights_sha256:
        return bundle.weights_sha256
    digest = hashlib.sha256()
    for name, tensor in vision_tower(bundle).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "params:" + digest.hexdigest()


def _array_sha256(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def cache_key(
    bundle: ClipBundle,
    dataset: DecomposableDataset | ShardedDataset,
    *,
    head_layers: Sequence[int],
    selection: np.ndarray | None,
    text_directions: np.ndarray | None,
    patch_detail: str,
    dtype: str,
    shard_size: int | None,
) -> dict:
    """Everything a cache's contents depend on, as nested JSON-able dicts (compared key by key).

    ``selection`` and ``shard_size`` are None for a sharded (tar) dataset: every readable sample of
    every shard, one cache shard per dataset shard.
    """
    chosen = (
        "every readable sample of every shard"
        if selection is None
        else {"n_images": int(len(selection)), "sha256": _array_sha256(selection.astype(np.int64))}
    )
    return {
        "format": FORMAT,
        "model": {
            "spec": bundle.spec,
            "weights": _model_fingerprint(bundle),
            "open_clip": open_clip.__version__,
            **vision_tower(bundle).describe(),
        },  # layers, width, image_size, patch_size
        "dataset": dataset.content_key(),  # includes the dataset's preprocessing
        "selection": chosen,
        "reductions": {
            "head_layers": list(head_layers),
            "dtype": dtype,
            "shard_size": shard_size,
            "patch_detail": patch_detail if text_directions is not None else None,
            "text_directions": None
            if text_directions is None
            else {"shape": list(text_directions.shape), "sha256": _array_sha256(text_directions)},
        },
    }


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _key_differences(stored: dict, wanted: dict) -> list[str]:
    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."

    old, new = _flatten(stored), _flatten(wanted)
    return [
        f"{name}: cache has {short(old.get(name))}, requested {short(new.get(name))}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]


def _shard_name(shard: int) -> str:
    return f"shard_{shard:05d}"


def _temp_path(target: Path) -> Path:
    """Where ``target`` is written before being renamed into place (a name no user file has)."""
    return target.with_name(f".{target.name}.clipdecomp-tmp-{os.getpid()}")


def _size(size: float | None) -> str:
    """A byte count for people: "48 KB", "1.2 MB", "3.40 GB"."""
    if size is None:
        return "an unknown amount"
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{max(size / 1e3, 0):.0f} KB"


def _on_disk(folder: Path, sizes: Sequence[int]) -> int:
    """Bytes that files of these sizes take on the file system holding ``folder`` (whole blocks, plus a
    folder)."""
    try:
        block = os.statvfs(folder).f_frsize or 4096
    except (OSError, AttributeError):
        block = 4096
    return block * (1 + sum(-(-size // block) for size in sizes))


@contextmanager
def _writing(folder: Path, what: str, needed: int | None = None, rest: str = "") -> Iterator[None]:
    """Turn a disk-full, read-only or permission failure while writing ``what`` into one clear
    CacheStorageError."""
    try:
        yield
    except OSError as error:
        if isinstance(error, CacheStorageError):
            raise
        resume = "Finished shards are kept: run the same build again to resume."
        if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            try:
                free = shutil.disk_usage(folder).free
            except OSError:
                free = None
            need = f"; it needs about {_size(needed)}{rest}" if needed is not None else ""
            message = (
                f"No space left on the device holding {folder} while writing {what}{need}, and "
                f"{_size(free)} is free. Free some space (or build into a folder on a larger disk). {resume}"
            )
        elif error.errno == errno.EROFS:
            message = (
                f"Cannot write {what}: {folder} is on read-only storage. A complete cache can be read from "
                f"there; to build or resume it, copy it to writable storage or build into a writable folder."
            )
        elif error.errno in (errno.EACCES, errno.EPERM):
            message = (
                f"Cannot write {what} in {folder}: permission denied ({error.filename or folder}). Make the "
                f"folder writable or build into another one. {resume}"
            )
        else:
            raise
        failure = CacheStorageError(message)
        failure.errno, failure.filename = error.errno, error.filename
        raise failure from error


def _save_array(path: Path, values: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would append ".npy" to a temporary name
        np.save(handle, values)


def _write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically: to a temporary file, then rename over ``path``."""
    tmp = _temp_path(path)
    try:
        tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_own(name: str) -> bool:
    """Whether a folder entry has a name the builder writes (so a cache folder may hold it)."""
    return name in ("manifest.json", "text_directions.npy") or any(
        pattern.fullmatch(name) for pattern in (_SHARD, _TEMP, _JOURNAL)
    )


def _warn(message: str) -> None:
    """Warn from the first caller outside this module (the user's build call), however deep the builder is."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename in (__file__, _DISTRIBUTED_FILE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _remove_shard(path: Path) -> None:
    """Delete a shard folder the builder wrote: only its own file names; anything else stops the removal."""
    strangers = [p.name for p in path.iterdir() if not _SHARD_FILE.fullmatch(p.name) or not p.is_file()]
    if strangers:
        raise FileExistsError(
            f"{path} holds entries the builder did not write ({strangers[:5]}), so it is not "
            "removed: move them out of the cache folder and build again."
        )
    for file in path.iterdir():
        file.unlink()
    path.rmdir()


def _lock_holder(folder: Path) -> str:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["writer"]
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def _exclusive(folder: Path) -> Iterator[int | None]:
    """Hold an exclusive ``flock`` on ``folder`` itself (no lock file); yield its descriptor.

    Raises CacheLockedError at once if another process holds it. The OS releases the lock when the
    process dies; DataLoader workers close their inherited copy (see :class:`_ReleaseLockInWorker`).
    """
    if fcntl is None:
        warnings.warn(
            "File locking is unavailable on this platform: do not build the same cache twice at once."
        )
        yield None
        return
    descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        locked = True
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheLockedError(
                f"{folder} is being written by another run ({_lock_holder(folder)}). Wait for it to finish "
                f"and build "
                "again (finished shards are reused), or write to another folder."
            ) from None
        except OSError as error:  # e.g. a network file system without flock
            warnings.warn(f"Cannot lock {folder} ({error}): do not build the same cache twice at once.")
            locked = False
        yield descriptor if locked else None
    finally:
        os.close(descriptor)


class _ReleaseLockInWorker:
    """DataLoader ``worker_init_fn``: close the lock descriptor a forked worker inherited.

    A flock belongs to the open file, shared by every process holding a copy of the descriptor; if
    workers kept theirs, a killed parent's lock would outlive it until the workers exit.
    """

    def __init__(self, descriptor: int):
        status = os.fstat(descriptor)
        self.descriptor, self.identity = descriptor, (status.st_dev, status.st_ino)

    def __call__(self, worker_id: int) -> None:
        try:
            status = os.fstat(self.descriptor)
        except OSError:
            return  # not inherited (spawned workers)
        if (status.st_dev, status.st_ino) == self.identity:
            os.close(self.descriptor)


def _checked(image, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The image if it is a finite float tensor of the model's input shape; else a ValueError naming it."""
    if not isinstance(image, torch.Tensor) or tuple(image.shape) != shape or not image.is_floating_point():
        described = (
            f"shape {list(image.shape)}, dtype {image.dtype}"
            if isinstance(image, torch.Tensor)
            else f"type {type(image).__name__}"
        )
        raise ValueError(
            f"{name} has {described} after preprocessing; the model expects a float tensor "
            f"{list(shape)}: give the dataset the model's preprocess (bundle.preprocess)."
        )
    if not torch.isfinite(image).all():
        raise ValueError(
            f"{name} contains NaN or Inf values after preprocessing; check the file and the preprocess."
        )
    return image


class _Images(torch.utils.data.Dataset):
    """The images of a dataset, checked one by one so that a bad one is named (labels come from the
    dataset)."""

    def __init__(self, dataset: DecomposableDataset, size: tuple[int, int]):
        self.dataset, self.shape = dataset, (3, *size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _checked(
            self.dataset.image(index), f"Image {self.dataset.ids[index]} (index {index})", self.shape
        )


class _ShardBatches(torch.utils.data.IterableDataset):
    """The samples of some shards of a sharded dataset, checked, in batches that never cross a shard.

    Each DataLoader worker streams whole shards; every shard ends with a piece marked ``last`` (its
    images may be none) that carries the shard's skipped samples.
    """

    def __init__(
        self, dataset: ShardedDataset, shards: Sequence[int], batch_size: int, size: tuple[int, int]
    ):
        self.dataset, self.shards, self.batch_size, self.shape = dataset, list(shards), batch_size, (3, *size)

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        for shard in self.shards if worker is None else self.shards[worker.id :: worker.num_workers]:
            skipped: list[tuple[str, str]] = []
            batch = []
            for sample in self.dataset.samples(shard, skipped):
                batch.append(sample._replace(image=_checked(sample.image, f"Image {sample.id}", self.shape)))
                if len(batch) == self.batch_size:
                    yield self._piece(shard, batch, [], last=False)
                    batch = []
            yield self._piece(shard, batch, skipped, last=True)

    def _piece(self, shard: int, batch: list, skipped: list, last: bool) -> dict:
        return {
            "shard": shard,
            "last": last,
            "skipped": skipped,
            "images": torch.stack([s.image for s in batch]) if batch else torch.zeros((0, *self.shape)),
            "ids": [s.id for s in batch],
            "indices": [s.index for s in batch],
            "labels": {name: [s.labels[name] for s in batch] for name in self.dataset.label_names},
            "captions": {name: [s.captions[name] for s in batch] for name in self.dataset.caption_names},
        }


def _read_manifest(folder: Path) -> dict | None:
    """The parsed manifest (None if there is none); CorruptCacheError if it cannot be read as one."""
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCacheError(
            folder, [f"manifest.json is unreadable ({type(error).__name__}: {error})"]
        ) from None
    if (
        not isinstance(manifest, dict)
        or "format" not in manifest
        or not isinstance(manifest.get("key"), dict)
    ):
        raise CorruptCacheError(
            folder, ["manifest.json is not a decomposition-cache manifest (no format and key)"]
        )
    return manifest


def _manifest_problems(manifest: dict) -> list[str]:
    """What is missing or malformed in a current-format manifest (an empty list when it is sound).

    A cache of a sharded (tar) dataset has no ``shard_size`` (one cache shard per tar file) and learns
    ``n_images`` only when it is complete.
    """

    def positive(name: str) -> bool:
        value = manifest.get(name)
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    per_tar = "shard_size" in manifest and manifest["shard_size"] is None
    counted = (
        ("n_shards",)
        + (("shard_size",) if not per_tar else ())
        + (("n_images",) if not per_tar or manifest.get("status") == "complete" else ())
    )
    problems = [f"manifest.json lacks a valid {name!r}" for name in counted if not positive(name)]
    if manifest.get("status") not in ("building", "complete"):
        problems.append(f"manifest.json has status {manifest.get('status')!r}")
    if (
        not isinstance(manifest.get("shards"), dict)
        or not isinstance(manifest.get("label_names"), list)
        or (not isinstance(manifest.get("caption_names", []), list))
    ):
        problems.append("manifest.json lacks the shard records or label names")
    if problems:
        return problems
    if not per_tar and manifest["n_shards"] != -(-manifest["n_images"] // manifest["shard_size"]):
        return ["manifest.json's n_shards does not match n_images and shard_size"]
    if manifest["status"] == "complete":
        if not isinstance(manifest.get("fields"), dict):
            return ["manifest.json lacks the fields of the finished cache"]
        unrecorded = [
            _shard_name(s) for s in range(manifest["n_shards"]) if _shard_name(s) not in manifest["shards"]
        ]
        if unrecorded:
            return [f"manifest.json has no record of {unrecorded[:3]}"]
        wanted = (
            {f"{field}.npy" for field in manifest["fields"]}
            | {"ids.npy", "indices.npy"}
            | {f"label_{label}.npy" for label in manifest["label_names"]}
            | {f"caption_{name}.npy" for name in manifest.get("caption_names", [])}
        )
        for name, record in manifest["shards"].items():
            if (
                not isinstance(record, dict)
                or not isinstance(record.get("files"), dict)
                or not wanted <= set(record["files"])
                or not isinstance(record.get("rows"), int)
            ):
                return [f"manifest.json's record of {name} is malformed"]
        rows = sum(record["rows"] for record in manifest["shards"].values())
        if rows != manifest["n_images"]:
            return [f"manifest.json records {rows} rows in its shards for {manifest['n_images']} images"]
    return []


def _check_shard(
    folder: Path, name: str, record: dict, full: bool
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Open one shard's files against its record: (arrays by file name, problems).

    Always checked: presence, size, shape and dtype of every file, and the sha256 of the small files
    (ids, indices, labels). ``full`` also hashes the term files.
    """
    path = folder / name
    if not path.is_dir():
        return {}, [f"{name} is missing"]
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not files:
        return {}, [f"manifest.json's record of {name} is malformed"]
    arrays, problems = {}, []
    for file, expected in sorted(files.items(), key=lambda item: item[0] != "ids.npy"):  # whose shard is it?
        where, small = f"{name}/{file}", bool(_SMALL_FILE.fullmatch(file))
        try:
            size = (path / file).stat().st_size
            if size != expected["bytes"]:
                problems.append(
                    f"{where} has {size} bytes, {expected['bytes']} were written (truncated or replaced)"
                )
                continue
            if (full or small) and file_sha256(path / file) != expected["sha256"]:
                hint = ""
                if file == "ids.npy":
                    hint = (
                        f"; it should hold images {record.get('first_id')!r}..{record.get('last_id')!r} (a "
                        f"shard "
                        "folder was moved, swapped or copied over this one?)"
                    )
                problems.append(f"{where} does not match the checksum recorded when it was written{hint}")
                if file == "ids.npy":
                    break  # another shard's folder: its other files say nothing more
                continue
            array = np.load(path / file, mmap_mode=None if small else "r")
        except FileNotFoundError:
            problems.append(f"{where} is missing")
            continue
        except (OSError, ValueError, EOFError) as error:
            problems.append(f"{where} is unreadable ({type(error).__name__}: {error})")
            continue
        except (KeyError, TypeError):
            problems.append(f"manifest.json's record of {where} is malformed")
            continue
        if list(array.shape) != expected.get("shape") or str(array.dtype) != expected.get("dtype"):
            problems.append(
                f"{where} holds {list(array.shape)} {array.dtype}, {expected.get('shape')} "
                f"{expected.get('dtype')} were written"
            )
            continue
        if not array.shape or array.shape[0] != record.get("rows"):
            problems.append(f"{where} has {array.shape[:1]} rows, the shard holds {record.get('rows')}")
            continue
        arrays[file] = array
    return arrays, problems


def _record(path: Path, ids: np.ndarray) -> dict:
    """What verifies a freshly written shard later: row count, first and last id, and per file its size,
    shape, dtype and sha256."""
    files = {}
    for file in sorted(path.iterdir()):
        array = np.load(file, mmap_mode="r")
        files[file.name] = {
            "bytes": file.stat().st_size,
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "sha256": file_sha256(file),
        }
    return {
        "rows": len(ids),
        "first_id": str(ids[0]) if len(ids) else None,
        "last_id": str(ids[-1]) if len(ids) else None,
        "files": files,
    }


class DecompositionCache:
    """A finished cache: create with :meth:`build`, reopen with :meth:`open`, check with :meth:`verify`.

    Fields (see the module docstring) are :class:`ShardedArray` views of memory-mapped shards:
    ``embedding``, ``attns``, ``mlps``, ``heads``, ``cls_to_cls``, ``norm``, ``patch_text``. Per-image
    metadata is loaded into memory: ``labels`` (name -> int array), ``ids`` (strings), ``indices``
    (positions in the dataset; for tar shards, positions within each tar), ``captions`` (name -> list of
    strings, tar shards only). Creating one runs the cheap integrity checks of every shard and raises
    :class:`CorruptCacheError` naming each damaged file.
    """

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        shards, problems = [], []
        for shard in range(manifest["n_shards"]):
            name = _shard_name(shard)
            arrays, found = _check_shard(self.folder, name, manifest["shards"][name], full=False)
            shards.append(arrays)
            problems += found
        problems += self._text_directions_problems()
        if problems:
            raise CorruptCacheError(self.folder, problems)
        self._fields = {name: ShardedArray([s[f"{name}.npy"] for s in shards]) for name in manifest["fields"]}
        self.ids = np.concatenate([s["ids.npy"] for s in shards]).tolist()
        self.indices = np.concatenate([s["indices.npy"] for s in shards])
        self.labels = {
            name: np.concatenate([s[f"label_{name}.npy"] for s in shards]) for name in manifest["label_names"]
        }
        self.captions = {
            name: np.concatenate([s[f"caption_{name}.npy"] for s in shards]).tolist()
            for name in manifest.get("caption_names", [])
        }

    def _text_directions_problems(self) -> list[str]:
        expected = self.manifest["key"]["reductions"]["text_directions"]
        if expected is None:
            return []
        try:
            texts = np.load(self.folder / "text_directions.npy")
        except FileNotFoundError:
            return ["text_directions.npy is missing"]
        except (OSError, ValueError, EOFError) as error:
            return [f"text_directions.npy is unreadable ({type(error).__name__}: {error})"]
        if list(texts.shape) != expected["shape"] or _array_sha256(texts) != expected["sha256"]:
            return ["text_directions.npy does not hold the directions the cache was built with"]
        return []

    @property
    def key(self) -> dict:
        return self.manifest["key"]

    @property
    def head_layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["key"]["reductions"]["head_layers"])

    @property
    def text_labels(self) -> list[str] | None:
        return self.manifest.get("text_labels")

    @property
    def text_directions(self) -> np.ndarray | None:
        path = self.folder / "text_directions.npy"
        return np.load(path) if path.is_file() else None

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(id, reason)`` of each corrupt sample a tar-shard build skipped, in shard order (else empty)."""
        return [
            (sample_id, reason)
            for shard in range(self.manifest["n_shards"])
            for sample_id, reason in self.manifest["shards"][_shard_name(shard)].get("skipped", [])
        ]

    @property
    def nbytes(self) -> int:
        """Bytes of all shard files, as recorded when they were written."""
        return sum(
            f["bytes"] for record in self.manifest["shards"].values() for f in record["files"].values()
        )

    def __len__(self) -> int:
        return self.manifest["n_images"]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}{list(array.shape)}" for name, array in self._fields.items())
        return f"DecompositionCache({self.folder}, {len(self)} images: {shapes})"

    def verify(self) -> "DecompositionCache":
        """Re-hash every file and compare it with the sha256 recorded when it was written; return self.

        Finds what the cheap checks of :meth:`open` cannot: values overwritten in place. Raises
        :class:`CorruptCacheError` naming every damaged shard and file; building again with the same
        arguments recomputes exactly those shards.
        """
        problems = [
            problem
            for shard in range(self.manifest["n_shards"])
            for problem in _check_shard(
                self.folder, _shard_name(shard), self.manifest["shards"][_shard_name(shard)], full=True
            )[1]
        ]
        if problems:
            raise CorruptCacheError(self.folder, problems)
        return self

    def field(self, name: str) -> ShardedArray:
        """A stored field by name; raises KeyError naming the fields this cache has."""
        if name not in self._fields:
            hint = " (build with text_directions=... to get per-patch maps)" if name == "patch_text" else ""
            raise KeyError(f"This cache has no field {name!r}{hint}; it has {sorted(self._fields)}.")
        return self._fields[name]

    embedding = property(lambda self: self.field("embedding"), doc="[n, d'] CLS-embedding terms.")
    attns = property(lambda self: self.field("attns"), doc="[n, L, d'] attention-layer terms.")
    mlps = property(lambda self: self.field("mlps"), doc="[n, L, d'] MLP terms.")
    heads = property(lambda self: self.field("heads"), doc="[n, L', H, d'] head terms of head_layers.")
    cls_to_cls = property(
        lambda self: self.field("cls_to_cls"), doc="[n, L, d'] CLS->CLS terms, summed over heads."
    )
    norm = property(lambda self: self.field("norm"), doc="[n] norm of the embedding before normalisation.")
    pool_mlp = property(
        lambda self: self.field("pool_mlp"), doc="[n, d'] attention pools: the pool MLP's term."
    )
    patch_text = property(
        lambda self: self.field("patch_text"), doc="per-patch terms dotted with text directions."
    )

    def mean(self, component: str) -> np.ndarray:
        """Mean over images of a field (e.g. ``"heads"`` -> [L', H, d']), accumulated in float64, as fp32."""
        return self.field(component).mean()

    def total(self) -> np.ndarray:
        """[n, d'] fp32 sum of embedding, attention and MLP terms (the normalised image embeddings),
        streamed."""
        out = np.empty(self.embedding.shape, dtype=np.float32)
        for (start, embed), (_, attns), (_, mlps) in zip(
            self.embedding.chunks(), self.attns.chunks(), self.mlps.chunks()
        ):
            out[start : start + len(embed)] = (
                embed.astype(np.float64) + attns.sum(1, dtype=np.float64) + mlps.sum(1, dtype=np.float64)
            )
        if "pool_mlp" in self._fields:  # attention-pool towers: the pool MLP is a component too
            for start, pool in self.pool_mlp.chunks():
                out[start : start + len(pool)] += pool.astype(np.float32)
        return out

    def to_decomposition(self, rows=slice(None)) -> Decomposition:
        """The cached terms of ``rows`` (default: all images) as an in-memory fp32 :class:`Decomposition`.

        Everything that works on a decomposition (``mean_ablate``, TEXT SPAN, ``stack``) then works on
        the cache. ``heads`` are summed over patches; ``cls_to_cls`` is stored summed over heads, so it
        comes back with a heads axis of size 1 (its sum, all that the CLS ablation needs).
        """

        def load(name: str) -> torch.Tensor:
            return torch.from_numpy(np.asarray(self.field(name)[rows], dtype=np.float32))

        model = self.key["model"]
        grid = tuple(size // patch for size, patch in zip(model["image_size"], model["patch_size"]))
        return Decomposition(
            embedding=load("embedding"),
            attns=load("attns"),
            mlps=load("mlps"),
            heads=load("heads"),
            cls_to_cls=load("cls_to_cls")[:, :, None],
            norm=load("norm"),
            head_layers=self.head_layers,
            grid_size=grid,
            spatial=False,
            readout=model.get("readout", "cls"),
            pool_mlp=load("pool_mlp") if "pool_mlp" in self._fields else None,
        )

    @classmethod
    def open(
        cls, folder: str | Path, expected_key: dict | None = None, *, verify: bool = False
    ) -> "DecompositionCache":
        """Open a finished cache (cheap integrity checks); ``verify=True`` also re-hashes every file.

        With ``expected_key`` (see :func:`cache_key`) a cache built from other inputs is refused.
        """
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder} is a file, not a decomposition cache folder.")
        manifest = _read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(
                f"{folder} is not a decomposition cache (no manifest.json); create one with "
                "DecompositionCache.build(...) or `python -m clipdecomp decompose`."
            )
        if manifest["format"] != FORMAT:
            raise StaleCacheError(
                f"{folder} was written in cache format {manifest['format']!r}, without the checksums "
                f"this version (format {FORMAT}) checks: build it again with the same arguments to "
                "check its shards against the dataset and record their checksums, or delete the "
                "folder and build it again."
            )
        problems = _manifest_problems(manifest)
        if problems:
            raise CorruptCacheError(folder, problems)
        if expected_key is not None and manifest["key"] != expected_key:
            raise StaleCacheError(
                f"The cache in {folder} was built from different inputs: "
                + "; ".join(_key_differences(manifest["key"], expected_key))
                + ". Delete the folder to rebuild it, or build into another folder."
            )
        if manifest["status"] != "complete":
            done = sum((folder / name).is_dir() for name in manifest["shards"])
            raise IncompleteCacheError(
                f"The cache in {folder} is unfinished ({done} of {manifest['n_shards']} shards written; was "
                f"the run "
                "interrupted?). Build again with the same arguments to resume."
            )
        cache = cls(folder, manifest)
        return cache.verify() if verify else cache

    @classmethod
    def build(
        cls,
        bundle: ClipBundle,
        dataset: DecomposableDataset | ShardedDataset,
        out_dir: str | Path,
        *,
        batch_size: int = 32,
        layers: Sequence[int] | None = None,
        text_directions: torch.Tensor | np.ndarray | None = None,
        text_labels: Sequence[str] | None = None,
        patch_detail: PatchDetail | None = None,
        indices: Sequence[int] | None = None,
        shard_size: int | None = None,
        dtype: str = "float16",
        num_workers: int = 0,
        progress: bool = True,
    ) -> "DecompositionCache":
        """Decompose ``dataset`` (or its ``indices``) into ``out_dir``, resuming or repairing earlier builds.

        Args:
            bundle: the model (from :func:`clipdecomp.load`); runs on ``bundle.device``.
            dataset: a :class:`~clipdecomp.datasets.DecomposableDataset`, or a
                :class:`~clipdecomp.datasets.ShardedDataset` (tar shards, streamed; one cache shard each).
            out_dir: the cache folder (created; must be new, empty, or a cache of the same key).
            batch_size: images per forward pass (>= 1).
            layers: layers that keep per-head detail (negative counts from the end); default all.
            text_directions: [T, d'] directions (e.g. ``bundle.encode_text(...)``) to dot per-patch terms
                with; stored as ``patch_text``, reduced as ``patch_detail`` says.
            text_labels: optional names of the T directions, kept in the manifest.
            patch_detail: ``"layer"`` (default when ``text_directions`` is given), ``"head"`` or ``"sum"``;
                only meaningful with ``text_directions``.
            indices: the distinct dataset positions to decompose, in order (default: all; not for tar shards).
            shard_size: images per shard folder (>= 1; default 1024; not for tar shards).
            dtype: ``"float16"`` (default) or ``"float32"`` storage of the terms.
            num_workers: DataLoader worker processes for image decoding (>= 0).
            progress: show a tqdm progress bar (on rank 0: the whole job's).

        A finished cache of the same key is fully verified and returned without writing anything (so it
        may sit on read-only storage); damaged shards are recomputed, nothing else. Under an initialised
        ``torch.distributed`` process group, call it on every rank with the same arguments: the ranks
        build the cache together (module docstring); give each rank its own device
        (:func:`clipdecomp.distributed.local_device`).
        """
        with Ranks() as ranks:
            job = ranks.step(
                lambda: cls._plan(
                    bundle,
                    dataset,
                    out_dir,
                    batch_size,
                    layers,
                    text_directions,
                    text_labels,
                    patch_detail,
                    indices,
                    shard_size,
                    dtype,
                    num_workers,
                    progress,
                    ranks,
                )
            )
            for rank, key in enumerate(ranks.gather(job.key)):
                if key != job.key:  # every rank sees the same list, so all stop here together
                    raise ValueError(
                        f"Rank {rank} of this job would build a cache from other inputs than rank "
                        f"{ranks.rank}: " + "; ".join(_key_differences(key, job.key)) + ". Every rank "
                        "must build with the same model (the same seed for random-init specs), dataset "
                        "and arguments."
                    )
            for rank, folder in enumerate(ranks.gather(os.path.abspath(job.folder))):
                if folder != os.path.abspath(job.folder):
                    raise ValueError(
                        f"Rank {rank} of this job builds into {folder}, rank {ranks.rank} into "
                        f"{os.path.abspath(job.folder)}: the ranks of a job build one cache, so give every "
                        "rank the same folder (on a file system all hosts share)."
                    )
            job.run()
            return cls.open(job.folder, expected_key=job.key)

    @classmethod
    def _plan(
        cls,
        bundle: ClipBundle,
        dataset,
        out_dir,
        batch_size,
        layers,
        text_directions,
        text_labels,
        patch_detail,
        indices,
        shard_size,
        dtype,
        num_workers,
        progress,
        ranks: Ranks,
    ) -> "_Build":
        """Check the arguments of :meth:`build` and compute the content key."""
        if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
            raise TypeError(f"out_dir must be a folder path, got {out_dir!r}.")
        streamed = isinstance(dataset, ShardedDataset)
        if not streamed and not isinstance(dataset, DecomposableDataset):
            raise TypeError(
                f"dataset must be a DecomposableDataset (ids, labels, image(i), content_key()) or a "
                f"ShardedDataset such as TarShardDataset, got {type(dataset).__name__}."
            )
        tower = vision_tower(bundle)
        head_layers = _check_layers(layers, tower.n_layers)
        if streamed:
            for name, value in (("indices", indices), ("shard_size", shard_size)):
                if value is not None:
                    raise ValueError(
                        f"{name} does not apply to {type(dataset).__name__}: its cache keeps one shard "
                        "per tar file and every readable sample (choose the tar files instead)."
                    )
            selection = None
        else:
            selection = cls._check_indices(indices, len(dataset))
        batch_size = check_int("batch_size", batch_size, minimum=1)
        if not streamed:
            shard_size = check_int("shard_size", 1024 if shard_size is None else shard_size, minimum=1)
        num_workers = check_int("num_workers", num_workers, minimum=0)
        check_choice("dtype", dtype, ("float16", "float32"))
        if patch_detail is not None:
            check_choice("patch_detail", patch_detail, ("layer", "head", "sum"))
            if text_directions is None:
                raise ValueError(
                    "patch_detail only applies to per-patch maps: give text_directions too, or leave "
                    "patch_detail out."
                )
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}.")
        texts = cls._check_texts(text_directions, text_labels, tower.output_dim)
        key = cache_key(
            bundle,
            dataset,
            head_layers=head_layers,
            selection=selection,
            text_directions=texts,
            patch_detail=patch_detail or "layer",
            dtype=dtype,
            shard_size=shard_size,
        )
        job = _Build(
            Path(out_dir).expanduser(),
            key,
            bundle,
            dataset,
            selection,
            shard_size,
            head_layers,
            texts,
            patch_detail or "layer",
            np.dtype(dtype),
            text_labels,
            ranks,
        )
        job.batch_size, job.num_workers, job.progress = batch_size, num_workers, progress
        return job

    @staticmethod
    def _check_indices(indices, n: int) -> np.ndarray:
        if indices is None:
            return np.arange(n)
        if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
            raise TypeError(
                f"indices must be a list of dataset positions, got {type(indices).__name__} {indices!r:.40}."
            )
        selection = np.asarray(list(indices))
        if selection.ndim != 1 or len(selection) == 0:
            raise ValueError("indices must be a non-empty 1-D list of dataset positions.")
        if selection.dtype.kind not in "iu":
            raise TypeError(
                f"indices must be integers (not {selection.dtype}: floats or bools are not positions)."
            )
        if selection.min() < 0 or selection.max() >= n or len(np.unique(selection)) != len(selection):
            raise ValueError(f"indices must be distinct positions in 0..{n - 1}.")
        return selection.astype(np.int64)

    @staticmethod
    def _check_texts(directions, labels, dim: int) -> np.ndarray | None:
        if directions is None:
            if labels is not None:
                raise ValueError("text_labels given without text_directions.")
            return None
        texts = (
            directions.detach().float().cpu().numpy()
            if isinstance(directions, torch.Tensor)
            else np.asarray(directions, dtype=np.float32)
        )
        if texts.ndim != 2 or texts.shape[1] != dim or len(texts) == 0:
            raise ValueError(
                f"text_directions must be [T, {dim}] (e.g. bundle.encode_text(texts)), got "
                f"{list(texts.shape)}."
            )
        if not np.isfinite(texts).all():
            raise ValueError("text_directions contain NaN or Inf values.")
        if labels is not None and len(check_texts_list("text_labels", labels)) != len(texts):
            raise ValueError(f"text_labels has {len(labels)} names for {len(texts)} text directions.")
        return texts.astype(np.float32)


def _classify(folder: Path) -> tuple[str, dict | None]:
    """What ``folder`` holds: ("new" | "empty" | "cache" | "damaged", manifest or None).

    Refuses (FileExistsError) a non-empty folder that is not a cache, hidden entries included, and a
    path that is a file. "damaged": an unreadable manifest beside only the builder's own entries.
    """
    if not folder.exists():
        return "new", None
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{folder} is a file, not a folder: give a new or empty folder for the cache."
        )
    entries = sorted(os.listdir(folder))
    if not entries:
        return "empty", None
    try:
        manifest = _read_manifest(folder)
    except CorruptCacheError as error:
        if all(_is_own(name) for name in entries) and any(_SHARD.fullmatch(name) for name in entries):
            return "damaged", None
        raise FileExistsError(
            f"{folder} holds {entries[:5]} and its manifest.json cannot be read as a decomposition "
            f"cache ({error.problems[0]}): it is not a cache this builder wrote, so nothing was "
            "touched. Build into a new or empty folder."
        ) from None
    if manifest is None:
        raise FileExistsError(
            f"{folder} is not empty and is not a decomposition cache (it holds {entries[:5]}"
            f"{' ...' if len(entries) > 5 else ''}; hidden entries count): build into a new or empty "
            "folder. Nothing was written."
        )
    return "cache", manifest


class _Build:
    """One build of a cache folder by the ranks of a job (a job of one outside torch.distributed).

    Steps, each agreed between the ranks (:class:`~clipdecomp.distributed.Ranks`): rank 0 checks the
    folder, takes its lock and reads what an earlier build left (:meth:`_begin`); every rank fully
    verifies its share of the shards already there (:meth:`_check_shards`); rank 0 decides what to
    recompute and clears leftovers (:meth:`_prepare`); every rank writes its share of the missing shards
    (:meth:`_compute`); rank 0 merges the journals and marks the cache complete (:meth:`_finish`). A
    fresh build that fails before its first shard is undone (:meth:`_abandon`).
    """

    batch_size: int = 32
    num_workers: int = 0
    progress: bool = True

    def __init__(
        self,
        folder: Path,
        key: dict,
        bundle: ClipBundle,
        dataset: DecomposableDataset | ShardedDataset,
        selection: np.ndarray | None,
        shard_size: int | None,
        head_layers: tuple[int, ...],
        texts: np.ndarray | None,
        patch_detail: str,
        dtype: np.dtype,
        text_labels: Sequence[str] | None,
        ranks: Ranks,
    ):
        self.folder, self.key, self.bundle, self.dataset, self.selection = (
            folder,
            key,
            bundle,
            dataset,
            selection,
        )
        self.shard_size, self.head_layers, self.texts_array = shard_size, head_layers, texts
        self.patch_detail, self.dtype, self.text_labels, self.ranks = patch_detail, dtype, text_labels, ranks
        self.texts = None if texts is None else torch.from_numpy(texts).to(bundle.device)
        self.streamed = selection is None  # a sharded (tar) dataset: one cache shard per dataset shard
        self.n_shards = len(dataset.shard_names) if self.streamed else -(-len(selection) // shard_size)
        self.label_names = list(dataset.label_names) if self.streamed else sorted(dataset.labels)
        self.caption_names = list(dataset.caption_names) if self.streamed else []
        self.image_size = tuple(vision_tower(bundle).image_size)
        self.key_sha256 = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.manifest: dict = {}  # rank 0: manifest.json as last written
        self.journal = {
            "key_sha256": self.key_sha256,
            "rank": ranks.rank,
            "shards": {},
        }  # other ranks' records
        self.fresh = False  # rank 0: the folder held no cache (a failure before the first shard is undone)
        self.locked = False  # rank 0 holds the folder's lock
        self.lock: int | None = None  # its descriptor, closed in DataLoader workers
        self.created: list[Path] = []  # folders this build created (removed again if it wrote no shard)
        self.written: list[
            Path
        ] = []  # files a fresh build created before its first shard (removed on failure)
        self.leftovers: list[
            Path
        ] = []  # a format-1 cache's lock file and temporaries, removed when it is upgraded
        self.unrecorded: dict[str, str] = {}  # why a format-1 shard was not taken over

    # --- the steps ---------------------------------------------------------------------------------------

    def run(self) -> None:
        ranks = self.ranks
        with ExitStack() as held:  # on rank 0: the folder's lock, released when the job is over
            try:
                begun = ranks.lead(lambda: self._begin(held))
                self.unrecorded = begun["unrecorded"]
                found = ranks.gather(ranks.step(lambda: self._check_shards(begun)))
                todo = ranks.lead(lambda: self._prepare(found))
                if todo is None:
                    return  # a whole cache: nothing is written (read-only storage is fine)
                progress = _JobProgress(self, todo)
                with progress:
                    ranks.step(
                        lambda: self._compute(todo[ranks.rank :: ranks.size], progress),
                        meanwhile=progress.refresh,
                    )
                ranks.lead(self._finish)
            except BaseException as error:
                if ranks.leads and self.locked and not isinstance(error, CacheLockedError):
                    self._abandon()
                raise

    def _begin(self, held: ExitStack) -> dict:
        """Rank 0: refuse a foreign folder, create it, lock it, and read the manifest and journals left
        there."""
        _classify(self.folder)  # refuse a foreign folder before creating or locking anything
        self.created = self.create_folder()
        try:
            self.lock = held.enter_context(
                _exclusive(self.folder)
            )  # its descriptor (None where flock is missing)
        except CacheLockedError:
            raise  # the folder belongs to the run holding the lock
        except BaseException:
            self._remove_created()
            raise
        self.locked = True
        self.manifest, self.fresh = self._existing()
        self._merge_journals()
        there = [shard for shard in range(self.n_shards) if (self.folder / _shard_name(shard)).is_dir()]
        return {"records": self.manifest["shards"], "unrecorded": self.unrecorded, "there": there}

    def _check_shards(self, begun: dict) -> dict[str, list[str]]:
        """Every rank: fully verify its share of the shard folders already there; their problems by name."""
        mine = begun["there"][self.ranks.rank :: self.ranks.size]
        return {_shard_name(s): self._reusable(s, begun["records"].get(_shard_name(s))) for s in mine}

    def _prepare(self, found: list[dict[str, list[str]]]) -> list[int] | None:
        """Rank 0: the shards to compute (None when the cache is whole); clears leftovers and damaged
        shards."""
        manifest, records = self.manifest, self.manifest["shards"]
        checked = {name: problems for part in found for name, problems in part.items()}
        todo, damaged = [], {}
        for shard in range(self.n_shards):
            name = _shard_name(shard)
            if name not in checked:  # no shard folder
                if records.pop(name, None) is not None and manifest["status"] == "complete":
                    damaged[name] = [f"{name} is missing"]
                todo.append(shard)
            elif checked[name]:
                damaged[name] = checked[name]
                records.pop(name, None)
                todo.append(shard)
        leftovers = [
            p for p in self.folder.iterdir() if _TEMP.fullmatch(p.name) or _JOURNAL.fullmatch(p.name)
        ]
        leftovers += self.leftovers
        if not todo and not leftovers and manifest["status"] == "complete" and self._texts_in_place():
            return None
        if damaged:
            _warn(
                f"{self.folder}: recomputing {len(damaged)} damaged shard(s): "
                + "; ".join(p for problems in damaged.values() for p in problems)
            )
        ranks = f", leading {self.ranks.size} ranks" if self.ranks.size > 1 else ""
        manifest.update(
            status="building",
            writer=f"pid {os.getpid()} on {os.uname().nodename}{ranks}, since "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}",
        )
        with _writing(self.folder, "manifest.json"):
            if self.fresh:
                self.written.append(self.folder / "manifest.json")
            _write_json(self.folder / "manifest.json", manifest)  # holds the journals' records: they can go
            for (
                leftover
            ) in leftovers:  # half-written files of a killed run, merged journals (names only we use)
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            for name in damaged:
                if (self.folder / name).is_dir():
                    _remove_shard(self.folder / name)
            if not self._texts_in_place():
                target = self.folder / "text_directions.npy"
                if self.fresh:
                    self.written.append(target)
                _save_array(_temp_path(target), self.texts_array)
                os.replace(_temp_path(target), target)
        return todo

    def _compute(self, mine: list[int], progress: "_JobProgress") -> None:
        """Every rank: decompose and write its shards."""
        if not (self.folder / "manifest.json").is_file():  # rank 0 wrote it before any rank starts
            raise FileNotFoundError(
                f"Rank {self.ranks.rank} does not see the cache folder rank 0 prepared ({self.folder} has no "
                "manifest.json): on several hosts the folder must be on a file system they all share."
            )
        release = _ReleaseLockInWorker(self.lock) if self.num_workers > 0 and self.lock is not None else None
        if self.streamed:
            self._compute_stream(mine, progress, release)
            return
        plan = [
            (s, self.rows(s)[i : i + self.batch_size])
            for s in mine
            for i in range(0, len(self.rows(s)), self.batch_size)
        ]
        loader = torch.utils.data.DataLoader(
            _Images(self.dataset, self.image_size),
            batch_sampler=[b.tolist() for _, b in plan],
            num_workers=self.num_workers,
            worker_init_fn=release,
        )
        pending: dict[str, list[np.ndarray]] = {}
        for (shard, batch), batch_images in zip(plan, loader):
            for name, values in self._terms(batch_images).items():
                pending.setdefault(name, []).append(values)
            progress.add(len(batch))
            if sum(len(v) for v in pending["norm"]) == len(self.rows(shard)):
                rows, ids = self.rows(shard), self._expected_ids(shard)
                files = {
                    **{f"{name}.npy": np.concatenate(v) for name, v in pending.items()},
                    "indices.npy": rows,
                    "ids.npy": ids,
                    **{
                        f"label_{label}.npy": np.asarray(values)[rows].astype(np.int64)
                        for label, values in self.dataset.labels.items()
                    },
                }
                self._write(shard, files, ids, [], left=len(mine) - mine.index(shard) - 1)
                pending = {}

    def _compute_stream(self, mine: list[int], progress: "_JobProgress", release) -> None:
        source = _ShardBatches(self.dataset, mine, self.batch_size, self.image_size)
        loader = torch.utils.data.DataLoader(
            source, batch_size=None, num_workers=min(self.num_workers, len(mine)), worker_init_fn=release
        )
        pending: dict[int, dict] = {}
        for piece in loader:  # whole shards per worker; pieces of different shards may interleave
            part = pending.setdefault(
                piece["shard"],
                {
                    "terms": [],
                    "ids": [],
                    "indices": [],
                    **{f"label_{n}": [] for n in self.label_names},
                    **{f"caption_{n}": [] for n in self.caption_names},
                },
            )
            if len(piece["images"]):
                part["terms"].append(self._terms(piece["images"]))
            part["ids"] += piece["ids"]
            part["indices"] += piece["indices"]
            for name in self.label_names:
                part[f"label_{name}"] += piece["labels"][name]
            for name in self.caption_names:
                part[f"caption_{name}"] += piece["captions"][name]
            progress.add(len(piece["images"]))
            if piece["last"]:
                del pending[piece["shard"]]
                terms = part.pop("terms") or [
                    {
                        name: values[:0]
                        for name, values in self._terms(torch.zeros((1, 3, *self.image_size))).items()
                    }
                ]  # no readable sample: empty fields
                ids = np.array(part.pop("ids"), dtype=str)
                files = {
                    **{f"{name}.npy": np.concatenate([t[name] for t in terms]) for name in terms[0]},
                    "ids.npy": ids,
                    "indices.npy": np.array(part.pop("indices"), dtype=np.int64),
                    **{
                        f"{name}.npy": np.array(values, dtype=np.int64 if name.startswith("label_") else str)
                        for name, values in part.items()
                    },
                }
                self._write(
                    piece["shard"],
                    files,
                    ids,
                    piece["skipped"],
                    left=len(mine) - mine.index(piece["shard"]) - 1,
                )

    def _finish(self) -> None:
        """Rank 0: merge the other ranks' journals and mark the cache complete."""
        self._merge_journals()
        records = self.manifest["shards"]
        missing = [_shard_name(s) for s in range(self.n_shards) if _shard_name(s) not in records]
        if missing:
            raise IncompleteCacheError(
                f"{self.folder}: {missing[:3]} were written by no rank of this job; run the "
                "same build again to compute them."
            )
        n_images = sum(records[_shard_name(s)]["rows"] for s in range(self.n_shards))
        skipped = [
            entry for s in range(self.n_shards) for entry in records[_shard_name(s)].get("skipped", [])
        ]
        if n_images == 0:
            examples = "; ".join(f"{sample_id}: {reason}" for sample_id, reason in skipped[:3])
            raise ValueError(
                f"None of the samples of the {self.n_shards} shard(s) could be read ({examples}): check "
                "that they are webdataset tar files whose samples hold an image and the label and "
                "caption keys asked for."
            )
        first = records[_shard_name(0)]["files"]
        self.manifest["n_images"] = n_images
        self.manifest["fields"] = {
            file[:-4]: {"shape": [n_images, *entry["shape"][1:]], "dtype": entry["dtype"]}
            for file, entry in first.items()
            if file[:-4] in FIELDS
        }
        self.manifest.update(
            status="complete", finished=datetime.datetime.now().isoformat(timespec="seconds")
        )
        self.manifest.pop("writer", None)
        with _writing(self.folder, "manifest.json"):
            _write_json(self.folder / "manifest.json", self.manifest)
            for journal in [p for p in self.folder.iterdir() if _JOURNAL.fullmatch(p.name)]:
                journal.unlink()
        if skipped:
            names = "; ".join(f"{sample_id} ({reason})" for sample_id, reason in skipped[:5])
            _warn(
                f"{self.folder}: {len(skipped)} corrupt sample(s) were skipped: {names}"
                f"{' ...' if len(skipped) > 5 else ''}. cache.skipped lists them all; build from a dataset "
                f"with "
                "strict=True to make this an error."
            )

    def _abandon(self) -> None:
        """Rank 0, after a failure: a fresh build that wrote no shard leaves the folder as it found it."""
        try:
            if self.fresh and not any(_SHARD.fullmatch(p.name) for p in self.folder.iterdir()):
                self._undo()
                self._remove_created()
        except OSError:
            pass  # the folder went away or cannot be listed: nothing of ours to undo there

    # --- helpers -------------------------------------------------------------------------------------------

    def create_folder(self) -> list[Path]:
        """Create the cache folder and missing parents; return those created (deepest last)."""
        created, path = [], self.folder
        while not path.exists():
            created.append(path)
            path = path.parent
        if not created:
            return []
        with _writing(path, f"the cache folder {self.folder}"):
            self.folder.mkdir(parents=True, exist_ok=True)
        return created[::-1]

    def _remove_created(self) -> None:
        for path in reversed(self.created):  # a build that wrote no shard leaves no folder behind
            try:
                path.rmdir()
            except OSError:
                break

    def rows(self, shard: int) -> np.ndarray:
        return self.selection[shard * self.shard_size : (shard + 1) * self.shard_size]

    def _expected_ids(self, shard: int) -> np.ndarray:
        return np.array([self.dataset.ids[i] for i in self.rows(shard)])

    def _new_manifest(self) -> dict:
        return {
            "format": FORMAT,
            "status": "building",
            "key": self.key,
            "n_images": None if self.streamed else len(self.selection),
            "shard_size": self.shard_size,
            "n_shards": self.n_shards,
            "label_names": self.label_names,
            **({"caption_names": self.caption_names} if self.caption_names else {}),
            "text_labels": list(self.text_labels) if self.text_labels else None,
            "shards": {},
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    def _existing(self) -> tuple[dict, bool]:
        """The manifest to continue from and whether this build is fresh (undone if it fails before a
        shard)."""
        state, manifest = _classify(self.folder)
        if state in ("new", "empty"):
            return self._new_manifest(), True
        if state == "damaged":
            _warn(
                f"{self.folder}/manifest.json is unreadable; rebuilding the cache (every shard is "
                f"recomputed, "
                "since none can be checked without it)."
            )
            return self._new_manifest(), False
        if manifest["format"] == 1 and {**manifest["key"], "format": FORMAT} == self.key:
            return self._upgraded(), False
        if manifest["format"] != FORMAT:
            raise StaleCacheError(
                f"{self.folder} was written in cache format {manifest['format']!r} from other inputs "
                f"or by another version, without the checksums this version records (format "
                f"{FORMAT}): delete the folder and build again."
            )
        shards_there = any(_SHARD.fullmatch(p.name) for p in self.folder.iterdir())
        if manifest["key"] != self.key:
            if manifest.get("status") == "building" and not shards_there:  # nothing finished to protect
                return self._new_manifest(), False
            raise StaleCacheError(
                f"{self.folder} holds a cache built from different inputs: "
                + "; ".join(_key_differences(manifest["key"], self.key))
                + ". Delete the folder to rebuild it, or build into another folder."
            )
        problems = _manifest_problems(manifest)
        if problems:
            _warn(f"{self.folder}: {'; '.join(problems)}; recomputing every shard.")
            return self._new_manifest(), False
        return manifest, False

    def _merge_journals(self) -> None:
        """Rank 0: take the records of this cache's journals (ranks of this or a killed job) into the
        manifest."""
        for path in sorted(p for p in self.folder.iterdir() if _JOURNAL.fullmatch(p.name)):
            try:
                journal = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue  # its shards count as unrecorded and are recomputed
            if not isinstance(journal, dict) or journal.get("key_sha256") != self.key_sha256:
                continue  # another build's: removed with the leftovers
            for name, record in (journal.get("shards") or {}).items():
                if isinstance(name, str) and _SHARD.fullmatch(name) and (self.folder / name).is_dir():
                    self.manifest["shards"][name] = record

    def _upgraded(self) -> dict:
        """A format-2 manifest for a format-1 cache of this build: its shards are checked against the dataset
        (ids, indices, labels, shapes) and their checksums recorded; shards that fail are recomputed."""
        _warn(
            f"{self.folder} was written in cache format 1, without checksums: checking its shards against "
            f"the "
            "dataset and recording their checksums."
        )
        manifest = self._new_manifest()
        self.leftovers = [p for p in self.folder.iterdir() if _FORMAT_1_LEFTOVER.fullmatch(p.name)]
        for shard in range(self.n_shards):
            path = self.folder / _shard_name(shard)
            if path.is_dir() and self._format_1_shard_holds_its_rows(shard, path):
                manifest["shards"][path.name] = _record(path, self._expected_ids(shard))
            elif path.is_dir():
                self.unrecorded[path.name] = (
                    f"{path.name} (format 1) does not hold the images this build puts there"
                )
        return manifest

    def _format_1_shard_holds_its_rows(self, shard: int, path: Path) -> bool:
        rows = self.rows(shard)
        fields = {"embedding", "attns", "mlps", "heads", "cls_to_cls", "norm"}
        fields |= {"patch_text"} if self.texts is not None else set()
        try:
            if {p.name for p in path.iterdir()} != (
                {f"{field}.npy" for field in fields}
                | {"ids.npy", "indices.npy"}
                | {f"label_{label}.npy" for label in self.dataset.labels}
            ):
                return False
            same = (
                np.array_equal(np.load(path / "indices.npy"), rows)
                and np.array_equal(np.load(path / "ids.npy"), self._expected_ids(shard))
                and all(
                    np.array_equal(np.load(path / f"label_{label}.npy"), np.asarray(values)[rows])
                    for label, values in self.dataset.labels.items()
                )
            )
            return same and all(
                len(np.load(path / f"{field}.npy", mmap_mode="r")) == len(rows) for field in fields
            )
        except (OSError, ValueError, EOFError):
            return False

    def _reusable(self, shard: int, record: dict | None) -> list[str]:
        """Problems of an existing shard folder (full checksum, and ids against this build's dataset)."""
        name = _shard_name(shard)
        if record is None:
            return [self.unrecorded.get(name, f"{name} is not recorded in manifest.json")]
        arrays, problems = _check_shard(self.folder, name, record, full=True)
        if (
            not problems
            and not self.streamed
            and not (
                np.array_equal(arrays["indices.npy"], self.rows(shard))
                and np.array_equal(arrays["ids.npy"], self._expected_ids(shard))
            )
        ):
            problems = [f"{name} does not hold the images this build puts there"]
        return problems  # a tar shard's contents are pinned by the key (its size and mtime) and the checksums

    def _texts_in_place(self) -> bool:
        if self.texts_array is None:
            return True
        try:
            return _array_sha256(np.load(self.folder / "text_directions.npy")) == _array_sha256(
                self.texts_array
            )
        except (OSError, ValueError, EOFError):
            return False

    def _undo(self) -> None:
        """Remove what this fresh build wrote, so the folder is as it was found."""
        own = [p for p in self.folder.iterdir() if _TEMP.fullmatch(p.name) or _JOURNAL.fullmatch(p.name)]
        for path in own + self.written:
            try:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            except OSError:
                pass

    @torch.no_grad()
    def _terms(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        spatial = self.texts is not None
        parts = decompose(
            self.bundle, images.to(self.bundle.device), spatial=spatial, layers=self.head_layers
        )
        terms = {
            "embedding": parts.embedding,
            "attns": parts.attns,
            "mlps": parts.mlps,
            "heads": parts.head_terms(),
            "cls_to_cls": parts.cls_to_cls.sum(2),
        }
        if parts.pool_mlp is not None:
            terms["pool_mlp"] = parts.pool_mlp
        if spatial:
            pattern = {"layer": "blnhd,td->blnt", "head": "blnhd,td->blnht", "sum": "blnhd,td->bnt"}[
                self.patch_detail
            ]
            terms["patch_text"] = torch.einsum(pattern, parts.heads, self.texts)
        out = {name: value.cpu().numpy().astype(self.dtype) for name, value in terms.items()}
        for name, value in out.items():
            if not np.isfinite(value).all():
                raise OverflowError(
                    f"{name} terms overflow {self.dtype} storage; build with dtype='float32'."
                )
        out["norm"] = parts.norm.cpu().numpy().astype(np.float32)
        return out

    def _write(
        self, shard: int, files: dict[str, np.ndarray], ids: np.ndarray, skipped: list, left: int
    ) -> None:
        """Write a shard into a temporary folder, record it (rank 0: in the manifest; others: their journal),
        then rename it into place."""
        name = _shard_name(shard)
        needed = _on_disk(
            self.folder, [values.nbytes + 128 for values in files.values()]
        )  # + the .npy header
        rest = (
            f" (and about {_size(needed * left)} for the {left} shard{'s' * (left > 1)} after it)"
            if left
            else ""
        )
        tmp = _temp_path(self.folder / name)
        records = self.manifest["shards"] if self.ranks.leads else self.journal["shards"]
        try:
            with _writing(self.folder, name, needed, rest):
                tmp.mkdir()
                for file, values in files.items():
                    _save_array(tmp / file, values)
                records[name] = _record(tmp, ids)
                if skipped:
                    records[name]["skipped"] = [list(entry) for entry in skipped]
                if self.ranks.leads:  # recorded before it appears: never unrecorded
                    _write_json(self.folder / "manifest.json", self.manifest)
                else:
                    _write_json(self.folder / f"journal_rank{self.ranks.rank:05d}.json", self.journal)
                os.replace(tmp, self.folder / name)
        except BaseException:
            records.pop(name, None)
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class _JobProgress:
    """Rank 0's progress bar for the whole job: its own images batch by batch, the other ranks' shards as
    their journals record them (re-read at most every second). Other ranks show no bar."""

    def __init__(self, job: _Build, todo: list[int]):
        self.folder, self.own, self.others, self.read_at = job.folder, 0, 0, 0.0
        shown = job.progress and job.ranks.leads
        if job.streamed:  # images per tar are known only once read: count images, name the shards
            done = sorted(set(range(job.n_shards)) - set(todo)) if shown else []  # only rank 0 has records
            total, self.start = None, sum(job.manifest["shards"][_shard_name(s)]["rows"] for s in done)
            what = f"decomposing {len(todo)} of {job.n_shards} shards"
        else:
            total = len(job.selection)
            self.start = total - sum(len(job.rows(s)) for s in todo)
            what = "decomposing"
        ranks = f" on {job.ranks.size} ranks" if job.ranks.size > 1 else ""
        self.bar = progress_bar(show=shown, total=total, initial=self.start, unit="img", desc=what + ranks)

    def __enter__(self) -> "_JobProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def add(self, images: int) -> None:
        self.own += images
        self.refresh()

    def refresh(self) -> None:
        if self.bar.disable:
            return
        if time.monotonic() - self.read_at > 1.0:
            self.read_at, self.others = time.monotonic(), 0
            for path in self.folder.glob("journal_rank*.json"):
                try:
                    self.others += sum(
                        r["rows"] for r in json.loads(path.read_text(encoding="utf-8"))["shards"].values()
                    )
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    pass  # being replaced right now: read next time
        self.bar.n = self.start + self.own + self.others
        self.bar.refresh()
