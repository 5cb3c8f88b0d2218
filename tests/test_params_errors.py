"""Every fault a one-line error: parameter types, CLI options, devices, checkpoints, I/O
errors, Ctrl-C, and names that must not break report.md."""

from __future__ import annotations

import builtins
import errno
import os
import re
import resource
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch

from vitxai import cli
from vitxai.cli import main
from vitxai.masks import MaskParams
from vitxai.methods import METHODS, get_method
from vitxai.methods.perturbation import SegmentationParams
from vitxai.models import ModelLoadError, read_state_dict
from vitxai.models.bundled import load_bundled_model
from vitxai.models.loading import resolve_device
from vitxai.report.html import _md_table, write_report
from vitxai.store import METHOD_ROWS

QUICK_RUN = ["compare", "--n-images", "2", "--methods", "attention_rollout", "--no-progress"]
ALL_PARAMS = [(f"{name}.", spec.params) for name, spec in sorted(METHODS.items())]
ALL_PARAMS += [("mask.", MaskParams), ("segmentation.", SegmentationParams)]


def _fields_of(kind: type) -> list[tuple[str, type, str]]:
    """(prefix, dataclass, field) of every field whose annotation is ``kind`` or
    ``kind | None``, or a union holding ``kind`` (``Literal[...] | float``)."""
    out = []
    for prefix, cls in ALL_PARAMS:
        for name, hint in typing.get_type_hints(cls).items():
            if hint is kind or kind in typing.get_args(hint):
                out.append((prefix, cls, name))
    return out


def _make(prefix: str, cls: type, **values):
    if prefix in ("mask.", "segmentation."):
        return cls(**values)
    return get_method(prefix[:-1]).make_params(**values)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitxai: error: "), err
    return lines[0]


# --- parameter types, from the dataclass annotations -----------------------------------------

@pytest.mark.parametrize("value", ["abc", 50.0, 2.5, True, None])
@pytest.mark.parametrize(("prefix", "cls", "name"), _fields_of(int))
def test_integer_parameters_reject_non_integers(prefix, cls, name, value) -> None:
    if value is None and type(None) in typing.get_args(typing.get_type_hints(cls)[name]):
        _make(prefix, cls, **{name: None})  # X | None takes None
        return
    with pytest.raises(ValueError) as info:
        _make(prefix, cls, **{name: value})
    assert str(info.value).startswith(f"parameter {prefix}{name}={value!r} must be an integer")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "abc", True])
@pytest.mark.parametrize(("prefix", "cls", "name"), _fields_of(float))
def test_float_parameters_reject_nan_and_non_numbers(prefix, cls, name, value) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{name}=")) as info:
        _make(prefix, cls, **{name: value})
    assert "\n" not in str(info.value)
    if isinstance(value, float):
        assert str(info.value) == f"parameter {prefix}{name}={value!r} must be a finite number"


def test_nan_inside_a_tuple_parameter_is_named() -> None:
    with pytest.raises(ValueError, match=re.escape("gradient_shap.baseline[1]=nan")):
        get_method("gradient_shap").make_params(baseline=("mean", float("nan")))


@pytest.mark.parametrize(("prefix", "cls", "name"), _fields_of(bool))
def test_bool_parameters_reject_strings_and_ints(prefix, cls, name) -> None:
    for value in ("False", 1):
        with pytest.raises(ValueError, match=re.escape(f"{prefix}{name}={value!r} must be true")):
            _make(prefix, cls, **{name: value})


def test_legitimate_values_still_pass() -> None:
    for prefix, cls in ALL_PARAMS:  # every default
        _make(prefix, cls)
    lime = get_method("lime").make_params(n_samples=np.int64(30), kernel_width=1, alpha=0,
                                          baseline=0, batch_size=None)
    assert (lime.n_samples, lime.kernel_width, lime.baseline) == (30, 1, 0)
    get_method("gradient_shap").make_params(baseline=["mean", 0.5], sigma=0)
    get_method("raw_attention").make_params(head=None, layer=-1)
    assert MaskParams(component_percentile=80, clip_negative=np.bool_(False)).otsu_nbins == 256
    assert SegmentationParams(kernel_size=4, seed=np.int32(3)).seed == 3


def test_cli_values_are_json_or_python_literals() -> None:
    parsed = cli._parse_assignments(["a=50.0", "b=abc", "c=True", "d=None", "e=null",
                                     "f=\"slic\"", "g=[1, 2]"], "--param")
    assert parsed == {"a": 50.0, "b": "abc", "c": True, "d": None, "e": None, "f": "slic",
                      "g": [1, 2]}


