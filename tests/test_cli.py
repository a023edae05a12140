"""The CLI end to end on a small model: build an engine, segment real MNI crops, evaluate; the
help examples parse; every failure leaves through the one error boundary with its exit code."""

import errno
import os
import re
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import click
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from tests.conftest import written
from nnslim.compiler.cli.boundary import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, NnslimGroup, translate
from nnslim.compiler.cli.options import fold_names

COMMANDS = ["prepare-dataset", "train", "build-engine", "infer", "evaluate", "inspect", "prune-sweep", "export-triton",
            "pseudo-label", "bench"]
NNSLIM = Path(sys.executable).with_name("nnslim")
FILE_SUFFIXES = (".pt", ".pt2", ".pth", ".nii", ".nii.gz", ".onnx", ".json", ".pkl")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def help_examples(help_text: str) -> list[list[str]]:
    """The example invocations in a --help text, as argument lists after `nnslim` (line
    continuations joined; `torchrun ... .venv/bin/nnslim train ...` counts from `nnslim`)."""
    _, found, tail = help_text.partition("Example")
    body = tail.split("Exit codes:")[0] if found else ""
    examples = []
    for line in re.sub(r"\\\n\s*", " ", body).splitlines():
        tokens = shlex.split(line)
        start = next((i for i, t in enumerate(tokens) if t == "nnslim" or t.endswith("/nnslim")), None)
        if start is not None:
            examples.append(tokens[start + 1:])
    return examples


def materialize_paths(args: list[str], root: Path) -> list[str]:
    """Create the files and folders an example names under `root` (absolute ones too), so that
    click's existence checks pass and the parse tests the invocation itself."""
    out = []
    for arg in args:
        if arg.startswith("-") or not ("/" in arg or arg.endswith(FILE_SUFFIXES)):
            out.append(arg)
            continue
        path = root / arg.lstrip("/")
        if arg.endswith(FILE_SUFFIXES):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
        out.append(str(path) if arg.startswith("/") else arg)  # relative paths: the test runs in `root`
    return out


def parse_example(args: list[str], root: Path) -> click.Context:
    """Parse one example as click would run it, without running it."""
    name, *rest = materialize_paths(args, root)
    command = cli.get_command(click.Context(cli), name)
    assert command is not None, f"example names an unknown command: nnslim {shlex.join(args)}"
    return command.make_context(name, rest)


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help_shows_real_examples_that_parse(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*command, "--help")
    assert result.exit_code == 0
    examples = help_examples(result.output)
    assert examples, f"nnslim {' '.join(command)} --help shows no example invocation"
    for args in examples:
        assert not command or args[0] == command[0], f"{command[0]}'s --help shows an example of {args[0]}"
        try:
            parse_example(args, tmp_path)
        except click.ClickException as exc:
            pytest.fail(f"example `nnslim {shlex.join(args)}` does not parse: {exc.format_message()}")


def test_help_example_parser_rejects_a_broken_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (example,) = help_examples("Examples:\n  nnslim infer engine/ scan.nii.gz -o seg.nii.gz --no-such-flag\n")
    with pytest.raises(click.NoSuchOption):
        parse_example(example, tmp_path)


