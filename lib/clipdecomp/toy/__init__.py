"""The toy world and the toy CLIP trained on it (the book's offline default model)."""

from .world import (
    ATTRIBUTES,
    CAPTION_ATTRIBUTES,
    PROMPTS,
    ToySamples,
    class_prompts,
    group_names,
    prompt_templates,
    sample,
    spurious_split,
    to_tensor,
)

__all__ = [
    "ATTRIBUTES",
    "CAPTION_ATTRIBUTES",
    "PROMPTS",
    "ToySamples",
    "class_prompts",
    "group_names",
    "prompt_templates",
    "sample",
    "spurious_split",
    "to_tensor",
]
