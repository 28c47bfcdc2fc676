"""`dlrun-predict` on inputs it cannot use: one line on stderr that names the file and the problem,
exit status 1 (2 for a bad --topk, from argparse), never a traceback; and the inputs it converts.

Every case runs the command as typed (in this process, through `cli`) on one shared trained run
(digits, whose inputs are (1, 8, 8)), so what is checked is what a user sees; one case runs the
installed console script, for what only a process shows (its stderr and exit status as a whole).
"""

from __future__ import annotations

import builtins
import pickle
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CPU, DLRUN

DLRUN_PREDICT = str(Path(DLRUN).with_name("dlrun-predict"))
SHAPE = (1, 8, 8)  # the digits dataset's input shape
HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # by Python's default filters


@pytest.fixture
def run_dir(trained) -> Path:
    """The session's shared run: an epoch on digits."""
    return trained("trainer.epochs=1", *CPU)


class Payload:
    """Unpickling this calls open(path, "w"), which creates `path`: the file must never appear."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


# ---- the inputs: each writer makes one file in `d` and returns its path ----

def text_as_png(d: Path) -> Path:
    (p := d / "x.png").write_text("this is text, not an image\n")
    return p


def empty_png(d: Path) -> Path:
    (p := d / "empty.png").write_bytes(b"")
    return p


def truncated_png(d: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(d / "full.png")
    (p := d / "truncated.png").write_bytes((d / "full.png").read_bytes()[:200])
    return p


def huge_png(d: Path) -> Path:
    """A real, valid 14000x14000 PNG (196 megapixels, over twice PIL's MAX_IMAGE_PIXELS, so PIL
    raises DecompressionBombError before decoding). Mode "1" (1 bit per pixel) makes it cheap: a
    24 MB buffer in memory, ~24 KB on disk, about half a second to write."""
    from PIL import Image

    p = d / "huge.png"
    start = time.perf_counter()
    Image.new("1", (14000, 14000)).save(p)
    assert p.stat().st_size < 100_000 and time.perf_counter() - start < 10
    return p


def empty_pt(d: Path) -> Path:
    (p := d / "empty.pt").write_bytes(b"")
    return p


def empty_npy(d: Path) -> Path:
    (p := d / "empty.npy").write_bytes(b"")
    return p


def dict_pt(d: Path) -> Path:
    torch.save({"x": torch.zeros(2, *SHAPE)}, p := d / "dict.pt")
    return p


def list_pt(d: Path) -> Path:
    torch.save([torch.zeros(2, *SHAPE)], p := d / "list.pt")
    return p


def strings_npy(d: Path) -> Path:
    np.save(p := d / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    return p


def object_npy(d: Path) -> Path:
    np.save(p := d / "object.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    return p


def datetime_npy(d: Path) -> Path:
    np.save(p := d / "datetime.npy", np.zeros((2, *SHAPE), dtype="datetime64[s]"))
    return p


def npz_as_npy(d: Path) -> Path:
    with open(p := d / "arrays.npy", "wb") as f:
        np.savez(f, x=np.zeros((2, *SHAPE), np.float32))
    return p


def text_as_npy(d: Path) -> Path:
    (p := d / "text.npy").write_text("0 1 2 3\n")
    return p


def payload_pt(d: Path) -> Path:
    """A torch.save zip file whose pickle would create `d/SENTINEL` if it were unpickled unsafely."""
    torch.save(Payload(d / "SENTINEL"), p := d / "payload.pt")
    return p


def payload_raw_pickle_pt(d: Path) -> Path:
    """The same payload as a bare pickle stream (torch's legacy, non-zip format)."""
    (p := d / "pickle.pt").write_bytes(pickle.dumps(Payload(d / "SENTINEL")))
    return p


def garbage_pt(d: Path) -> Path:
    (p := d / "garbage.pt").write_bytes(b"\x00\x01 neither a zip file nor a pickle")
    return p


def complex_pt(d: Path) -> Path:
    torch.save(torch.ones(2, *SHAPE, dtype=torch.complex64), p := d / "complex.pt")
    return p


def sparse_pt(d: Path) -> Path:
    torch.save(torch.ones(2, *SHAPE).to_sparse(), p := d / "sparse.pt")
    return p


def meta_pt(d: Path) -> Path:
    torch.save(torch.empty(2, *SHAPE, device="meta"), p := d / "meta.pt")
    return p


def nan_pt(d: Path) -> Path:
    x = torch.zeros(3, *SHAPE)
    x[1, 0, 2, 2] = float("nan")
    torch.save(x, p := d / "nan.pt")
    return p


def inf_npy(d: Path) -> Path:
    x = np.zeros((3, *SHAPE), np.float32)
    x[2, 0, 0, 0] = -np.inf
    np.save(p := d / "inf.npy", x)
    return p


def float64_overflow_npy(d: Path) -> Path:
    """Finite as float64, infinite as the float32 the model takes."""
    np.save(p := d / "overflow.npy", np.full((1, *SHAPE), 1e300))
    return p


def no_samples_pt(d: Path) -> Path:
    torch.save(torch.zeros(0, *SHAPE), p := d / "none.pt")
    return p


def wrong_shape_pt(d: Path) -> Path:
    torch.save(torch.zeros(2, 3, 3), p := d / "wrong.pt")
    return p


ERRORS = {  # writer: what the one line must say besides the file's name
    text_as_png: "not an image",
    empty_png: "the file is empty",
    truncated_png: "cannot be decoded",
    huge_png: "too large to decode safely",
    empty_pt: "the file is empty",
    empty_npy: "the file is empty",
    dict_pt: "holds a dict, not a tensor",
    list_pt: "holds a list, not a tensor",
    strings_npy: "holds strings",
    object_npy: "holds Python objects",
    datetime_npy: "holds datetimes",
    npz_as_npy: ".npz archive",
    text_as_npy: "not a .npy file",
    payload_pt: "not a tensor file that can be loaded safely",
    payload_raw_pickle_pt: "not a tensor file that can be loaded safely",
    garbage_pt: "not a tensor file that can be loaded safely",
    complex_pt: "complex",
    sparse_pt: "sparse",
    meta_pt: "no data",
    nan_pt: "NaN or infinite values (sample 1)",
    inf_npy: "NaN or infinite values (sample 2)",
    float64_overflow_npy: "values beyond float32's range (sample 0)",
    no_samples_pt: "no samples",
    wrong_shape_pt: "shape (2, 3, 3), expected (N, 1, 8, 8)",
}


def shown_warnings(recwarn) -> list[str]:
    """The warnings a process would have printed on its stderr (pytest records them instead)."""
    return [str(w.message) for w in recwarn if not issubclass(w.category, HIDDEN)]


def one_error_line(ran, recwarn) -> str:
    assert "Traceback" not in ran.stderr and not shown_warnings(recwarn), (ran.stderr, shown_warnings(recwarn))
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, ran.stderr
    assert lines[0].startswith("dlrun-predict: error: "), ran.stderr
    return lines[0]


@pytest.mark.parametrize("write", ERRORS, ids=lambda w: w.__name__)
def test_unusable_input_is_one_line_naming_the_file(cli, run_dir, tmp_path, recwarn, write):
    path = write(tmp_path)
    ran = cli("dlrun-predict", run_dir, path)
    line = one_error_line(ran, recwarn)
    assert ran.returncode == 1 and ran.stdout == ""
    assert str(path) in line and ERRORS[write] in line, line
    assert "weights_only" not in line and "allow_pickle" not in line  # never advise loading unsafely
    assert not (tmp_path / "SENTINEL").exists()  # nothing in the file ran


@pytest.mark.slow
def test_the_installed_command_answers_one_line(run_dir, tmp_path):
    """The console script itself: exit status 1 and one line on stderr, nothing else from the process."""
    path = payload_pt(tmp_path)
    proc = subprocess.run([DLRUN_PREDICT, str(run_dir), str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr  # warnings included
    assert proc.stderr.startswith(f"dlrun-predict: error: {path}: {ERRORS[payload_pt]}"), proc.stderr
    assert not (tmp_path / "SENTINEL").exists()


def test_the_payload_would_run_if_unpickled(tmp_path):
    """The payloads above are real: plain unpickling creates the sentinel (so its absence means something)."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "SENTINEL")))
    assert (tmp_path / "SENTINEL").exists()


@pytest.mark.parametrize("topk", ["0", "-1", "two", "1.5"])
def test_topk_must_be_a_positive_integer(cli, run_dir, tmp_path, topk):
    np.save(path := tmp_path / "x.npy", np.zeros((1, *SHAPE), np.float32))
    ran = cli("dlrun-predict", run_dir, path, "--topk", topk)
    assert ran.returncode == 2 and ran.stdout == "" and "Traceback" not in ran.stderr
    *usage, line = [line for line in ran.stderr.splitlines() if line.strip()]  # argparse's usage, then the error
    assert usage[0].startswith("usage: dlrun-predict ") and all(u.startswith(" ") for u in usage[1:]), ran.stderr
    assert line.startswith("dlrun-predict: error: argument --topk: ") and "positive integer" in line, line
    assert topk in line


def int64_pt(d: Path) -> Path:
    torch.save(torch.randint(0, 17, (2, *SHAPE)), p := d / "int64.pt")
    return p


def one_sample_uint8_npy(d: Path) -> Path:
    np.save(p := d / "one.npy", np.full(SHAPE, 8, np.uint8))  # without the batch axis
    return p


def big_endian_npy(d: Path) -> Path:
    np.save(p := d / "big_endian.npy", np.full((2, *SHAPE), 4.0, dtype=">f8"))
    return p


def bool_npy(d: Path) -> Path:
    np.save(p := d / "bool.npy", np.ones((2, *SHAPE), bool))
    return p


def bfloat16_pt(d: Path) -> Path:
    torch.save(torch.full((2, *SHAPE), 3.0, dtype=torch.bfloat16), p := d / "bf16.pt")
    return p


def grey_png(d: Path) -> Path:
    from PIL import Image

    Image.new("L", (20, 12), 128).save(p := d / "grey.png")
    return p


WORKS = {int64_pt: 2, one_sample_uint8_npy: 1, big_endian_npy: 2, bool_npy: 2, bfloat16_pt: 2, grey_png: 1}


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of each row of the predictions table (a row per input and rank; the lines a wrapped
    cell continues on have no rank)."""
    lines = [line for line in stdout.splitlines() if line.startswith("│")]
    rows = [[cell.strip() for cell in line.strip("│").split("│")] for line in lines]
    return [row for row in rows if row[1]]


@pytest.mark.parametrize("write", WORKS, ids=lambda w: w.__name__)
def test_numeric_inputs_of_any_real_dtype_are_converted(cli, run_dir, tmp_path, recwarn, write):
    # The file by its name in the working directory: a short input column, so no row wraps.
    ran = cli("dlrun-predict", run_dir, write(tmp_path).name, "--topk", "2", cwd=tmp_path)
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    assert not shown_warnings(recwarn), shown_warnings(recwarn)
    rows = table_rows(ran.stdout)
    assert [rank for _, rank, _, _ in rows] == ["1", "2"] * WORKS[write], ran.stdout
    assert all(0 <= float(p) <= 1 for *_, p in rows) and "probability" in ran.stdout, ran.stdout  # no NaN