@pytest.mark.parametrize("form", [["0", "1", "2"], ["0,1,2"], ["0", "1,2"], ["0,", "1", "2"]])
def test_build_engine_folds_accepts_spaces_and_commas(form, checkpoint_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    context = parse_example(["build-engine", str(checkpoint_path), "--folds", *form, "--out", "e"], tmp_path)
    assert fold_names(context.params["folds"]) == ("0", "1", "2")
    assert context.params["out_dir"] == Path("e")
    context = parse_example(["build-engine", str(checkpoint_path), "--folds=0,1,2", "--out", "e"], tmp_path)
    assert fold_names(context.params["folds"]) == ("0", "1", "2")
    context = parse_example(["build-engine", str(checkpoint_path), "--out", "e", "--folds", "all"], tmp_path)
    assert fold_names(context.params["folds"]) == ("all",)


def test_a_list_option_without_a_value_is_a_usage_error(checkpoint_path):
    result = run("build-engine", checkpoint_path, "--out", "e", "--folds")
    assert result.exit_code == 2 and "--folds" in result.output


def test_library_errors_are_one_line_exit_1(mni_raw, tmp_path):
    """Issue 15's example: an impossible FasterFusion threshold used to end in a traceback."""
    result = run("train", "--preset", "tiny", "--fusion-threshold", "8", "--dataset", mni_raw, "--out", tmp_path / "r",
                 "--epochs", "1", "--iterations-per-epoch", "1", "--no-progress")
    assert result.exit_code == EXIT_USER_ERROR, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: FasterFusionBlock") and "in_channels must be divisible by 4" in lines[0]


def test_expected_os_errors_name_the_path_and_the_fix():
    message = translate(OSError(errno.ENOSPC, "No space left on device", "/data/out/seg.nii.gz"), verbose=0)
    assert message.exit_code == EXIT_USER_ERROR
    assert "/data/out/seg.nii.gz" in message.format_message() and "disk is full" in message.format_message()
    for code in (errno.EROFS, errno.EACCES, errno.EISDIR, errno.EFBIG):
        assert translate(OSError(code, os.strerror(code), "/x"), verbose=0).exit_code == EXIT_USER_ERROR
    unexpected = translate(OSError(errno.ECONNREFUSED, "Connection refused"), verbose=0)
    assert unexpected.exit_code == EXIT_INTERNAL_ERROR


def _group_that_fails(error: Exception) -> click.Group:
    @click.group(cls=NnslimGroup)
    @click.option("-v", "--verbose", count=True)
    def group(verbose):
        pass

    @group.command()
    def fail():
        raise error

    return group


def test_unexpected_exceptions_are_internal_errors_exit_3_with_a_traceback_on_v():
    group = _group_that_fails(ZeroDivisionError("division by zero in the planner"))
    result = CliRunner().invoke(group, ["fail"])
    assert result.exit_code == EXIT_INTERNAL_ERROR
    assert "internal error: ZeroDivisionError: division by zero in the planner" in result.output
    assert "run with -v" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(group, ["-v", "fail"])
    assert result.exit_code == EXIT_INTERNAL_ERROR
    assert "Traceback" in result.output and "internal error: ZeroDivisionError" in result.output


def test_error_boundary_in_a_real_process(mni_raw, tmp_path):
    """The installed `nnslim` script: a library error and a file-size limit (EFBIG from a
    `ulimit -f` in the child) each end in one line on stderr and exit code 1."""
    done = subprocess.run([NNSLIM, "train", "--preset", "tiny", "--fusion-threshold", "8", "--dataset", mni_raw,
                           "--out", tmp_path / "r", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    assert done.stderr.startswith("error: FasterFusionBlock") and len(done.stderr.strip().splitlines()) == 1

    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / f"{name}.nii.gz")

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))

    done = subprocess.run([NNSLIM, "evaluate", tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", "--json", tmp_path / "d.json"],
                          capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    assert done.stderr.startswith("error: ") and "[EFBIG]" in done.stderr and "ulimit -f" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("d.", ".d"))) == []  # no litter


