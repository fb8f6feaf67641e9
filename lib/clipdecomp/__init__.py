"""clipdecomp: CLIP's image representation as a sum of direct contributions of layers, heads and patches.

A companion library to the executable book reproducing Gandelsman, Efros & Steinhardt,
"Interpreting CLIP's Image Representation via Text-Based Decomposition" (ICLR 2024).

    >>> import clipdecomp
    >>> bundle = clipdecomp.load("toy")
    >>> images = bundle.preprocess_batch(clipdecomp.toy.sample(4, seed=0).images)  # or PIL images
    >>> parts = clipdecomp.decompose(bundle, images)
    >>> bool((parts.total() - bundle.encode_image(images)).abs().max() < 1e-5)   # the parts sum back
    True
"""

from .ablation import intervene, mean_ablate
from .cache import DecompositionCache, StaleCacheError
from .datasets import ImageFolderDataset, TarShardDataset, ToyDataset, WaterbirdsDataset
from .decomposition import Decomposition, decompose, decompose_batches
from .loading import ClipBundle, WeightsUnavailableError, load
from .pools import load_pool, random_directions
from .second_order import SecondOrder, SecondOrderStats
from .sparse_texts import SparseCodes, omp, text_dictionary
from .text_span import TextSpanResult, text_span, text_span_heads
from .towers import Tower, vision_tower
from .zero_shot import accuracy, zero_shot_classifier

__version__ = "0.1.0"

__all__ = [
    "ClipBundle",
    "Decomposition",
    "DecompositionCache",
    "ImageFolderDataset",
    "TarShardDataset",
    "StaleCacheError",
    "TextSpanResult",
    "Tower",
    "ToyDataset",
    "WaterbirdsDataset",
    "load_pool",
    "random_directions",
    "text_span",
    "text_span_heads",
    "WeightsUnavailableError",
    "accuracy",
    "decompose",
    "decompose_batches",
    "intervene",
    "load",
    "mean_ablate",
    "vision_tower",
    "zero_shot_classifier",
    "SecondOrder",
    "SecondOrderStats",
    "SparseCodes",
    "omp",
    "text_dictionary",
]
