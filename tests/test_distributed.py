"""One cache built by several processes: a real torchrun job, killed ranks, two jobs on one folder.

The torchrun test starts the real launcher (gloo on the CPU, the toy model) and compares its cache file
by file with a one-process build. The other tests fork ranks from this process (``run_ranks``: no
second import of torch, so they stay fast) and join them in a gloo group, as torchrun's workers do;
a killed rank is SIGKILLed and the job's other ranks are then killed too, as torchrun does.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from clipdecomp.__main__ import TORCHRUN_UNSAFE_ALIASES, main, parser
from clipdecomp.cache import DecompositionCache
from clipdecomp.datasets import ToyDataset
from test_cache import PREPROCESS, tiny_bundle

torch.set_num_threads(1)


def run_ranks(world: int, work, tmp_path: Path, timeout: float = 120) -> list[tuple[str, object]]:
    """Run ``work(rank)`` in ``world`` forked processes joined in one gloo group; per rank ``("ok", result)``,
    ``(error type, message)``, or ``("killed", None)``. When a rank dies of SIGKILL the others are killed
    too."""
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    address = f"file://{tmp_path / f'.group-{uuid.uuid4().hex}'}"

    def rank_main(rank: int) -> None:
        try:
            dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
            results.put((rank, "ok", work(rank)))
        except BaseException as error:  # noqa: BLE001 (reported to the test)
            results.put((rank, type(error).__name__, str(error)))
        finally:
            os._exit(0)  # no pytest teardown in the child

    ranks = [context.Process(target=rank_main, args=(rank,)) for rank in range(world)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + timeout
    while any(p.exitcode is None for p in ranks) and time.monotonic() < deadline:
        if any(p.exitcode == -signal.SIGKILL for p in ranks):  # a lost rank: the launcher stops the job
            for process in ranks:
                if process.exitcode is None:
                    process.kill()
        time.sleep(0.05)
    for process in ranks:
        if process.exitcode is None:
            process.kill()
        process.join()
    outcomes: list[tuple[str, object]] = [("killed", None)] * world
    while not results.empty():
        rank, kind, value = results.get()
        outcomes[rank] = (kind, value)
    return outcomes


def records(folder: Path) -> dict:
    """What must be bitwise equal between two builds: every shard's files (sizes, shapes, sha256) and ids."""
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    return {"key": manifest["key"], "fields": manifest["fields"], "shards": manifest["shards"]}


class Dying(ToyDataset):
    """Toy data whose process SIGKILLs itself when it reaches image ``kill_at`` (set in one rank only)."""

    kill_at: int | None = None

    def image(self, index):
        if index == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, like a lost machine
        return super().image(index)


class Waiting(ToyDataset):
    """Toy data that stops at its first image until a file appears (a job that is still running)."""

    gate: Path | None = None

    def image(self, index):
        if self.gate is not None:
            (self.gate.parent / "started").touch()
            while not self.gate.exists():
                time.sleep(0.05)
        return super().image(index)


BUILD = dict(batch_size=2, shard_size=4, progress=False)


def test_decompose_options_pass_through_torchrun():
    from torch.distributed.run import get_args_parser

    launcher = get_args_parser()
    decompose = parser()._subparsers._group_actions[0].choices["decompose"]
    options = [o for action in decompose._actions for o in action.option_strings if o.startswith("--")]
    assert "--n-images" in options and "--no-progress" in options
    for option in options:
        if option in TORCHRUN_UNSAFE_ALIASES:
            with pytest.raises(SystemExit):  # why it was renamed: torchrun stops at it
                launcher.parse_args(["--nproc_per_node=2", "-m", "clipdecomp", "decompose", option, "3"])
            assert TORCHRUN_UNSAFE_ALIASES[option] in options
            continue
        parsed = launcher.parse_args(["--nproc_per_node=2", "-m", "clipdecomp", "decompose", option, "3"])
        assert parsed.training_script_args == ["decompose", option, "3"], option