@pytest.mark.parametrize(("args", "message"), [
    (["--param", "lime.n_samples=abc"], "parameter lime.n_samples='abc' must be an integer"),
    (["--param", "lime.n_samples=50.0"], "parameter lime.n_samples=50.0 must be an integer"),
    (["--param", "kernel_shap.n_samples=2.5"], "parameter kernel_shap.n_samples=2.5 must be an "
                                               "integer"),
    (["--discard-ratio", "nan"], "parameter attention_rollout.discard_ratio=nan must be a "
                                 "finite number"),
    (["--mask", "otsu_nbins=50.0"], "parameter mask.otsu_nbins=50.0 must be an integer"),
    (["--segmentation", "n_segments=\"abc\""], "parameter segmentation.n_segments='abc' must be "
                                               "an integer"),
    (["--mask", "colour=1"], "--mask has no parameter colour; its parameters are: "
                             "channel_reduce, clip_negative, closing_mode"),
    (["--segmentation", "n_segment=40"], "--segmentation has no parameter n_segment; its "
                                         "parameters are: algorithm, compactness"),
    (["--n-images", "0"], "--n-images must be at least 1; got 0"),
    (["--n-images", "-3"], "--n-images must be at least 1; got -3"),
    (["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
    (["--sanity-images", "-1"], "--sanity-images must be at least 0; got -1"),
    (["--steps", "0"], "--steps must be at least 1; got 0"),
    (["--device", "banana"], "--device banana: not a device name; use cpu, cuda or cuda:N"),
])
def test_cli_argument_errors_are_one_line(args, message, capsys, tmp_path) -> None:
    assert main(["compare", *args, "--out", str(tmp_path / "run")]) == 2
    assert _one_error_line(capsys).startswith(f"vitxai: error: {message}")
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_evaluate_counts_are_checked(capsys, tmp_path) -> None:
    assert main(["evaluate", str(tmp_path), "--steps", "0"]) == 2
    assert _one_error_line(capsys) == "vitxai: error: --steps must be at least 1; got 0"


def _library_strings() -> list[tuple[str, int, str]]:
    """(file, line, text) of every string literal of the library but its docstrings; the
    command line (cli.py) and the training script's own options (train.py) excepted."""
    import ast
    from pathlib import Path

    import vitxai

    root = Path(vitxai.__file__).parent
    out = []
    for path in sorted(root.rglob("*.py")):
        if path.name in ("cli.py", "train.py"):
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef
                              | ast.AsyncFunctionDef)
                and n.body and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)}
        out += [(path.name, n.lineno, n.value) for n in ast.walk(tree)
                if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and id(n) not in docs]
    return out


def test_library_names_parameters_not_options() -> None:
    option = re.compile(r"(?<![\w-])--[a-z]")
    assert [s for s in _library_strings() if option.search(s[2])] == []


@pytest.mark.parametrize(("library", "command_line"), [
    ("device='cuda': CUDA is not available on this machine; use device='cpu'",
     "--device cuda: CUDA is not available on this machine; use --device cpu"),
    ("idx_sample_img=7 is outside the dataset [0, 3)",
     "--idx_sample_img 7 is outside the dataset [0, 3)"),
    ("r has no saved maps; rerun the comparison with save_attr_maps=True",
     "r has no saved maps; rerun the comparison with --save_attr_maps"),
    ("or skip its images with allow_missing=True", "or skip its images with --allow-missing"),
    ("pass a local weights file as checkpoint=PATH, or load random weights with "
     "pretrained=False", "pass a local weights file as --checkpoint PATH, or load random "
     "weights with --random-weights"),
    ("download it with vitxai.data.download_imagenette(root='d', variant='320')",
     "download it with vitxai data imagenette --variant 320 --root d"),
    ("parameter lime.device=1 and lime.precision=2 stay",
     "parameter lime.device=1 and lime.precision=2 stay"),
])
def test_cli_words_library_errors_as_options(library, command_line) -> None:
    assert cli._cli_wording(library) == command_line


def test_out_of_range_sample_image_names_the_option(capsys, tmp_path) -> None:
    from vitxai.compare import CompareSettings, compare
    from vitxai.data.synthetic import SyntheticBenchmark

    adapter, data = load_bundled_model(), SyntheticBenchmark(size=2)
    settings = CompareSettings(methods=["rollout"], idx_sample_img=5)
    with pytest.raises(ValueError, match=r"^idx_sample_img=5 is outside the dataset \[0, 2\)"):
        compare(adapter, data, tmp_path / "lib", settings, progress=False)
    assert main([*QUICK_RUN, "--idx_sample_img", "5", "--out", str(tmp_path / "cli")]) == 2
    assert _one_error_line(capsys) == ("vitxai: error: --idx_sample_img 5 is outside the "
                                       "dataset [0, 2)")


