"""Load an open_clip CLIP model, its preprocessing and its tokenizer from one short spec string.

Spec forms accepted by :func:`load`:

``"toy"``
    The embedded default: a small CLIP trained from scratch on the toy world, shipped in ``data/toy``.
``"ViT-B-16"``
    An open_clip architecture with random weights (for tests and shape checks).
``"ViT-B-16/laion2b_s34b_b88k"``
    An open_clip pretrained tag. open_clip downloads the weights on the reader's machine; offline, the
    call fails within seconds with instructions instead of retrying for a minute.
``"/path/to/folder"``
    A folder in open_clip's ``local-dir`` layout (``open_clip_config.json`` + weights).
``"ViT-B-16/path/to/weights.safetensors"`` or ``load("ViT-B-16", checkpoint=path)``
    An architecture plus a local checkpoint file (safetensors, or a torch file read with
    ``weights_only=True``: arbitrary pickles are refused).
``"ViT-B-16-SigLIP"``, ``"ViT-B-16-SigLIP/webli"``
    open_clip's SigLIP architectures (timm attention-pool image towers), random or pretrained. Their
    tokenizer comes from the Hugging Face Hub: offline, a random-init model still loads and only
    ``encode_text`` fails, saying how to get it.
``"hf:openai/clip-vit-base-patch32"``, ``"hf:google/siglip-base-patch16-224"``
    A Hugging Face transformers CLIP or SigLIP checkpoint (weights as safetensors), with its own image
    processor and tokenizer; downloaded on the reader's machine, and offline a model that is not cached
    fails within seconds saying how to get it.
``"/path/to/hf_folder"``
    A folder written by transformers' ``save_pretrained`` (``config.json`` + safetensors weights, and
    the processor's files: ``preprocessor_config.json``, plus the tokenizer's for text).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from .paths import data_dir

__all__ = [
    "ClipBundle",
    "PRECISIONS",
    "load",
    "toy_model_dir",
    "toy_card",
    "WeightsUnavailableError",
    "file_sha256",
]

HOW_TO_GET_WEIGHTS = (
    "Pretrained CLIP weights are downloaded by open_clip from the Hugging Face Hub, which this machine "
    "cannot reach. Either run this notebook where the internet is available (e.g. Google Colab: use the "
    "'Open in Colab' badge), or download the checkpoint elsewhere and pass its local path, e.g. "
    "load('{arch}', checkpoint='/path/to/open_clip_model.safetensors'), or use the offline default "
    "load('toy')."
)


class WeightsUnavailableError(RuntimeError):
    """Raised when pretrained weights are neither cached locally nor downloadable."""


@dataclass
class ClipBundle:
    """An open_clip CLIP in eval mode with everything needed to feed it.

    Attributes:
        model: the unmodified ``open_clip.model.CLIP``, or a :class:`~clipdecomp.towers.HFModel` around an
            unmodified transformers CLIP or SigLIP model.
        preprocess: PIL image -> normalised [3, H, W] tensor (open_clip's eval transform).
        tokenizer: list of strings -> token ids.
        spec: the spec string the bundle was loaded from (recorded in caches and status pages).
        weights_sha256: sha256 of the weights file, or ``None`` for random initialisation.
    """

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    spec: str
    weights_sha256: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Embed ``texts`` with the text tower; returns L2-normalised [n, d'] fp32 rows."""
        if isinstance(texts, str):
            raise TypeError("encode_text expects a list of strings, not a single string: wrap it in a list.")
        if len(texts) == 0:
            raise ValueError("encode_text got an empty list of texts.")
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            chunks.append(self.model.encode_text(tokens).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    def preprocess_batch(self, images: Sequence[Image.Image] | Image.Image | np.ndarray) -> torch.Tensor:
        """[B, 3, H, W] model inputs on the bundle's device from PIL images or uint8 [B, H, W, 3] arrays
        (e.g. ``toy.sample(...).images``), through the bundle's own preprocess."""
        if isinstance(images, Image.Image):
            images = [images]
        pictures = [
            Image.fromarray(image) if not isinstance(image, Image.Image) else image for image in images
        ]
        if not pictures:
            raise ValueError("preprocess_batch got no images.")
        return torch.stack([self.preprocess(picture) for picture in pictures]).to(self.device)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a preprocessed [B, 3, H, W] batch; returns L2-normalised [B, d'] fp32 rows."""
        return F.normalize(self.model.encode_image(images.to(self.device)).float(), dim=-1)

    @property
    def tower(self):
        """The image tower by role (:class:`clipdecomp.towers.Tower`): what the decomposition reads."""
        from .towers import vision_tower

        return vision_tower(self.model)

    n_layers = property(lambda self: self.tower.n_layers, doc="Blocks of the image tower.")
    n_heads = property(lambda self: self.tower.n_heads, doc="Attention heads per block.")
    grid_size = property(lambda self: self.tower.grid_size, doc="The patch grid (rows, columns).")
    image_size = property(lambda self: self.tower.image_size, doc="Input size (rows, columns) in pixels.")
    embed_dim = property(lambda self: self.tower.output_dim, doc="Size d' of the image and text embeddings.")


def toy_model_dir() -> Path:
    """Folder holding the toy model (``$CLIPDECOMP_DATA/toy`` or the repository's ``data/toy``)."""
    return data_dir() / "toy"


def toy_card(folder: Path | None = None) -> dict:
    """The toy model's card (``card.json`` in ``folder``, default :func:`toy_model_dir`): its config,
    training steps, wall time, learning curve, zero-shot accuracies and targets.

    >>> toy_card()["zero_shot_accuracy"]["colour"] > 0.9
    True
    """
    return json.loads(((folder or toy_model_dir()) / "card.json").read_text(encoding="utf-8"))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


PRECISIONS = ("fp32", "fp16", "bf16", "amp", "amp_bf16", "pure_fp16", "pure_bf16")
"""The precision names ``open_clip.create_model`` accepts."""


def load(
    spec: str,
    device: str | torch.device = "cpu",
    *,
    checkpoint: str | Path | None = None,
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> ClipBundle:
    """Load a CLIP model from a spec string (see the module docstring for the forms).

    Example:
        >>> bundle = load("ViT-B-32")               # random init, offline
        >>> bundle.encode_text(["a photo of a cat"]).shape
        torch.Size([1, 512])
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Model spec must be a non-empty string such as 'toy' or 'ViT-B-16', got {spec!r}.")
    spec = spec.strip()
    if spec == "toy":
        folder = toy_model_dir()
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"The toy model is missing from {folder}. It ships with the repository: clone it "
                "(git clone ...) and install with `pip install -e .`, or set CLIPDECOMP_DATA to the "
                "repository's data/ folder."
            )
        return _from_local_dir(folder, spec, device, precision)
    if spec.startswith("hf:") or (checkpoint is None and _is_hf_folder(Path(spec).expanduser())):
        return _from_hugging_face(spec.removeprefix("hf:"), spec, device, precision, cache_dir)
    if checkpoint is None and Path(spec).expanduser().is_dir():
        return _from_local_dir(Path(spec).expanduser(), spec, device, precision)

    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        path = Path(spec).expanduser()
        if path.is_file():
            raise ValueError(
                f"{path} is a weights file: name its architecture too, e.g. "
                f"load('ViT-B-16', checkpoint={str(path)!r})."
            )
        if not arch or "/" in spec or spec.startswith(("~", ".")):
            read_as = (
                f" ({arch!r} is not an open_clip architecture, so the spec was read as a path)"
                if arch
                else ""
            )
            raise FileNotFoundError(
                f"No model folder or checkpoint file at {path}{read_as}: check the path, or use 'toy', an "
                "architecture such as 'ViT-B-16' or 'ARCH/PRETRAINED_TAG'."
            )
        raise ValueError(
            f"Unknown model spec {spec!r}: {arch!r} is not an open_clip architecture. Use 'toy', an "
            f"architecture such as 'ViT-B-16', 'ARCH/PRETRAINED_TAG' (see open_clip.list_pretrained()), "
            "a folder in open_clip's local-dir layout, or pass checkpoint=PATH."
        )
    if checkpoint is None and tag and (Path(tag).expanduser().exists() or _looks_like_path(tag)):
        checkpoint = Path(
            tag
        ).expanduser()  # a missing file or a folder is named as such, not as an unknown tag
    if checkpoint is not None:
        return _from_checkpoint(arch, Path(checkpoint), spec, device, precision, quick_gelu=False)
    if not tag:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, device=device, precision=precision)
        return _bundle(model, preprocess, _open_clip_tokenizer(arch), spec, None, device)
    return _from_pretrained_tag(arch, tag, spec, device, precision, cache_dir)


def _looks_like_path(tag: str) -> bool:
    """Whether the part after ``ARCH/`` is meant as a file (pretrained tags hold no '/' and no file
    suffix)."""
    return (
        "/" in tag
        or tag.startswith(("~", "."))
        or Path(tag).suffix.lower() in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
    )


def _raise_if_not_the_weights(error: Exception, device: torch.device) -> None:
    """Re-raise a failed load whose cause is not the weights file (no GPU, out of memory) as what it is."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"Device {device} was requested, but torch sees no CUDA GPU on this machine ({error}). "
            "Load with device='cpu', or run where a GPU and its driver are installed."
        ) from error
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        raise error


def _bundle(model, preprocess, tokenizer, spec, sha, device) -> ClipBundle:
    model.eval()
    return ClipBundle(
        model=model, preprocess=preprocess, tokenizer=tokenizer, spec=spec, weights_sha256=sha, device=device
    )


def _from_local_dir(folder: Path, spec: str, device, precision) -> ClipBundle:
    weights = [
        p
        for p in (folder / "open_clip_model.safetensors", folder / "open_clip_pytorch_model.bin")
        if p.is_file()
    ]
    if not weights:
        raise FileNotFoundError(f"No weights (open_clip_model.safetensors) found in {folder}.")
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has weights but no open_clip_config.json (the model's architecture), which "
            "open_clip's local-dir layout needs beside them: restore it, or load the weights with "
            "load('ARCH', checkpoint=PATH)."
        )
    name = f"local-dir:{folder}"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, precision=precision)
    except Exception as error:  # open_clip raises several types for bad files; one clear message here
        _raise_if_not_the_weights(error, device)
        raise ValueError(
            f"Could not load the model in {folder}: {error}. The weights file may be "
            "truncated or corrupt: restore it (e.g. `git checkout -- data/`)."
        ) from error
    return _bundle(model, preprocess, open_clip.get_tokenizer(name), spec, file_sha256(weights[0]), device)


def _from_checkpoint(
    arch: str, path: Path, spec: str, device, precision, quick_gelu: bool, mean=None, std=None
) -> ClipBundle:
    if path.is_dir():
        raise IsADirectoryError(
            f"Checkpoint {path} is a folder, not a weights file: pass the .safetensors (or .bin) "
            f"file inside it, or load('{path}') for a folder in open_clip's local-dir layout."
        )
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch,
            pretrained=str(path),
            device=device,
            precision=precision,
            force_quick_gelu=quick_gelu,
            image_mean=mean,
            image_std=std,
            weights_only=True,
        )
    except Exception as error:
        _raise_if_not_the_weights(error, device)
        raise ValueError(
            f"Could not load checkpoint {path} into {arch}: {error}. Checkpoints are read safely "
            "(safetensors, or torch.load with weights_only=True, which refuses arbitrary pickled "
            "objects); the file may be truncated, corrupt, for another architecture, or an untrusted "
            "pickle. Re-download it or convert it to safetensors."
        ) from error
    return _bundle(model, preprocess, _open_clip_tokenizer(arch), spec, file_sha256(path), device)


def _from_pretrained_tag(arch, tag, spec, device, precision, cache_dir) -> ClipBundle:
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ValueError(
            f"Unknown pretrained tag {tag!r} for {arch}. Known tags: "
            f"{open_clip.list_pretrained_tags_by_model(arch)}."
        )
    path = _cached_weights(cfg, cache_dir)
    if path is None:
        host = _weights_host(cfg)
        if not _reachable(host):
            raise WeightsUnavailableError(
                f"Weights for {spec} are not cached and {host} is unreachable. "
                + HOW_TO_GET_WEIGHTS.format(arch=arch)
            )
        path = Path(open_clip.download_pretrained(cfg, cache_dir=cache_dir))
    return _from_checkpoint(
        arch,
        path,
        spec,
        device,
        precision,
        quick_gelu=bool(cfg.get("quick_gelu")),
        mean=cfg.get("mean"),
        std=cfg.get("std"),
    )


def _cached_weights(cfg: dict, cache_dir: str | None) -> Path | None:
    """Path of already-downloaded weights for a pretrained config, or None."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)  # "org/repo/" -> ("org/repo", ""): default file names
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        return None
    url = cfg.get("url", "")
    if url:
        candidate = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(urlparse(url).path)
        return candidate if candidate.is_file() else None
    return None


def _weights_host(cfg: dict) -> str:
    return (
        "huggingface.co" if cfg.get("hf_hub") else (urlparse(cfg.get("url", "")).hostname or "huggingface.co")
    )


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:443 opens within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


# ------------------------------------------------------------------------------------------------------
# Hugging Face: transformers checkpoints, and open_clip models whose tokenizer lives on the Hub.
# ------------------------------------------------------------------------------------------------------

HF_MODEL_TYPES = {
    "clip": "CLIPModel",
    "clip_vision_model": "CLIPVisionModelWithProjection",
    "siglip": "SiglipModel",
    "siglip_vision_model": "SiglipVisionModel",
}
"""transformers ``config.model_type`` -> the class loaded (``clip_vision_model`` checkpoints saved
without a projection load as ``CLIPVisionModel``)."""

_HF_FILES = ["*.json", "*.txt", "*.model", "model.safetensors", "model-*.safetensors"]


def _is_hf_folder(path: Path) -> bool:
    return (
        path.is_dir() and (path / "config.json").is_file() and not (path / "open_clip_config.json").is_file()
    )


def _hub_message(what: str, repo: str) -> str:
    return (
        f"{what} comes from the Hugging Face Hub ({repo}), is not in the local cache, and huggingface.co is "
        "unreachable from this machine. Run this where the internet is available (e.g. Google Colab: use "
        f"the 'Open in Colab' badge), or download it elsewhere (`huggingface-cli download {repo} --local-dir "
        "DIR`) and pass the folder, or use the offline default load('toy')."
    )


class _Unavailable:
    """A tokenizer that could not be had: calling it explains why (the image side still works)."""

    def __init__(self, message: str, error: type[Exception] = WeightsUnavailableError):
        self.message, self.error = message, error

    def __call__(self, texts):
        raise self.error(self.message)

    def __repr__(self) -> str:
        return f"<unavailable tokenizer: {self.message[:60]}...>"


def _open_clip_tokenizer(arch: str):
    """open_clip's tokenizer for ``arch``; a Hub-hosted one (SigLIP's) that cannot be had fails when used."""
    repo = ((open_clip.get_model_config(arch) or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        cached = any(
            isinstance(try_to_load_from_cache(repo, name), str)
            for name in ("tokenizer.json", "tokenizer_config.json")
        )
        if not cached and not _reachable("huggingface.co"):
            return _Unavailable(_hub_message(f"The tokenizer of {arch}", repo))
    return open_clip.get_tokenizer(arch)


class _HFPreprocess:
    """PIL image -> [3, H, W] pixels through the checkpoint's own transformers image processor.

    ``transforms`` names the normalisation the processor applies last (a torchvision ``Normalize``), so
    code that undoes it for display (``clipdecomp.plots.pictures``) works as for open_clip's transforms.
    """

    def __init__(self, processor):
        from torchvision.transforms import Normalize

        self.processor = processor
        self.transforms = [Normalize(processor.image_mean, processor.image_std)]

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:  # recorded in cache keys: the processor's whole configuration
        import json

        config = json.dumps(self.processor.to_dict(), sort_keys=True, default=str)
        return f"{type(self.processor).__name__}({config})"


class _HFTokenizer:
    """list of strings -> [n, L] token ids, padded to the text tower's context length as in training."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )["input_ids"]