def test_old_n_option_still_works_with_a_note(tmp_path, capsys):
    with pytest.warns(FutureWarning, match="--n is now spelled --n-images"):
        main(
            [
                "decompose",
                "--model",
                "toy",
                "--data",
                "toy",
                "--n",
                "3",
                "--out",
                str(tmp_path / "c"),
                "--no-progress",
            ]
        )
    assert len(DecompositionCache.open(tmp_path / "c")) == 3
    with pytest.raises(SystemExit):
        main(
            [
                "decompose",
                "--model",
                "toy",
                "--data",
                "toy",
                "--n",
                "3",
                "--n-images",
                "3",
                "--out",
                str(tmp_path / "d"),
            ]
        )
    assert "the same option" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_torchrun_build_equals_one_process_build(tmp_path, capsys):
    args = [
        "decompose",
        "--model",
        "toy",
        "--data",
        "toy",
        "--n-images",
        "10",
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--layers=-2:",
        "--device",
        "cpu",
    ]
    main(args + ["--out", str(tmp_path / "one"), "--no-progress"])
    capsys.readouterr()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    job = subprocess.run(
        [
            "nice",
            "-n",
            "15",
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "clipdecomp",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("DecompositionCache(") == 1  # one summary line per job, from rank 0
    assert "decomposing on 2 ranks" in job.stderr  # rank 0's bar counts the whole job
    assert records(tmp_path / "two") == records(tmp_path / "one")  # bitwise: every file's sha256
    assert not list((tmp_path / "two").glob("journal_rank*"))  # merged into the manifest
    DecompositionCache.open(tmp_path / "two", verify=True)


def test_killed_rank_resumes_with_another_world_size(tmp_path):
    bundle, out = tiny_bundle(), tmp_path / "c"
    reference = DecompositionCache.build(
        bundle, ToyDataset(14, preprocess=PREPROCESS), tmp_path / "one", **BUILD
    )

    def killed_job(rank: int) -> None:
        data = Dying(14, preprocess=PREPROCESS)
        data.kill_at = 12 if rank == 1 else None  # rank 1 writes shard 1, then dies in shard 3
        DecompositionCache.build(bundle, data, out, **BUILD)

    outcomes = run_ranks(2, killed_job, tmp_path)
    assert outcomes[1] == ("killed", None) and outcomes[0] == ("killed", None), outcomes
    assert json.loads((out / "manifest.json").read_text())["status"] == "building"
    assert (out / "shard_00001").is_dir() and (out / "journal_rank00001.json").is_file()  # recorded by rank 1
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.glob("shard_*/*.npy")}

    def resumed_job(rank: int) -> tuple[list[str], list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = DecompositionCache.build(bundle, ToyDataset(14, preprocess=PREPROCESS), out, **BUILD)
        return cache.ids, [str(w.message) for w in caught if "shard" in str(w.message)]

    outcomes = run_ranks(3, resumed_job, tmp_path)
    assert [kind for kind, _ in outcomes] == ["ok"] * 3, outcomes
    assert all(ids == reference.ids and not noted for _, (ids, noted) in outcomes)  # nothing "damaged" either
    kept = {
        p.relative_to(out): p.stat().st_mtime_ns
        for p in out.glob("shard_*/*.npy")
        if p.relative_to(out) in before
    }
    assert kept == before  # the killed job's finished shards, rank 1's included, were kept
    assert records(out) == records(tmp_path / "one")
    assert not list(out.glob(".*clipdecomp-tmp*")) and not list(out.glob("journal_rank*"))


def test_second_job_on_one_folder_is_refused(tmp_path):
    bundle, out, gate = tiny_bundle(), tmp_path / "c", tmp_path / "go"
    context = multiprocessing.get_context("fork")

    def first_job(rank: int) -> int:
        data = Waiting(6, preprocess=PREPROCESS)
        data.gate = gate
        return len(DecompositionCache.build(bundle, data, out, **BUILD))

    first = context.Process(
        target=lambda: os._exit(0 if run_ranks(2, first_job, tmp_path) == [("ok", 6)] * 2 else 1)
    )
    first.start()
    try:
        while not (tmp_path / "started").exists():  # job 1 holds the lock and is computing
            assert first.exitcode is None
            time.sleep(0.05)
        listing = sorted(p.name for p in out.iterdir())

        def second_job(rank: int) -> None:
            DecompositionCache.build(bundle, ToyDataset(6, preprocess=PREPROCESS), out, **BUILD)

        outcomes = run_ranks(2, second_job, tmp_path)
        assert outcomes[0][0] == "CacheLockedError" and "being written by another run" in outcomes[0][1], (
            outcomes
        )
        assert "leading 2 ranks" in outcomes[0][1]  # who holds it: the first job's rank 0
        assert outcomes[1][0] == "OtherRankFailedError" and "rank 0 of this job stopped" in outcomes[1][1]
        assert sorted(p.name for p in out.iterdir()) == listing  # the second job wrote nothing
    finally:
        gate.touch()
        first.join(120)
    assert first.exitcode == 0
    cache = DecompositionCache.open(out, verify=True)
    assert cache.ids == ToyDataset(6, preprocess=PREPROCESS).ids


def test_ranks_with_different_inputs_are_refused_before_writing(tmp_path):
    bundle, out = tiny_bundle(), tmp_path / "c"

    def job(rank: int) -> None:
        DecompositionCache.build(bundle, ToyDataset(6, seed=rank, preprocess=PREPROCESS), out, **BUILD)

    outcomes = run_ranks(2, job, tmp_path)
    assert [kind for kind, _ in outcomes] == ["ValueError"] * 2, outcomes
    assert "would build a cache from other inputs" in outcomes[0][1] and "dataset.seed" in outcomes[0][1]
    assert not out.exists()


def test_a_rank_launched_without_a_process_group_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the program forgot init_process_group()
    with pytest.raises(
        RuntimeError, match="no torch.distributed process group is initialised.*init_process_group"
    ):
        DecompositionCache.build(tiny_bundle(), ToyDataset(2, preprocess=PREPROCESS), tmp_path / "c", **BUILD)
    assert not (tmp_path / "c").exists()


def test_ranks_with_different_folders_are_refused_before_writing(tmp_path):
    bundle = tiny_bundle()

    def job(rank: int) -> None:
        DecompositionCache.build(bundle, ToyDataset(6, preprocess=PREPROCESS), tmp_path / f"c{rank}", **BUILD)

    outcomes = run_ranks(2, job, tmp_path)
    assert [kind for kind, _ in outcomes] == ["ValueError"] * 2, outcomes
    assert "give every rank the same folder" in outcomes[0][1]
    assert not (tmp_path / "c0").exists() and not (tmp_path / "c1").exists()