def test_build_infer_evaluate(checkpoint_path, small_volume, tmp_path):
    engine = tmp_path / "engine"
    result = run("build-engine", checkpoint_path, "--out", engine, "--parity-volume", small_volume, "--batch", "3",
                 "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert "argmax agreement" in result.output

    seg = tmp_path / "seg.nii.gz"
    result = run("infer", engine, small_volume, "-o", seg, "--no-progress")
    assert result.exit_code == 0, result.output
    written, source = nib.load(seg), nib.load(small_volume)
    assert written.shape == source.shape == (37, 41, 29)
    np.testing.assert_array_equal(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}

    seg_torch = tmp_path / "seg_torch.nii.gz"
    result = run("infer", engine, small_volume, "-o", seg_torch, "--torch-checkpoint", checkpoint_path, "--no-progress")
    assert result.exit_code == 0, result.output
    result = run("evaluate", seg, seg_torch, "--labels-from", engine, "--json", tmp_path / "parity.json")
    assert result.exit_code == 0, result.output
    import json

    figures = json.loads((tmp_path / "parity.json").read_text())
    assert figures["agreement"] >= 0.999  # ONNX Runtime engine vs PyTorch over the whole volume


def test_mirror_and_folder_input(engine_dir, small_volume, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    image = nib.load(small_volume)
    nib.save(image, folder / "a_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:10, :12, :8], image.affine), folder / "tiny_0000.nii.gz")
    result = run("infer", engine_dir, folder, "-o", tmp_path / "out", "--tta", "--no-progress")
    assert result.exit_code == 0, result.output
    assert nib.load(tmp_path / "out" / "a.nii.gz").shape == (37, 41, 29)
    assert nib.load(tmp_path / "out" / "tiny.nii.gz").shape == (10, 12, 8)  # smaller than the patch: padded


def test_bad_inputs_give_one_clear_error(engine_dir, checkpoint_path, tmp_path):
    nan = np.ones((20, 20, 20), dtype=np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    result = run("infer", engine_dir, tmp_path / "nan.nii.gz", "-o", tmp_path / "o.nii.gz")
    assert result.exit_code == 1 and "NaN" in result.output
    assert not (tmp_path / "o.nii.gz").exists()

    nib.save(nib.Nifti1Image(np.ones((20, 20, 20, 2), np.float32), np.eye(4)), tmp_path / "two.nii.gz")
    result = run("infer", engine_dir, tmp_path / "two.nii.gz", "-o", tmp_path / "o.nii.gz")
    assert result.exit_code == 1 and "gives 2 channel(s) but the model expects 1" in result.output

    result = run("infer", engine_dir, tmp_path / "missing.nii.gz", "-o", tmp_path / "o.nii.gz")
    assert result.exit_code == 2 and "does not exist" in result.output

    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(checkpoint_path.read_bytes()[:4096])
    result = run("build-engine", truncated, "--out", tmp_path / "e")
    assert result.exit_code == 1 and "truncated, corrupt" in result.output
    assert not (tmp_path / "e").exists()

    result = run("build-engine", checkpoint_path, "--out", tmp_path / "e", "--backend", "tensorrt")
    assert result.exit_code == 1 and "--backend onnxruntime" in result.output


def test_build_engine_prunes_after_fusing(checkpoint_path, small_volume, tmp_path):
    import json

    result = run("build-engine", checkpoint_path, "--out", tmp_path / "p", "--prune-sparsity", "0.7")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    names = [s["name"] for s in manifest["stages"]]
    assert names.index("reparameterize") < names.index("prune") < names.index("export")
    assert manifest["model"]["conv_weight_sparsity"] == pytest.approx(0.7, abs=0.01)
    size = manifest["model"]["runtime_model_size"]
    assert size["compressed_bytes"] < 0.6 * size["bytes"]  # zeros compress
    assert "conv sparsity     70" in run("inspect", tmp_path / "p").output

    result = run("build-engine", checkpoint_path, "--out", tmp_path / "s", "--prune-structured", "0.5",
                 "--finetune-steps", "2", "--finetune-dataset", "mni-tissue")
    assert result.exit_code == 0, result.output
    pruning = json.loads((tmp_path / "s" / "manifest.json").read_text())["model"]["pruning"]
    assert pruning["structured"]["widths_after"]["encoder.stages.2.0.convs.1"] == 8
    assert pruning["finetune"]["steps"] == 2

    result = run("build-engine", checkpoint_path, "--out", tmp_path / "x", "--prune-sparsity", "0.5", "--prune-threshold", "0.1")
    assert result.exit_code == 2 and "alternatives" in result.output
    result = run("build-engine", checkpoint_path, "--out", tmp_path / "x", "--finetune-steps", "3")
    assert result.exit_code == 2 and "needs --prune-structured" in result.output


def test_prune_sweep_cli(checkpoint_path, small_volume, tmp_path):
    result = run("prune-sweep", checkpoint_path, "--volume", small_volume, "--sparsities", "0,0.5",
                 "--out", tmp_path / "sweep", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "largest sparsity at proxy Dice >= 0.95" in result.output
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    result = run("prune-sweep", checkpoint_path, "--volume", small_volume, "--sparsities", "a,b", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "comma-separated" in result.output


def test_train_command_writes_a_checkpoint_build_engine_accepts(mni_raw, tmp_path):
    result = run("train", "--preset", "tiny", "--dataset", mni_raw, "--out", tmp_path / "run", "--epochs", "1",
                 "--iterations-per-epoch", "2", "--patch", "32", "32", "32", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoint_final.pt").is_file() and (tmp_path / "run" / "history.json").is_file()
    result = run("train", "--preset", "nope", "--dataset", mni_raw, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "nope" in result.output
    result = run("train", "--preset", "tiny", "--dataset", tmp_path / "missing", "--out", tmp_path / "x")
    assert result.exit_code == 1 and "no such folder" in result.output


def test_help_does_not_import_torch():
    """Heavy imports happen inside the commands, so `nnslim --help` is instant."""
    probe = "import sys, nnslim.compiler.cli; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_nnslim_error_class_derives_from_nnslim_error():
    """The boundary reports `NnslimError`s as user errors; an error class outside that tree would
    surface as an internal error. Checked on the source: every class named *Error in compiler/ and
    training/ and nnslim/ (the CLI's own report classes aside) has NnslimError among its ancestors (by name, through other such classes)."""
    import ast

    root = Path(__file__).resolve().parent.parent
    bases: dict[str, list[str]] = {}
    sources = [*(root / "compiler").rglob("*.py"), *(root / "training").rglob("*.py"), *(root / "nnslim").rglob("*.py")]
    for path in [p for p in sources if "cli" not in p.relative_to(root).parts]:  # the boundary's own reports
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                bases[f"{path.relative_to(root)}:{node.name}"] = [
                    b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))]
    by_name = {key.rsplit(":", 1)[1]: value for key, value in bases.items()}

    def reaches(name: str, seen=()) -> bool:
        return name == "NnslimError" or any(
            b not in seen and b in by_name and reaches(b, (*seen, b)) or b == "NnslimError" for b in by_name.get(name, []))

    outside = sorted(key for key, value in bases.items() if key.rsplit(":", 1)[1] != "NnslimError"
                     and not reaches(key.rsplit(":", 1)[1]))
    assert len(bases) > 10 and not outside, outside


def test_a_corrupt_case_in_a_folder_is_reported_and_the_others_are_written(engine_dir, small_volume, tmp_path):
    from nnslim.compiler.cli.boundary import EXIT_SOME_CASES_FAILED

    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a", "c"):
        (cases / f"{name}_0000.nii.gz").write_bytes(small_volume.read_bytes())
    (cases / "b_0000.nii.gz").write_bytes(small_volume.read_bytes()[:300])  # truncated gzip: unreadable
    out = tmp_path / "segs"
    lines = []
    result = CliRunner().invoke(cli, ["infer", str(engine_dir), str(cases), "-o", str(out), "--no-progress"])
    lines = result.output.splitlines()
    assert result.exit_code == EXIT_SOME_CASES_FAILED, result.output
    assert written(out) == ["a.nii.gz", "c.nii.gz"]  # nothing for b, nothing else
    assert any(line.startswith("b") and "FAILED" in line for line in lines), result.output
    assert "1 of 3 case(s) failed: b" in result.output and "Traceback" not in result.output
    # a second run with --continue skips the finished cases and fails b again, nothing else
    again = CliRunner().invoke(cli, ["infer", str(engine_dir), str(cases), "-o", str(out), "--no-progress", "--continue"])
    assert again.exit_code == EXIT_SOME_CASES_FAILED and "1 of 1 case(s) failed: b" in again.output, again.output


def test_six_cases_in_two_parts_with_a_corrupt_one_and_an_interrupt(engine_dir, small_volume, tmp_path):
    """Issue 16's acceptance run: 6 cases, one corrupt, 2 parts; part 1 was interrupted after one case
    (its output written, a partial temporary of a dead process left beside it) and is resumed with
    --continue. Ends with 5 outputs, one reported failure, exit code 4, and no litter."""
    from nnslim.compiler.cli.boundary import EXIT_SOME_CASES_FAILED

    cases, out = tmp_path / "cases", tmp_path / "segs"
    cases.mkdir()
    names = [f"case{i}" for i in range(6)]
    for name in names:
        (cases / f"{name}_0000.nii.gz").write_bytes(small_volume.read_bytes())
    (cases / "case3_0000.nii.gz").write_bytes(small_volume.read_bytes()[:200])  # corrupt; part 1 = case1, 3, 5

    def infer(*extra):
        return CliRunner().invoke(cli, ["infer", str(engine_dir), str(cases), "-o", str(out), "--no-progress",
                                        "--num-parts", "2", *extra])

    part0 = infer("--part-id", "0")
    assert part0.exit_code == 0, part0.output
    assert written(out) == ["case0.nii.gz", "case2.nii.gz", "case4.nii.gz"]
    # the interrupted part 1: case1 finished, case5's writer was killed mid-write (SIGKILL: no cleanup ran)
    from tests.nnslim.test_files import killed_writer

    (out / "case1.nii.gz").write_bytes((out / "case0.nii.gz").read_bytes())
    killed_writer(out, "case5.nii.gz")
    resumed = infer("--part-id", "1", "--continue")
    assert resumed.exit_code == EXIT_SOME_CASES_FAILED, resumed.output
    assert "1 of 2 case(s) failed: case3" in resumed.output  # case1 skipped, case5 written, case3 reported
    assert written(out) == [f"case{i}.nii.gz" for i in (0, 1, 2, 4, 5)]
    bad = CliRunner().invoke(cli, ["infer", str(engine_dir), str(cases), "-o", str(out), "--num-parts", "2",
                                   "--part-id", "2"])
    assert bad.exit_code == 2 and "--part-id" in bad.output, bad.output
