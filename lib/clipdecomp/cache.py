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
``patch_text``  see ``patch_detail`` per-patch terms of ``head_layers`` dotted with T text
                                     directions (only when ``text_directions`` is given)
==============  ===================  ========================================================

``patch_detail`` picks how far ``patch_text`` is summed: ``"layer"`` (default) sums over heads ->
[n, L', N, T] (per-layer heat maps); ``"head"`` keeps [n, L', N, H, T] (joint head x patch maps, for
few texts); ``"sum"`` sums over layers and heads -> [n, N, T] (the paper's segmentation maps). Token 0
is the CLS key; maps over the patch grid use ``[..., 1:, :]``.

Storage: terms in fp16 (or ``dtype="float32"``); reductions such as :meth:`~DecompositionCache.mean`
accumulate in float64 and return fp32. One folder per ``shard_size`` images, each a set of ``.npy``
files opened with ``mmap_mode="r"``; :class:`ShardedArray` presents a field's shards as one array.
Labels, dataset indices and per-image ids are saved in every shard beside the terms, never
reconstructed from file order.

Safety: a shard is written to a temporary folder and renamed into place, so a killed run leaves only
whole shards; building again with the same arguments keeps them (after checking their ids) and
computes the rest. A lock file (``fcntl.flock``, released by the OS even when a run is killed) makes a
second concurrent build of the same folder fail at once with :class:`CacheLockedError`. The manifest
stores a content key (model, weights, open_clip version, preprocessing, dataset, selection,
reductions); building or opening with a different key raises :class:`StaleCacheError` naming what
differs, so a stale cache is never read.

Example:
    >>> data = ToyDataset(512, seed=1, preprocess=bundle.preprocess)
    >>> cache = DecompositionCache.build(bundle, data, "caches/toy", layers=range(-4, 0))
    >>> cache.heads.shape, cache.labels["shape"][:3]       # ((512, 4, H, d'), array([...]))
    >>> mean_heads = cache.mean("heads")                    # fp32 [4, H, d'], for mean-ablation
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import open_clip
import torch
from tqdm.auto import tqdm

from .datasets import DecomposableDataset
from .decomposition import Decomposition, _check_layers, decompose
from .loading import ClipBundle
from .towers import vision_tower

try:
    import fcntl
except ImportError:  # Windows: no flock; builds still work but are not guarded against concurrent writers
    fcntl = None

__all__ = ["DecompositionCache", "ShardedArray", "StaleCacheError", "CacheLockedError", "IncompleteCacheError",
           "cache_key"]

FORMAT = 1
FIELDS = ("embedding", "attns", "mlps", "heads", "cls_to_cls", "norm", "patch_text")
PatchDetail = Literal["layer", "head", "sum"]


class StaleCacheError(ValueError):
    """The cache on disk was built from a different model, dataset or reductions than requested."""


class CacheLockedError(RuntimeError):
    """Another run is writing this cache folder right now."""


class IncompleteCacheError(RuntimeError):
    """The cache folder holds an unfinished build (e.g. a killed run): build again to resume."""


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
        if isinstance(rows, (int, np.integer)):
            index = int(rows) + (len(self) if rows < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"row {rows} out of range for {len(self)} images.")
            shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
            return np.asarray(self.parts[shard][(index - self.offsets[shard],) + tuple(rest)])
        index = np.arange(len(self))[rows]
        if index.ndim != 1:
            raise IndexError("index the first (image) axis with an int, a slice, a boolean mask or a 1-D list of ints.")
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        blocks = {}
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            blocks[int(shard)] = (where, np.asarray(self.parts[shard][(index[where] - self.offsets[shard],) + tuple(rest)]))
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
        for offset, part in zip(self.offsets, self.parts):
            for start in range(0, len(part), rows):
                yield int(offset) + start, np.asarray(part[start:start + rows])

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


def cache_key(bundle: ClipBundle, dataset: DecomposableDataset, *, head_layers: Sequence[int],
              selection: np.ndarray, text_directions: np.ndarray | None, patch_detail: str, dtype: str,
              shard_size: int) -> dict:
    """Everything a cache's contents depend on, as nested JSON-able dicts (compared key by key)."""
    visual = vision_tower(bundle)
    return {
        "format": FORMAT,
        "model": {"spec": bundle.spec, "weights": _model_fingerprint(bundle), "open_clip": open_clip.__version__,
                  **visual.describe()},  # layers, width, image_size, patch_size
        "dataset": dataset.content_key(),  # includes the dataset's preprocessing
        "selection": {"n_images": int(len(selection)), "sha256": _array_sha256(selection.astype(np.int64))},
        "reductions": {"head_layers": list(head_layers), "dtype": dtype, "shard_size": shard_size,
                       "patch_detail": patch_detail if text_directions is not None else None,
                       "text_directions": None if text_directions is None else {
                           "shape": list(text_directions.shape), "sha256": _array_sha256(text_directions)}},
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
    return [f"{name}: cache has {short(old.get(name))}, requested {short(new.get(name))}"
            for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]


def _write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically: to a temporary file, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` for this process; raise CacheLockedError if another process holds it."""
    if fcntl is None:
        warnings.warn("File locking is unavailable on this platform: do not build the same cache twice at once.")
        yield
        return
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            raise CacheLockedError(
                f"{folder} is being written by another run ({holder}). Wait for it to finish and build again "
                "(finished shards are reused), or write to another folder.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}, since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Images(torch.utils.data.Dataset):
    """The images of a dataset, checked one by one so that a bad one is named (labels come from the dataset)."""

    def __init__(self, dataset: DecomposableDataset, size: tuple[int, int]):
        self.dataset, self.shape = dataset, (3, *size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.dataset.image(index)
        name = f"Image {self.dataset.ids[index]} (index {index})"
        if not isinstance(image, torch.Tensor) or tuple(image.shape) != self.shape or not image.is_floating_point():
            described = (f"shape {list(image.shape)}, dtype {image.dtype}" if isinstance(image, torch.Tensor)
                         else f"type {type(image).__name__}")
            raise ValueError(f"{name} has {described} after preprocessing; the model expects a float tensor "
                             f"{list(self.shape)}: give the dataset the model's preprocess (bundle.preprocess).")
        if not torch.isfinite(image).all():
            raise ValueError(f"{name} contains NaN or Inf values after preprocessing; check the file and the preprocess.")
        return image


class DecompositionCache:
    """A finished cache folder; create with :meth:`build`, reopen with :meth:`open`.

    Fields (see the module docstring) are :class:`ShardedArray` views of memory-mapped shards:
    ``embedding``, ``attns``, ``mlps``, ``heads``, ``cls_to_cls``, ``norm``, ``patch_text``. Per-image
    metadata is loaded into memory: ``labels`` (name -> int array), ``ids`` (strings), ``indices``
    (positions in the dataset).
    """

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        shards = [folder / f"shard_{s:05d}" for s in range(manifest["n_shards"])]
        self._fields = {name: ShardedArray([np.load(s / f"{name}.npy", mmap_mode="r") for s in shards])
                        for name in manifest["fields"]}
        self.ids = np.concatenate([np.load(s / "ids.npy") for s in shards]).tolist()
        self.indices = np.concatenate([np.load(s / "indices.npy") for s in shards])
        self.labels = {name: np.concatenate([np.load(s / f"label_{name}.npy") for s in shards])
                       for name in manifest["label_names"]}

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

    def __len__(self) -> int:
        return self.manifest["n_images"]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}{list(array.shape)}" for name, array in self._fields.items())
        return f"DecompositionCache({self.folder}, {len(self)} images: {shapes})"

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
    cls_to_cls = property(lambda self: self.field("cls_to_cls"), doc="[n, L, d'] CLS->CLS terms, summed over heads.")
    norm = property(lambda self: self.field("norm"), doc="[n] norm of the embedding before normalisation.")
    patch_text = property(lambda self: self.field("patch_text"), doc="per-patch terms dotted with text directions.")

    def mean(self, component: str) -> np.ndarray:
        """Mean over images of a field (e.g. ``"heads"`` -> [L', H, d']), accumulated in float64, as fp32."""
        return self.field(component).mean()

    def total(self) -> np.ndarray:
        """[n, d'] fp32 sum of embedding, attention and MLP terms (the normalised image embeddings), streamed."""
        out = np.empty(self.embedding.shape, dtype=np.float32)
        for (start, embed), (_, attns), (_, mlps) in zip(self.embedding.chunks(), self.attns.chunks(), self.mlps.chunks()):
            out[start:start + len(embed)] = (embed.astype(np.float64) + attns.sum(1, dtype=np.float64)
                                             + mlps.sum(1, dtype=np.float64))
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
        return Decomposition(embedding=load("embedding"), attns=load("attns"), mlps=load("mlps"), heads=load("heads"),
                             cls_to_cls=load("cls_to_cls")[:, :, None], norm=load("norm"),
                             head_layers=self.head_layers, grid_size=grid, spatial=False)

    @classmethod
    def open(cls, folder: str | Path, expected_key: dict | None = None) -> "DecompositionCache":
        """Open a finished cache; with ``expected_key`` (see :func:`cache_key`) refuse a stale one."""
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a decomposition cache (no manifest.json); create one with "
                                    "DecompositionCache.build(...) or `python -m clipdecomp decompose`.")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise StaleCacheError(f"{folder} was written in cache format {manifest.get('format')}, this version reads "
                                  f"format {FORMAT}: delete the folder and build it again.")
        if expected_key is not None and manifest["key"] != expected_key:
            raise StaleCacheError(f"The cache in {folder} was built from different inputs: "
                                  + "; ".join(_key_differences(manifest["key"], expected_key))
                                  + ". Delete the folder to rebuild it, or build into another folder.")
        missing = [s for s in range(manifest["n_shards"]) if not (folder / f"shard_{s:05d}").is_dir()]
        if manifest["status"] != "complete" or missing:
            raise IncompleteCacheError(
                f"The cache in {folder} is unfinished ({manifest['n_shards'] - len(missing)} of {manifest['n_shards']} "
                "shards written; was the run interrupted?). Build again with the same arguments to resume.")
        return cls(folder, manifest)

    @classmethod
    def build(cls, bundle: ClipBundle, dataset: DecomposableDataset, out_dir: str | Path, *, batch_size: int = 32,
              layers: Sequence[int] | None = None, text_directions: torch.Tensor | np.ndarray | None = None,
              text_labels: Sequence[str] | None = None, patch_detail: PatchDetail = "layer",
              indices: Sequence[int] | None = None, shard_size: int = 1024, dtype: str = "float16",
              num_workers: int = 0, progress: bool = True) -> "DecompositionCache":
        """Decompose ``dataset`` (or its ``indices``) into ``out_dir``, resuming a previous partial build.

        Args:
            bundle: the model (from :func:`clipdecomp.load`); runs on ``bundle.device``.
            dataset: a :class:`~clipdecomp.datasets.DecomposableDataset`.
            out_dir: the cache folder (created; must be new, empty, or a cache of the same key).
            batch_size: images per forward pass.
            layers: layers that keep per-head detail (negative counts from the end); default all.
            text_directions: [T, d'] directions (e.g. ``bundle.encode_text(...)``) to dot per-patch terms
                with; stored as ``patch_text``, reduced as ``patch_detail`` says.
            text_labels: optional names of the T directions, kept in the manifest.
            indices: the dataset positions to decompose, in order (default: all).
            shard_size: images per shard folder.
            dtype: ``"float16"`` (default) or ``"float32"`` storage of the terms.
            num_workers: DataLoader worker processes for image decoding.
            progress: show a tqdm progress bar.
        """
        folder = Path(out_dir)
        visual = vision_tower(bundle)
        n_layers = visual.n_layers
        head_layers = _check_layers(layers, n_layers)
        selection = np.arange(len(dataset)) if indices is None else np.asarray(list(indices), dtype=np.int64)
        if selection.ndim != 1 or len(selection) == 0:
            raise ValueError("indices must be a non-empty 1-D list of dataset positions.")
        if selection.min() < 0 or selection.max() >= len(dataset) or len(np.unique(selection)) != len(selection):
            raise ValueError(f"indices must be distinct positions in 0..{len(dataset) - 1}.")
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}.")
        if patch_detail not in ("layer", "head", "sum"):
            raise ValueError(f"patch_detail must be 'layer', 'head' or 'sum', got {patch_detail!r}.")
        if batch_size < 1 or shard_size < 1:
            raise ValueError("batch_size and shard_size must be positive.")
        texts = cls._check_texts(text_directions, text_labels, visual.output_dim)
        key = cache_key(bundle, dataset, head_layers=head_layers, selection=selection, text_directions=texts,
                        patch_detail=patch_detail, dtype=dtype, shard_size=shard_size)

        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder):
            manifest = cls._start(folder, key, len(selection), shard_size, dataset, text_labels)
            shards_there = all((folder / f"shard_{s:05d}").is_dir() for s in range(manifest["n_shards"]))
            if manifest["status"] != "complete" or not shards_there:
                if texts is not None:
                    tmp = folder / f".text_directions.tmp-{os.getpid()}.npy"
                    np.save(tmp, texts)
                    os.replace(tmp, folder / "text_directions.npy")
                writer = _ShardWriter(bundle, dataset, folder, selection, shard_size, head_layers, texts,
                                      patch_detail, np.dtype(dtype))
                manifest["fields"] = writer.run(batch_size, num_workers, progress)
                manifest["status"] = "complete"
                manifest["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
                _write_json(folder / "manifest.json", manifest)
        return cls.open(folder, expected_key=key)

    @staticmethod
    def _check_texts(directions, labels, dim: int) -> np.ndarray | None:
        if directions is None:
            if labels is not None:
                raise ValueError("text_labels given without text_directions.")
            return None
        texts = directions.detach().float().cpu().numpy() if isinstance(directions, torch.Tensor) else np.asarray(
            directions, dtype=np.float32)
        if texts.ndim != 2 or texts.shape[1] != dim or len(texts) == 0:
            raise ValueError(f"text_directions must be [T, {dim}] (e.g. bundle.encode_text(texts)), got "
                             f"{list(texts.shape)}.")
        if not np.isfinite(texts).all():
            raise ValueError("text_directions contain NaN or Inf values.")
        if labels is not None and len(labels) != len(texts):
            raise ValueError(f"text_labels has {len(labels)} names for {len(texts)} text directions.")
        return texts.astype(np.float32)

    @staticmethod
    def _start(folder: Path, key: dict, n_images: int, shard_size: int, dataset, text_labels) -> dict:
        """Check what is already in ``folder`` and write the manifest of this build (lock held)."""
        path = folder / "manifest.json"
        if path.is_file():
            manifest = json.loads(path.read_text())
            if manifest.get("key") != key:
                raise StaleCacheError(f"{folder} holds a cache built from different inputs: "
                                      + "; ".join(_key_differences(manifest.get("key", {}), key))
                                      + ". Delete the folder to rebuild it, or build into another folder.")
            return manifest
        strangers = [p.name for p in folder.iterdir() if not p.name.startswith(".")]  # ours: .lock, .shard_*.tmp
        if strangers:
            raise FileExistsError(f"{folder} is not empty and is not a decomposition cache (has {strangers[:5]}); "
                                  "choose a new or empty folder.")
        manifest = {"format": FORMAT, "status": "building", "key": key, "n_images": n_images,
                    "shard_size": shard_size, "n_shards": -(-n_images // shard_size),
                    "label_names": sorted(dataset.labels), "text_labels": list(text_labels) if text_labels else None,
                    "created": datetime.datetime.now().isoformat(timespec="seconds")}
        _write_json(path, manifest)
        return manifest


class _ShardWriter:
    """Runs the decomposition over the shards not yet on disk and writes each one atomically."""

    def __init__(self, bundle, dataset, folder: Path, selection: np.ndarray, shard_size: int,
                 head_layers: tuple[int, ...], texts: np.ndarray | None, patch_detail: str, dtype: np.dtype):
        self.bundle, self.dataset, self.folder, self.selection = bundle, dataset, folder, selection
        self.shard_size, self.head_layers, self.patch_detail, self.dtype = shard_size, head_layers, patch_detail, dtype
        self.texts = None if texts is None else torch.from_numpy(texts).to(bundle.device)

    def rows(self, shard: int) -> np.ndarray:
        return self.selection[shard * self.shard_size:(shard + 1) * self.shard_size]

    def _expected_ids(self, shard: int) -> np.ndarray:
        return np.array([self.dataset.ids[i] for i in self.rows(shard)])

    def _is_done(self, shard: int) -> bool:
        """A shard folder exists only once complete (atomic rename); confirm it holds exactly its rows."""
        path = self.folder / f"shard_{shard:05d}"
        if not path.is_dir():
            return False
        try:
            if np.array_equal(np.load(path / "indices.npy"), self.rows(shard)) and np.array_equal(
                    np.load(path / "ids.npy"), self._expected_ids(shard)):
                return True
        except (OSError, ValueError):
            pass
        warnings.warn(f"{path} does not hold the expected images; recomputing it.")
        shutil.rmtree(path)
        return False

    def run(self, batch_size: int, num_workers: int, progress: bool) -> dict:
        for leftover in self.folder.glob(".shard_*"):  # half-written shards of a killed run
            shutil.rmtree(leftover)
        n_shards = -(-len(self.selection) // self.shard_size)
        todo = [s for s in range(n_shards) if not self._is_done(s)]
        plan = [(s, self.rows(s)[i:i + batch_size]) for s in todo for i in range(0, len(self.rows(s)), batch_size)]
        images = _Images(self.dataset, tuple(vision_tower(self.bundle).image_size))
        loader = torch.utils.data.DataLoader(images, batch_sampler=[b.tolist() for _, b in plan],
                                             num_workers=num_workers)
        bar = tqdm(total=len(self.selection), initial=len(self.selection) - sum(len(b) for _, b in plan),
                   unit="img", desc="decomposing", disable=not progress)
        pending: dict[str, list[np.ndarray]] = {}
        with bar:
            for (shard, batch), images in zip(plan, loader):
                for name, values in self._terms(images).items():
                    pending.setdefault(name, []).append(values)
                bar.update(len(batch))
                if sum(len(v) for v in pending["norm"]) == len(self.rows(shard)):
                    self._write(shard, {name: np.concatenate(v) for name, v in pending.items()})
                    pending = {}
        first = {name: np.load(self.folder / "shard_00000" / f"{name}.npy", mmap_mode="r") for name in FIELDS
                 if (self.folder / "shard_00000" / f"{name}.npy").is_file()}
        return {name: {"shape": [len(self.selection), *array.shape[1:]], "dtype": str(array.dtype)}
                for name, array in first.items()}

    @torch.no_grad()
    def _terms(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        spatial = self.texts is not None
        parts = decompose(self.bundle, images.to(self.bundle.device), spatial=spatial, layers=self.head_layers)
        terms = {"embedding": parts.embedding, "attns": parts.attns, "mlps": parts.mlps,
                 "heads": parts.head_terms(), "cls_to_cls": parts.cls_to_cls.sum(2)}
        if spatial:
            pattern = {"layer": "blnhd,td->blnt", "head": "blnhd,td->blnht", "sum": "blnhd,td->bnt"}[self.patch_detail]
            terms["patch_text"] = torch.einsum(pattern, parts.heads, self.texts)
        out = {name: value.cpu().numpy().astype(self.dtype) for name, value in terms.items()}
        for name, value in out.items():
            if not np.isfinite(value).all():
                raise OverflowError(f"{name} terms overflow {self.dtype} storage; build with dtype='float32'.")
        out["norm"] = parts.norm.cpu().numpy().astype(np.float32)
        return out

    def _write(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Write a shard into a temporary folder, then rename it into place (all or nothing)."""
        rows = self.rows(shard)
        tmp = self.folder / f".shard_{shard:05d}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            for name, values in arrays.items():
                np.save(tmp / f"{name}.npy", values)
            np.save(tmp / "indices.npy", rows)
            np.save(tmp / "ids.npy", self._expected_ids(shard))
            for name, values in self.dataset.labels.items():
                np.save(tmp / f"label_{name}.npy", np.asarray(values)[rows].astype(np.int64))
            os.replace(tmp, self.folder / f"shard_{shard:05d}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
