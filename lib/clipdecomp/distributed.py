"""The processes of one job: which one this is, and the few collectives a shared cache build needs.

``torchrun --nproc_per_node=K [--nnodes=M ...] -m clipdecomp decompose ...`` starts K processes per
host with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address) in their environment.
The command line initialises torch's default process group from them (:func:`init_from_environment`);
a Python program does the same with ``torch.distributed.init_process_group()``. Then
:meth:`~clipdecomp.cache.DecompositionCache.build`, called on every rank with the same arguments,
splits the shards between the ranks (see :mod:`clipdecomp.cache`).

Coordination uses a separate gloo group (plain objects on the CPU, whatever backend the default group
uses) with a long timeout, because ranks wait for each other while the slowest finishes its shards.
Every step that can fail is agreed: each rank says whether its part failed, and then every rank stops
together, the one that failed with its own error and the others with :class:`OtherRankFailedError`,
so no rank is left waiting for a partner that gave up. A rank that is killed outright cannot say so;
``torchrun`` then stops the whole job, which the next build resumes.

Example, ``build.py`` started as ``torchrun --nproc_per_node=4 build.py`` (one process per GPU)::

    torch.distributed.init_process_group()                  # reads RANK, WORLD_SIZE, MASTER_ADDR, ...
    bundle = clipdecomp.load("ViT-L-14/openai", device=local_device())    # cuda:LOCAL_RANK
    cache = DecompositionCache.build(bundle, data, "caches/l14")           # on every rank, same arguments
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Ranks", "OtherRankFailedError", "local_device", "launched_ranks", "init_from_environment"]

T = TypeVar("T")

WAIT = datetime.timedelta(days=2)
"""How long a rank waits for the others at a step (the slowest rank's share of the shards must fit)."""


class OtherRankFailedError(RuntimeError):
    """Another rank of the job failed at a step; its own error says why (this one names it)."""


def launched_ranks() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as a launcher such as torchrun set them, else ``(0, 1, 0)``."""

    def number(name: str, default: int) -> int:
        text = os.environ.get(name, "")
        try:
            return int(text) if text else default
        except ValueError:
            raise ValueError(
                f"The environment variable {name}={text!r} is not an integer; it is set by the "
                "launcher (torchrun): start the job with torchrun, or unset it."
            ) from None

    return number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0)


def local_device(preferred: str = "auto") -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is preferred (``"auto"`` with a GPU, or
    ``"cuda"``), else cpu.

    Each process of a host drives its own GPU; ``LOCAL_RANK`` is 0 outside a launcher.
    """
    _, _, local_rank = launched_ranks()
    if preferred == "cpu" or (preferred == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if preferred not in ("auto", "cuda"):
        raise ValueError(
            f"local_device picks cuda:LOCAL_RANK or cpu; got {preferred!r} (use 'auto', 'cuda' or 'cpu')."
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK {local_rank} has no GPU of its own: this host has {count} CUDA GPU(s). Start at "
            f"most {count} processes per host (torchrun --nproc_per_node={max(count, 1)}), or use cpu."
        )
    return torch.device("cuda", local_rank)


def init_from_environment(device: torch.device) -> bool:
    """Join the job torchrun started (nccl for CUDA devices, gloo otherwise); False when not launched as one.

    Does nothing when a process group is already initialised.
    """
    _, world_size, _ = launched_ranks()
    if world_size <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


class Ranks:
    """This process's place in the job (``rank`` of ``size``) and agreed steps between all ranks.

    With no initialised process group (or a group of one) it is a job of one: every step simply runs
    and raises as usual, so single-process code takes the same path.
    """

    def __init__(self) -> None:
        self.rank, self.size, self._group = 0, 1, None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
            self._group = dist.new_group(backend="gloo", timeout=WAIT)  # collective: every rank creates it
        else:
            _, launched, _ = launched_ranks()
            if launched > 1:
                raise RuntimeError(
                    f"This process was launched as one of {launched} ranks (WORLD_SIZE={launched}), "
                    "but no torch.distributed process group is initialised, so every rank would build "
                    "the whole cache: call torch.distributed.init_process_group() on every rank first "
                    "(`python -m clipdecomp decompose` does this itself)."
                )

    @property
    def leads(self) -> bool:
        """Whether this is rank 0, which holds the folder's lock and writes the manifest."""
        return self.rank == 0

    def close(self) -> None:
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def gather(self, value: Any) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if self._group is None:
            return [value]
        values: list = [None] * self.size
        dist.all_gather_object(values, value, group=self._group)
        return values

    def step(self, work: Callable[[], T], meanwhile: Callable[[], None] | None = None) -> T:
        """Run ``work`` on every rank and agree on the outcome: its result here, or every rank raises.

        ``meanwhile`` is called repeatedly while this rank waits for the others to finish theirs.
        """
        result, failure = None, None
        try:
            result = work()
        except BaseException as error:  # noqa: BLE001 (re-raised below, after the others know)
            failure = error
        if meanwhile is not None:
            self.wait_for_all(meanwhile)
        outcomes = self.gather(None if failure is None else _describe(failure))
        if failure is not None:
            raise failure
        self._raise_if_failed(outcomes)
        return result

    def lead(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only; every rank gets its result, or raises if it failed."""
        if self._group is None:
            return work()
        result, failure = None, None
        if self.leads:
            try:
                result = work()
            except BaseException as error:  # noqa: BLE001 (re-raised below, after the others know)
                failure = error
        message = [None if failure is None else _describe(failure), result]
        dist.broadcast_object_list(message, src=0, group=self._group)
        if failure is not None:
            raise failure
        self._raise_if_failed([message[0]])
        return message[1]

    def wait_for_all(self, meanwhile: Callable[[], None], every: float = 0.5) -> None:
        """Block until every rank arrives here, calling ``meanwhile`` (e.g. a progress refresh) while
        waiting."""
        if self._group is None:
            return
        arrived = dist.barrier(group=self._group, async_op=True)
        while not arrived.is_completed():
            meanwhile()
            time.sleep(every)
        arrived.wait()

    def _raise_if_failed(self, outcomes: list) -> None:
        for rank, outcome in enumerate(outcomes):
            if outcome is not None:
                raise OtherRankFailedError(
                    f"rank {rank} of this job stopped the build ({outcome}); rank {self.rank} "
                    "stopped too. Finished shards are kept: run the same job again to resume."
                )


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