def _hf_snapshot(repo: str, cache_dir: str | None) -> Path:
    """The local folder of a Hub checkpoint: the cached copy, else a download (fails fast offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo, cache_dir=cache_dir, allow_patterns=_HF_FILES, local_files_only=True)
        )
    except LocalEntryNotFoundError:  # not cached: download it if the Hub is reachable
        pass
    if not _reachable("huggingface.co"):
        raise WeightsUnavailableError(_hub_message(f"The model {repo}", repo))
    return Path(snapshot_download(repo, cache_dir=cache_dir, allow_patterns=_HF_FILES))


def _from_hugging_face(source: str, spec: str, device, precision: str, cache_dir: str | None) -> ClipBundle:
    import transformers

    from .towers import HFModel

    folder = (
        Path(source).expanduser() if Path(source).expanduser().is_dir() else _hf_snapshot(source, cache_dir)
    )
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise FileNotFoundError(
            f"{folder} is not a transformers checkpoint with safetensors weights (config.json and "
            "model.safetensors, as written by save_pretrained(folder))."
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    name = HF_MODEL_TYPES.get(config.model_type)
    if name is None:
        raise NotImplementedError(
            f"{folder} holds a {config.model_type!r} model; supported transformers models: "
            f"{', '.join(sorted(set(HF_MODEL_TYPES.values())))}."
        )
    if name == "CLIPVisionModelWithProjection" and "CLIPVisionModelWithProjection" not in (
        config.architectures or []
    ):
        name = "CLIPVisionModel"
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(
            f"precision must be one of {list(dtypes)} for transformers models, got {precision!r}."
        )
    model = getattr(transformers, name).from_pretrained(folder, dtype=dtypes[precision], use_safetensors=True)
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no preprocessor_config.json: save the checkpoint's processor beside the "
            "model (processor.save_pretrained(folder)), so images are preprocessed as in training."
        )
    preprocess = _HFPreprocess(transformers.AutoImageProcessor.from_pretrained(folder))
    text_config = getattr(config, "text_config", None)
    tokenizer = _Unavailable(
        f"{spec} has no text tower (an image-only checkpoint): load the full CLIPModel or "
        "SiglipModel checkpoint to embed texts.",
        NotImplementedError,
    )
    if text_config is not None:
        try:
            tokenizer = _HFTokenizer(
                transformers.AutoTokenizer.from_pretrained(folder), text_config.max_position_embeddings
            )
        except (OSError, ValueError) as error:
            tokenizer = _Unavailable(
                f"No tokenizer could be read from {folder} ({error}); save it beside the model "
                "(processor.save_pretrained(folder)).",
                FileNotFoundError,
            )
    sha = (
        file_sha256(weights[0])
        if len(weights) == 1
        else hashlib.sha256("".join(file_sha256(path) for path in weights).encode()).hexdigest()
    )
    return _bundle(HFModel(model.to(device)), preprocess, tokenizer, spec, sha, device)
