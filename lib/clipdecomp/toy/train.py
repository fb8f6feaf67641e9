"""Train the book's toy CLIP from scratch on the toy world (CPU, one thread).

    python -m clipdecomp.toy.train                      # the shipped run: data/toy/train_config.json
    python -m clipdecomp.toy.train --resume             # continue from <out>/checkpoint.pt
    python -m clipdecomp.toy.train --out /tmp/t --steps 3 --eval-n 50   # a smoke test

Every step draws a fresh batch from ``world.sample(batch, seed * 1_000_003 + step, split="train",
**data)``, so a run is a pure function of its config and resuming reproduces the same batches.
``data`` is the config's caption and batch mix; a ``curriculum`` entry overrides it for the first
``curriculum["steps"]`` steps (the shipped run starts with shape-only captions: "a star.", in groups of
images that differ only in their shape, because a small tower otherwise never learns shape at all).

The loss is CLIP's symmetric contrastive loss with *multiple positives*: caption ``j`` is a positive
for image ``i`` when every attribute the caption names matches image ``i`` ("a red object" fits every
red object in the batch). Each row's target spreads evenly over its positives. Without this, the
single-attribute captions would turn most same-coloured images into false negatives.

At the end the run writes, into ``--out``: ``open_clip_model.safetensors`` (fp16),
``open_clip_config.json`` (open_clip's ``local-dir`` layout) and ``card.json`` (config, wall time,
training curve, held-out zero-shot accuracies of the fp16 weights, sha256 of the weights).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ..loading import file_sha256, toy_model_dir
from ..zero_shot import toy_zero_shot
from . import world
from .world import MEAN, STD, to_tensor

__all__ = ["build_model", "batch_options", "positives", "contrastive_loss", "export", "train", "main"]


def build_model(config: dict) -> open_clip.model.CLIP:
    """A randomly initialised open_clip CLIP from ``config["model_cfg"]`` (seeded by ``config["seed"]``)."""
    torch.manual_seed(config["seed"])
    cfg = config["model_cfg"]
    return open_clip.model.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=cfg["vision_cfg"],
        text_cfg=cfg["text_cfg"],
        init_logit_scale=math.log(config["init_temperature_inv"]),
    )


def batch_options(config: dict, step: int) -> dict:
    """The ``world.sample`` options of step ``step``: the curriculum's until it ends, then ``data``."""
    curriculum = config.get("curriculum")
    if curriculum and step < curriculum["steps"]:
        return {**config["data"], **curriculum["data"]}
    return dict(config["data"])


def positives(samples: world.ToySamples) -> torch.Tensor:
    """bool [n, n]: ``[i, j]`` is True when every attribute caption ``j`` names matches image ``i``."""
    ok = np.ones((len(samples), len(samples)), bool)
    for col, name in enumerate(world.CAPTION_ATTRIBUTES):
        values = samples.attributes[name]
        ok &= ~samples.mentions[None, :, col] | (values[:, None] == values[None, :])
    return torch.from_numpy(ok)


def contrastive_loss(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy against targets spread evenly over each row's positives."""
    pos = pos.float()
    image_to_text = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    text_to_image = -(pos.T / pos.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def _optimizer(model: torch.nn.Module, config: dict) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=config["lr"],
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def _lr(step: int, steps: int, config: dict) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = config["warmup"]
    if step < warmup:
        return config["lr"] * (step + 1) / warmup
    return config["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def export(model: open_clip.model.CLIP, config: dict, out: Path) -> Path:
    """Write fp16 weights and ``open_clip_config.json`` in open_clip's ``local-dir`` layout."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "open_clip_model.safetensors"
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path))
    size = config["model_cfg"]["vision_cfg"]["image_size"]
    open_clip_config = {
        "model_cfg": config["model_cfg"],
        "preprocess_cfg": {
            "size": size,
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps(open_clip_config, indent=2) + "\n")
    return path


def train(
    config: dict, out: Path, steps: int | None = None, resume: bool = False, eval_n: int | None = None
) -> dict:
    """Run the training described by ``config``; returns the card (also written to ``out/card.json``)."""
    torch.set_num_threads(1)
    steps = steps or config["steps"]
    eval_n = eval_n or config["eval_n"]
    model = build_model(config)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(
        context_length=config["model_cfg"]["text_cfg"]["context_length"]
    )
    opt = _optimizer(model, config)
    start, curve, elapsed = 0, [], 0.0
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed"]
        curve = json.loads(state["curve"])
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    t0, losses = time.time() - elapsed, []
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="toy CLIP")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, config)
        batch = world.sample(
            config["batch"], config["seed"] * 1_000_003 + step, split="train", **batch_options(config, step)
        )
        image, text, scale = model(to_tensor(batch.images), tokenizer(batch.captions))
        loss = contrastive_loss(scale * image @ text.T, positives(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        done = step + 1
        if done % config["eval_every"] == 0 or done == steps:
            acc = toy_zero_shot(model, tokenizer, n=config["curve_n"], seed=config["curve_seed"])
            curve.append(
                {
                    "step": done,
                    "seconds": round(time.time() - t0),
                    "loss": round(float(np.mean(losses[-50:])), 4),
                    **{k: v for k, v in acc.items() if k != "spurious_groups"},
                }
            )
            tqdm.write(json.dumps(curve[-1]))
        if done % config["checkpoint_every"] == 0 and done < steps:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": done,
                    "elapsed": time.time() - t0,
                    "curve": json.dumps(curve),
                },
                ckpt,
            )
    wall = time.time() - t0
    path = export(model, config, out)
    shipped, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out.resolve()}")
    card = {
        "model": "open_clip CLIP trained from scratch on the clipdecomp toy world (clipdecomp.toy)",
        "weights": path.name,
        "weights_sha256": file_sha256(path),
        "weights_dtype": "float16",
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_steps": steps,
        "wall_time_s": round(wall),
        "seed": config["seed"],
        "config": config,
        "data_recipe": world.__doc__.strip(),
        "loss": contrastive_loss.__doc__,
        "curve": curve,
        "eval": {
            "n_per_split": eval_n,
            "seed": config["card_seed"],
            "splits": "colour..size: split='uniform'; spurious: split='test_groups'",
        },
        "zero_shot_accuracy": toy_zero_shot(shipped.eval(), tokenizer, n=eval_n, seed=config["card_seed"]),
        "notes": config.get("notes", []),
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    ckpt.unlink(missing_ok=True)
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=toy_model_dir() / "train_config.json")
    parser.add_argument("--out", type=Path, default=toy_model_dir())
    parser.add_argument("--steps", type=int, help="override the config's number of steps")
    parser.add_argument("--eval-n", type=int, help="override the card's evaluation size")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())
    card = train(config, args.out, steps=args.steps, resume=args.resume, eval_n=args.eval_n)
    print(json.dumps(card["zero_shot_accuracy"], indent=2))


if __name__ == "__main__":
    main()
