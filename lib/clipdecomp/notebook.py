"""Helpers shared by every chapter's standard setup cell: seeding, device choice, versions, glue, images."""

from __future__ import annotations

import platform
import random

import numpy as np
import torch
from PIL import Image

__all__ = ["setup", "pick_device", "glue", "sample_photo"]


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup(seed: int = 0) -> None:
    """Seed Python, NumPy and torch, use a consistent plot style, and print the versions in use."""
    import matplotlib.pyplot as plt
    import open_clip
    import seaborn as sns

    import clipdecomp

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    sns.set_theme(context="notebook", style="whitegrid")
    plt.rcParams.update({"figure.dpi": 100, "savefig.bbox": "tight", "figure.facecolor": "white"})
    accelerator = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    print(
        f"clipdecomp {clipdecomp.__version__} | torch {torch.__version__} "
        f"| open_clip {open_clip.__version__} "
        f"| python {platform.python_version()} | {accelerator}"
    )


def glue(name: str, value: object, display: bool = True) -> None:
    """Name a value for the book's prose (myst-nb's ``glue``: ``{glue:text}`name``` quotes it).

    Where myst-nb is not installed (e.g. on Colab, which installs only the library) the value is just
    displayed, or, with ``display=False``, dropped: only the built book reads glued values.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            from IPython.display import display as show

            show(value)
        return
    myst_glue(name, value, display=display)


def sample_photo(name: str = "astronaut") -> Image.Image:
    """A real photo shipped inside scikit-image (``astronaut``, ``chelsea``, ``coffee``, ``rocket``...)."""
    from skimage import data

    if not hasattr(data, name):
        raise ValueError(
            f"scikit-image has no sample image {name!r}; try 'astronaut', 'chelsea' or 'coffee'."
        )
    return Image.fromarray(getattr(data, name)()).convert("RGB")