# --- devices and checkpoints ------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys) -> None:
    with pytest.raises(ValueError, match="CUDA is not available on this machine; use device='cpu'"):
        load_bundled_model(device="cuda")
    assert main([*QUICK_RUN, "--device", "cuda"]) == 2
    assert _one_error_line(capsys) == ("vitxai: error: --device cuda: CUDA is not available on "
                                       "this machine; use --device cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_missing_cuda_index_is_one_line() -> None:
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="this machine has"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_malformed_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("banana", "", "cuda:-1"):
        with pytest.raises(ValueError, match="not a device name"):
            resolve_device(bad)


class _Payload:
    """Any class: torch.save pickles it, torch.load(weights_only=True) refuses it."""


@pytest.mark.parametrize("content", ["pickled_object", "garbage", "empty"])
def test_refused_checkpoints_never_suggest_weights_only_false(tmp_path, content) -> None:
    path = tmp_path / "w.pt"
    if content == "pickled_object":
        torch.save({"w": torch.zeros(2), "extra": _Payload()}, path)
    else:
        path.write_bytes(b"garbage" * 10 if content == "garbage" else b"")
    with pytest.raises(ModelLoadError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "weights_only" not in message
    if content != "empty":
        assert "convert it to safetensors" in message


def test_checkpoint_directory_and_pickle_via_cli(tmp_path, capsys) -> None:
    base = ["compare", "--model", "vit_tiny_patch16_224", "--n-images", "2", "--no-progress",
            "--out", str(tmp_path / "run")]
    assert main([*base, "--checkpoint", str(tmp_path)]) == 2
    assert _one_error_line(capsys) == (f"vitxai: error: checkpoint {tmp_path} is a directory; "
                                       "pass the weights file in it (.safetensors or torch file)")
    torch.save({"extra": _Payload()}, tmp_path / "w.pt")
    assert main([*base, "--checkpoint", str(tmp_path / "w.pt")]) == 2
    line = _one_error_line(capsys)
    assert "convert it to safetensors" in line and "weights_only" not in line


# --- environmental errors: one line naming the file, exit 1 -----------------------------------

def test_out_below_a_regular_file(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    assert main([*QUICK_RUN, "--out", str(out)]) == 1
    assert _one_error_line(capsys) == f"vitxai: error: cannot create {out}: Not a directory"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_names_the_file(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / METHOD_ROWS).symlink_to("/dev/full")  # every write to it fails with ENOSPC
    assert main([*QUICK_RUN, "--out", str(out)]) == 1
    assert _one_error_line(capsys) == (f"vitxai: error: cannot write {out / METHOD_ROWS}: "
                                       "No space left on device")


@pytest.mark.parametrize(("limit", "extra", "file"), [
    (1000, [], "config.json"),  # a JSON write
    (200_000, ["--save_attr_maps"], "batch_000000.safetensors"),  # safetensors' own writer
])
def test_file_size_limit_is_one_line_not_a_kill(tmp_path, limit, extra, file) -> None:
    """Past RLIMIT_FSIZE the kernel sends SIGXFSZ, which kills silently unless ignored."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "vitxai.cli", *QUICK_RUN, *extra, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert re.fullmatch(rf"vitxai: error: cannot write {re.escape(str(out))}/\S*"
                        rf"{re.escape(file)}: File too large", line), line  # not its .tmp


def _fail_with(error: BaseException):
    def command(args) -> int:
        raise error
    return command


@pytest.mark.parametrize(("error", "line", "code"), [
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "runs/x"),
     "cannot write runs/x: Read-only file system", 1),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "runs/x/manifest.json"),
     "cannot open runs/x/manifest.json: Permission denied", 1),
    (FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), "runs/x"),
     "cannot create runs/x: File exists", 1),
    (FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "img.png"),
     "cannot open img.png: No such file or directory", 2),
    (FileNotFoundError("runs/x is not a run directory"), "runs/x is not a run directory", 2),
])
def test_oserrors_are_one_line(monkeypatch, capsys, error, line, code) -> None:
    monkeypatch.setattr(cli, "cmd_methods", _fail_with(error))
    assert main(["methods"]) == code
    assert _one_error_line(capsys) == f"vitxai: error: {line}"


def test_failed_write_names_its_open_file(monkeypatch, capsys, tmp_path) -> None:
    """write() errors carry no file name; the open file in the failing frame gives it."""
    def command(args) -> int:
        with open(tmp_path / "rows.csv", "a") as f:
            f.write("row\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a full disk's flush
    monkeypatch.setattr(cli, "cmd_methods", command)
    assert main(["methods"]) == 1
    assert _one_error_line(capsys) == (f"vitxai: error: cannot write {tmp_path / 'rows.csv'}: "
                                       "No space left on device")


def test_corrupt_safetensors_is_one_line(monkeypatch, capsys, tmp_path) -> None:
    from safetensors.torch import load_file

    bad = tmp_path / "batch_000000.safetensors"
    bad.write_bytes(b"garbage" * 10)
    monkeypatch.setattr(cli, "cmd_methods", lambda args: load_file(str(bad)))
    assert main(["methods"]) == 1
    assert _one_error_line(capsys) == f"vitxai: error: cannot read {bad}: header too large"


# --- Ctrl-C -----------------------------------------------------------------------------------

INTERRUPTED = ("vitxai: interrupted; finished batches are saved, rerun the same command to "
               "resume")


def test_ctrl_c_inside_a_command(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "cmd_methods", _fail_with(KeyboardInterrupt()))
    assert main(["methods"]) == 130
    assert capsys.readouterr().err.splitlines() == [INTERRUPTED]


def test_ctrl_c_while_importing_torch(monkeypatch, capsys) -> None:
    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "torch":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    assert main(["methods"]) == 130
    assert capsys.readouterr().err.splitlines() == [INTERRUPTED]


def _run_with_sigint(trigger: str) -> subprocess.CompletedProcess:
    """Run ``main(['methods'])`` in a fresh interpreter, a real SIGINT sent at ``trigger``."""
    code = ("import os, signal, sys\n"
            "from vitxai.cli import main\n" + trigger + "sys.exit(main(['methods']))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("module", ["datetime", "torch", "safetensors", "timm"])
def test_real_sigint_while_importing(module: str) -> None:
    """A real SIGINT sent from an import hook the moment ``main`` imports ``module``, whatever
    the machine's speed. For ``datetime`` it lands inside numpy's C import, which turns it
    into an ImportError with a page of advice: still one line and 130."""
    trigger = ("class Interrupt:\n"
               "    def find_spec(self, name, path, target=None):\n"
               f"        if name == {module!r}:\n"
               "            print('sent', flush=True)\n"
               "            sys.meta_path.remove(self)\n"
               "            os.kill(os.getpid(), signal.SIGINT)\n"
               "sys.meta_path.insert(0, Interrupt())\n"
               f"assert {module!r} not in sys.modules\n")
    done = _run_with_sigint(trigger)
    assert done.stdout.splitlines()[:1] == ["sent"], done.stderr  # the hook did fire
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == [INTERRUPTED]


def test_real_sigint_at_start_up() -> None:
    """SIGINT 50 ms into main(), from a kernel timer (it fires on time however busy the
    interpreter is), while torch and timm are still being imported."""
    trigger = ("signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))\n"
               "signal.setitimer(signal.ITIMER_REAL, 0.05)\n")
    done = _run_with_sigint(trigger)
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == [INTERRUPTED]


# --- report.md escapes names like report.html ---------------------------------------------------

HOSTILE = "a|b *c* _d_ <script>x</script> `e`\n| f [g](h) \\"


def _cells(line: str) -> int:
    """Number of cells of a Markdown table row as GitHub splits it (escaped pipes kept)."""
    return re.sub(r"\\.", "", line).count("|") - 1


def test_md_table_escapes_hostile_names() -> None:
    table = _md_table(["method", HOSTILE], [[HOSTILE, "1.0"], ["ok", HOSTILE]])
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, two rows: the newline did not split a row
    assert all(_cells(line) == 2 for line in lines if not line.startswith("|-"))
    assert "<script>" not in table and "&lt;script&gt;" in table
    assert "\\*c\\*" in table and "\\_d\\_" in table and "\\`e\\`" in table
    assert "\\[g\\](h)" in table  # no link


def test_report_md_escapes_the_run_name(tmp_path) -> None:
    out = tmp_path / "run <b>x *bold* _it_ `code` | y"
    assert main([*QUICK_RUN, "--out", str(out)]) == 0
    _, md_path = write_report(out)
    md = md_path.read_text()
    assert md.splitlines()[0] == ("# vitxai report: run &lt;b&gt;x \\*bold\\* \\_it\\_ "
                                  "\\`code\\` \\| y")
    assert "<b>" not in md
    for block in md.split("\n\n"):  # every table keeps one cell count per row
        rows = [ln for ln in block.splitlines() if ln.startswith("|") and not ln.startswith("|-")]
        assert len({_cells(r) for r in rows}) <= 1, block

