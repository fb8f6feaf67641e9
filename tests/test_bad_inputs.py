"""Bad arguments and misleading causes: every value is checked and refused with the accepted range (never
clamped, defaulted or ignored), and every wrapped error names its real cause.

The table of all bad inputs and faults the tests cover is tests/README.md; the last test here checks
it against the real test names, so it cannot drift."""

from __future__ import annotations

import ast
import os
import re
import shutil
from pathlib import Path

import clipdecomp
import numpy as np
import pytest
import torch
from clipdecomp.__main__ import main
from clipdecomp.book.__main__ import main as book_main
from clipdecomp.book.runner import (
    execute_notebooks,
    repo_root,
    select_chapters,
    toc_notebooks,
)
from clipdecomp.cache import DecompositionCache, ShardedArray
from clipdecomp.datasets import ImageFolderDataset, ToyDataset, WaterbirdsDataset
from clipdecomp.loading import toy_model_dir
from clipdecomp.pools import load_pool, random_directions
from test_cache import PREPROCESS, tiny_bundle
from test_datasets import make_folder, make_waterbirds, save_image

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent
NO_GPU = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message for a machine without a CUDA GPU"
)


def cli_error(capsys, args: list[str]) -> str:
    """Run the CLI, expect exit status 2 and return its one-line error."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err


# --- the CLI: numbers, ranges, devices and options that would be ignored -----------------------------------


@pytest.mark.parametrize(
    "option, match",
    [
        (["--n", "0"], r"--n: expected an integer >= 1, got 0"),
        (["--n", "2.5"], r"--n: expected an integer >= 1, got '2.5'"),
        (["--batch-size", "0"], r"--batch-size: expected an integer >= 1"),
        (["--batch-size", "1e3"], r"--batch-size: expected an integer >= 1, got '1e3'"),
        (["--shard-size", "-4"], r"--shard-size: expected an integer >= 1, got -4"),
        (["--workers", "-1"], r"--workers: expected an integer >= 0"),
        (["--threads", "0"], r"--threads: expected an integer >= 1"),
        (["--seed", "-1"], r"--seed: expected an integer >= 0"),
        (["--layers", "3:3"], r"--layers '3:3'.*the range is empty"),
        (["--layers", "5:2"], r"--layers '5:2'.*the range is empty"),
        (["--layers=-2:2"], r"counts either from the end.*or from the start"),
        (["--layers", "4:"], r"an open range needs a negative start"),
        (["--layers", ""], r"--layers ''"),
        (["--layers", "1,,2"], r"an item of the list is empty"),
        (["--layers", "1,1"], r"a layer is listed twice"),
        (["--layers", "1.5"], r"--layers '1\.5'"),
        (["--dtype", "float64"], r"--dtype: invalid choice: 'float64'"),
        (["--patch-detail", "pixel"], r"--patch-detail: invalid choice"),
        (["--split", "testing"], r"--split: invalid choice"),
        (["--bogus", "1"], r"unrecognized arguments: --bogus"),
    ],
    ids=[
        "n-zero",
        "n-float",
        "batch-zero",
        "batch-exponent",
        "shard-negative",
        "workers-negative",
        "threads-zero",
        "seed-negative",
        "layers-empty-range",
        "layers-reversed",
        "layers-mixed-signs",
        "layers-open-positive",
        "layers-blank",
        "layers-empty-item",
        "layers-repeated",
        "layers-float",
        "dtype-unknown",
        "patch-detail-unknown",
        "split-unknown",
        "unknown-option",
    ],
)
def test_cli_refuses_bad_numbers_ranges_and_options(tmp_path, capsys, option, match):
    args = [
        "decompose",
        "--model",
        "toy",
        "--data",
        "toy",
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
        *option,
    ]
    assert re.search(match, cli_error(capsys, args))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "device, match",
    [
        pytest.param("gpu", r"--device 'gpu' is not a device name: use auto, cpu, cuda", id="gpu"),
        pytest.param("cuda", r"--device cuda: torch sees no CUDA GPU", marks=NO_GPU, id="cuda"),
        pytest.param("cuda:7", r"--device cuda:7: torch sees no CUDA GPU", marks=NO_GPU, id="cuda-index"),
        pytest.param("meta", r"--device meta: clipdecomp runs on cpu, cuda or mps", id="meta"),
    ],
)
def test_cli_refuses_devices_this_machine_lacks(tmp_path, capsys, device, match):
    args = ["decompose", "--model", "toy", "--data", "toy", "--out", str(tmp_path / "c"), "--device", device]
    assert re.search(match, cli_error(capsys, args))
    assert not (tmp_path / "c").exists()


def test_cli_refuses_options_that_would_be_ignored_or_clamped(tmp_path, capsys):
    base = ["decompose", "--model", "toy", "--out", str(tmp_path / "c"), "--no-progress"]
    assert "--split applies to waterbirds data only" in cli_error(
        capsys, base + ["--data", "toy", "--split", "val"]
    )
    assert "--patch-detail applies only with --texts" in cli_error(
        capsys, base + ["--data", "toy", "--n", "2", "--patch-detail", "head"]
    )
    root = make_folder(tmp_path / "val", {"a": ["1.png", "2.png"], "b": ["3.png"]})
    err = cli_error(capsys, base + ["--data", f"imagefolder:{root}", "--n", "5"])
    assert "--n 5: the dataset" in err and "has only 3 images" in err  # not silently "all 3"
    assert not (tmp_path / "c").exists()


def test_cli_texts_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_bytes("a red square\nun carr\xe9 bleu\n".encode("latin-1"))
    err = cli_error(
        capsys,
        ["decompose", "--model", "toy", "--data", "toy", "--texts", str(texts), "--out", str(tmp_path / "c")],
    )
    assert f"{texts} is not UTF-8: line 2, column 8 holds the byte 0xe9" in err
    assert not (tmp_path / "c").exists()


# --- the library: the same rules for every public function -------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(batch_size=0), ValueError, r"batch_size must be an integer >= 1, got 0"),
        (dict(batch_size=2.0), TypeError, r"batch_size must be an integer >= 1, got 2\.0 \(float\)"),
        (dict(batch_size=True), TypeError, r"batch_size must be an integer >= 1, got True \(bool\)"),
        (dict(shard_size=0), ValueError, r"shard_size must be an integer >= 1"),
        (dict(num_workers=-1), ValueError, r"num_workers must be an integer >= 0"),
        (dict(dtype="fp16"), ValueError, r"dtype must be one of 'float16', 'float32'; got 'fp16'"),
        (dict(layers=[1.5]), TypeError, r"layers must be integer layer indices, got \[1\.5\]"),
        (dict(layers=[True]), TypeError, r"layers must be integer layer indices, got \[True\]"),
        (dict(layers="12"), TypeError, r"layers must be a list of layer indices"),
        (dict(layers=[2, -1]), ValueError, r"layers \[2, -1\] name a layer more than once"),
        (dict(layers=[3]), IndexError, r"layers \[3\] out of range: the model has 3 layers"),
        (dict(indices=[0.0, 1.0]), TypeError, r"indices must be integers"),
        (dict(indices=[True, False]), TypeError, r"indices must be integers"),
        (dict(indices=[]), ValueError, r"indices must be a non-empty"),
        (dict(indices="01"), TypeError, r"indices must be a list of dataset positions"),
        (dict(indices=[1, 1]), ValueError, r"indices must be distinct positions in 0\.\.3"),
        (dict(patch_detail="head"), ValueError, r"patch_detail only applies to per-patch maps"),
        (
            dict(patch_detail="pixel", text_directions=torch.randn(2, 24)),
            ValueError,
            r"patch_detail must be one of",
        ),
        (
            dict(text_directions=torch.randn(2, 24), text_labels="ab"),
            TypeError,
            r"text_labels must be a list of strings",
        ),
        (dict(progress="yes"), TypeError, r"progress must be True or False"),
    ],
    ids=[
        "batch-zero",
        "batch-float",
        "batch-bool",
        "shard-zero",
        "workers-negative",
        "dtype-unknown",
        "layers-float",
        "layers-bool",
        "layers-string",
        "layers-repeated",
        "layers-out-of-range",
        "indices-float",
        "indices-bool",
        "indices-empty",
        "indices-string",
        "indices-repeated",
        "patch-detail-without-texts",
        "patch-detail-unknown",
        "labels-string",
        "progress-string",
    ],
)
def test_build_refuses_wrong_types_and_ranges_before_writing(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        DecompositionCache.build(
            tiny_bundle(), ToyDataset(4, preprocess=PREPROCESS), tmp_path / "c", **kwargs
        )
    assert not (tmp_path / "c").exists()


def test_build_refuses_wrong_dataset_and_folder_types(tmp_path):
    with pytest.raises(TypeError, match="dataset must be a DecomposableDataset"):
        DecompositionCache.build(tiny_bundle(), [torch.zeros(3, 32, 32)], tmp_path / "c")
    with pytest.raises(TypeError, match="out_dir must be a folder path"):
        DecompositionCache.build(tiny_bundle(), ToyDataset(2, preprocess=PREPROCESS), None)
    assert not (tmp_path / "c").exists()


def test_decompose_refuses_layers_that_are_not_integers():
    bundle, images = tiny_bundle(), torch.zeros(1, 3, 32, 32)
    for layers, match in (
        ([1.0], "integer layer indices"),
        ([False], "integer layer indices"),
        ("2", "list of layer indices"),
    ):
        with pytest.raises(TypeError, match=match):
            clipdecomp.decompose(bundle, images, layers=layers)
    assert clipdecomp.decompose(bundle, images, layers=[np.int64(2), -2]).head_layers == (
        1,
        2,
    )  # numpy ints are fine


def test_sharded_array_refuses_bool_rows_and_bad_chunk_sizes():
    array = ShardedArray([np.arange(6.0).reshape(3, 2), np.arange(6.0, 10.0).reshape(2, 2)])
    with pytest.raises(TypeError, match="not a bool"):
        array[True]
    for rows, error in ((0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="rows must be an integer >= 1"):
            list(array.chunks(rows))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n=2.5), TypeError, r"n must be an integer >= 1, got 2\.5"),
        (dict(n=True), TypeError, r"n must be an integer >= 1, got True"),
        (dict(n=0), ValueError, r"n must be an integer >= 1, got 0"),
        (dict(n=4, seed=-1), ValueError, r"seed must be an integer >= 0"),
        (dict(n=4, seed=1.5), TypeError, r"seed must be an integer >= 0"),
        (
            dict(n=4, split="test"),
            ValueError,
            r"split must be one of 'train', 'val', 'uniform', 'test_groups'",
        ),
        (dict(n=4, masks="yes"), TypeError, r"masks must be True or False"),
    ],
    ids=["n-float", "n-bool", "n-zero", "seed-negative", "seed-float", "split-unknown", "masks-string"],
)
def test_toy_dataset_refuses_wrong_counts_seeds_and_splits(kwargs, error, match):
    with pytest.raises(error, match=match):
        ToyDataset(preprocess=PREPROCESS, **kwargs)


def test_file_datasets_refuse_wrong_argument_types(tmp_path):
    root = make_folder(tmp_path / "val", {"n01": ["a.png"], "n02": ["b.png"]})
    with pytest.raises(TypeError, match="classes must be a list of strings.*wrap a single name"):
        ImageFolderDataset(root, PREPROCESS, classes="n01", progress=False)
    with pytest.raises(TypeError, match="strict must be True or False"):
        ImageFolderDataset(root, PREPROCESS, strict="no", progress=False)
    with pytest.raises(TypeError, match="root must be the path"):
        ImageFolderDataset(None, PREPROCESS)
    with pytest.raises(TypeError, match="preprocess must turn a PIL image into a tensor"):
        ImageFolderDataset(root, "bilinear")


def test_random_directions_refuse_floats_bools_and_negative_seeds():
    for kwargs, error, match in (
        (dict(n=2.0, dim=4), TypeError, "n must be an integer"),
        (dict(n=3, dim=True), TypeError, "dim must be an integer"),
        (dict(n=3, dim=0), ValueError, "dim must be an integer >= 1"),
        (dict(n=3, dim=4, seed=-2), ValueError, "seed must be an integer >= 0"),
    ):
        with pytest.raises(error, match=match):
            random_directions(**kwargs)


# --- the book runner: selections and dataset locations --------------------------------------------------


def test_runner_only_selection_is_checked_not_read_as_all_or_nothing(tmp_path):
    entries = toc_notebooks(repo_root())
    assert select_chapters(entries, None) == entries
    assert [Path(e).name for e in select_chapters(entries, ["02_"])] == ["02_layer_ablations"]
    with pytest.raises(ValueError, match=r"only=\[\] selects no chapter.*leave it out"):
        select_chapters(entries, [])
    with pytest.raises(ValueError, match=r"only=\[''\] selects no chapter"):
        select_chapters(entries, [""])
    with pytest.raises(
        ValueError, match=r"\['99_nothing'\] match no chapter; the chapters are \[.*02_layer_ablations"
    ):
        select_chapters(entries, ["02_", "99_nothing"])
    with pytest.raises(TypeError, match="only must be a list of strings"):
        select_chapters(entries, "02_")  # would otherwise match the characters '0', '2' and '_'
    with pytest.raises(ValueError, match="match no chapter"):
        execute_notebooks(
            "ci", only=["notebooks"], staging=tmp_path / "src"
        )  # names, not folders, are matched
    assert not (tmp_path / "src").exists()


def test_book_cli_refuses_empty_and_unknown_selections(capsys):
    for args, match in (
        (["execute", "--only"], "expected at least one argument"),
        (["execute", "--only", "zz_"], r"zz_.*match no chapter"),
        (["execute", "--profile", "fast"], "invalid choice: 'fast'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            book_main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and re.search(match, err) and "Traceback" not in err, err


def test_paper_profile_checks_the_kind_of_each_dataset_location(tmp_path, monkeypatch):
    (tmp_path / "val.tar").write_text("an archive, not the extracted folder")
    (tmp_path / "waterbirds").mkdir()
    (tmp_path / "seg").mkdir()
    monkeypatch.setenv("CLIPDECOMP_IMAGENET_VAL", str(tmp_path / "val.tar"))
    monkeypatch.setenv("CLIPDECOMP_WATERBIRDS", str(tmp_path / "waterbirds"))
    monkeypatch.setenv("CLIPDECOMP_IMAGENET_SEG", str(tmp_path / "seg"))
    with pytest.raises(FileNotFoundError) as info:
        execute_notebooks("paper", staging=tmp_path / "src")
    message = str(info.value)
    assert (
        "CLIPDECOMP_IMAGENET_VAL points to" in message and "val.tar, which is a file, not a folder" in message
    )
    assert "waterbirds, which holds no metadata.csv" in message
    assert "seg, which is a folder, not a file" in message
    assert not (tmp_path / "src").exists(), "caught before anything runs or is staged"


# --- messages name the real cause -----------------------------------------------------------------------


@NO_GPU
def test_missing_gpu_is_named_not_blamed_on_the_weights():
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU") as info:
        clipdecomp.load("toy", device="cuda")
    assert "truncated" not in str(info.value) and "corrupt" not in str(info.value)


def test_missing_model_folder_is_named_as_a_path(tmp_path):
    for spec in (str(tmp_path / "nowhere"), "./models/none", "~/no_such_model_folder"):
        with pytest.raises(FileNotFoundError, match="No model folder or checkpoint file at") as info:
            clipdecomp.load(spec)
        assert "'' is not an open_clip architecture" not in str(info.value)
    weights = tmp_path / "weights.safetensors"
    shutil.copy(toy_model_dir() / "open_clip_model.safetensors", weights)
    with pytest.raises(ValueError, match="is a weights file: name its architecture too"):
        clipdecomp.load(str(weights))


def test_missing_checkpoint_is_named_not_an_unknown_tag(tmp_path):
    for spec in (f"ViT-B-32/{tmp_path / 'missing.safetensors'}", "ViT-B-32/missing.safetensors"):
        with pytest.raises(FileNotFoundError, match=r"Checkpoint .*missing\.safetensors does not exist"):
            clipdecomp.load(spec)
    with pytest.raises(
        ValueError, match="Unknown pretrained tag"
    ):  # a real tag-like name still gets the tag list
        clipdecomp.load("ViT-B-32/not_a_tag")


def test_folder_given_as_checkpoint_is_named(tmp_path):
    for spec, checkpoint in (("ViT-B-32", tmp_path), (f"ViT-B-32/{tmp_path}", None)):
        with pytest.raises(IsADirectoryError, match="is a folder, not a weights file.*local-dir"):
            clipdecomp.load(spec, checkpoint=checkpoint)


def test_model_folder_without_config_is_named_not_called_corrupt(tmp_path):
    (tmp_path / "model").mkdir()
    shutil.copy(toy_model_dir() / "open_clip_model.safetensors", tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="has weights but no open_clip_config.json") as info:
        clipdecomp.load(str(tmp_path / "model"))
    assert "corrupt" not in str(info.value)


@pytest.mark.parametrize("kind", ["imagefolder", "waterbirds"])
def test_file_given_as_dataset_root_is_named(tmp_path, kind):
    archive = tmp_path / "dataset.tar.gz"
    archive.write_bytes(b"\x1f\x8b not extracted")
    dataset = ImageFolderDataset if kind == "imagefolder" else WaterbirdsDataset
    with pytest.raises(NotADirectoryError, match=r"dataset\.tar\.gz is a file, not a folder"):
        dataset(archive, PREPROCESS)


def test_folder_whose_images_are_all_unreadable_is_named(tmp_path):
    root = tmp_path / "val"
    (root / "n01").mkdir(parents=True)
    (root / "n01" / "a.jpg").write_text("version https://git-lfs.github.com/spec/v1")  # a Git LFS pointer
    (root / "n01" / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"None of the 2 image files under .* can be read \(n01/a\.jpg: "):
        ImageFolderDataset(root, PREPROCESS, progress=False)


def test_text_pool_that_is_not_utf8_names_file_and_line(tmp_path):
    pool = tmp_path / "pool.txt"
    pool.write_bytes(b"a cat\na dog\nan \xff\xfe owl\n")
    with pytest.raises(
        ValueError, match=r"text pool .*pool\.txt is not UTF-8: line 3, column 4 holds the byte 0xff"
    ):
        load_pool(pool)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_pool(tmp_path)
    with pytest.raises(TypeError, match="pool name"):
        load_pool(["a cat"])


@pytest.mark.parametrize("name", ["parent", "absolute", "symlink"])
def test_waterbirds_metadata_cannot_reach_files_outside_the_root(tmp_path, name):
    save_image(tmp_path / "secret.jpg", 7)
    root = make_waterbirds(tmp_path / "wb", [("001.A/a.jpg", 1, 2, 0), ("001.A/b.jpg", 0, 2, 1)])
    outside = {
        "parent": "../secret.jpg",
        "absolute": str(tmp_path / "secret.jpg"),
        "symlink": "001.A/link.jpg",
    }[name]
    if name == "symlink":
        os.symlink(tmp_path / "secret.jpg", root / "001.A" / "link.jpg")
    metadata = (root / "metadata.csv").read_text()
    (root / "metadata.csv").write_text(metadata.replace("001.A/b.jpg", outside))
    with pytest.raises(ValueError, match=r"metadata\.csv line 3: img_filename .* points outside"):
        WaterbirdsDataset(root, PREPROCESS, progress=False)


def test_waterbirds_metadata_not_utf8_or_repeated_is_named(tmp_path):
    root = make_waterbirds(tmp_path / "wb", [("001.A/a.jpg", 1, 2, 0), ("001.A/b.jpg", 0, 2, 1)])
    metadata = (root / "metadata.csv").read_text()
    (root / "metadata.csv").write_bytes(metadata.replace("001.A/b.jpg", "001.A/b\xe9.jpg").encode("latin-1"))
    with pytest.raises(ValueError, match=r"metadata\.csv is not UTF-8: line 3"):
        WaterbirdsDataset(root, PREPROCESS, progress=False)
    (root / "metadata.csv").write_text(metadata.replace("001.A/b.jpg", "001.A/a.jpg"))
    with pytest.raises(ValueError, match=r"lines 2 and 3 both list '001\.A/a\.jpg'"):
        WaterbirdsDataset(root, PREPROCESS, progress=False)


# --- the record: tests/README.md lists every case and names a real test ---------------------------------


def _test_ids(path: Path) -> dict[str, set[str] | None]:
    """Test functions of a file -> their parametrize ids (None when not parametrized), from the source."""
    found: dict[str, set[str] | None] = {}
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
            continue
        ids: set[str] | None = None
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("parametrize"):
                keyword = {k.arg: k.value for k in decorator.keywords}
                if "ids" in keyword:
                    ids = set(ast.literal_eval(keyword["ids"]))
                    continue
                ids = set()
                for value in decorator.args[1].elts:  # pytest.param(..., id=...) or plain strings
                    if isinstance(value, ast.Call):
                        ids |= {ast.literal_eval(k.value) for k in value.keywords if k.arg == "id"}
                    elif isinstance(value, ast.Constant):
                        ids.add(str(value.value))
        found[node.name] = ids
    return found


def test_fault_table_lists_real_tests_and_every_fault_test():
    table = (TESTS / "README.md").read_text()
    rows = re.findall(r"^\|\s*(\d+)\s*\|([^|]+)\|([^|]+)\|\s*`([^`]+)`\s*\|\s*$", table, flags=re.M)
    assert len(rows) >= 40, (
        f"the table has {len(rows)} rows; it must record at least 40 bad inputs and faults"
    )
    assert [int(number) for number, *_ in rows] == list(range(1, len(rows) + 1)), (
        "rows are numbered 1, 2, 3, ..."
    )
    sources = {name: _test_ids(TESTS / name) for name in {ref.split("::")[0] for *_, ref in rows}}
    named: set[tuple[str, str]] = set()
    for number, fault, expected, ref in rows:
        assert fault.strip() and expected.strip(), (
            f"row {number} must say the input and the expected behaviour"
        )
        match = re.fullmatch(r"(test_\w+\.py)::(test_\w+)(?:\[([\w.-]+)\])?", ref)
        assert match, f"row {number}: {ref!r} is not FILE::TEST or FILE::TEST[ID]"
        file, test, case = match.groups()
        assert test in sources[file], f"row {number}: {file} has no test {test}"
        ids = sources[file][test]
        if case is not None:
            assert ids is not None and case in ids, (
                f"row {number}: {test} has no case [{case}] (cases: {ids})"
            )
        named.add((file, test))
    for file in ("test_faults.py", "test_bad_inputs.py"):
        tests = _test_ids(TESTS / file) if file not in sources else sources[file]
        missing = sorted(name for name in tests if (file, name) not in named)
        assert not missing, f"tests/README.md does not list {file}::{missing}"
