"""The `unfold` command line: against a real `unfold serve` process, in-process on a data
directory, `--help` everywhere, and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from service.cli import UPLOAD_BAR_BYTES, UploadBar, main
from tests.service.helpers import free_port, safetensors_bytes
from tests.service.test_oip import lean_server, toy_problem


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with lean_server(tmp_path_factory.mktemp("cli")) as (http, _):
        yield str(http.base_url).rstrip("/")


@pytest.fixture
def files(tmp_path):
    """A dictionary file and activations of shape (batch, pos, d_model) with known codes."""
    directions, codes, x = toy_problem(batch=12, seed=3)
    np.save(tmp_path / "toy.npy", directions)
    np.save(tmp_path / "acts.npy", x.reshape(3, 4, 24))
    return tmp_path, codes.reshape(3, 4, 64)


def unfold(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_output(path, codes, atol=1e-4):
    tensors = load_file(path)
    assert set(tensors) == {
        "indices",
        "values",
        "residual_norm",
        "relative_error",
        "l0",
        "n_iter",
        "status",
        "duality_gap",
    }
    assert tensors["indices"].shape == (3, 4, 3) and tensors["l0"].shape == (3, 4)
    dense = np.zeros(codes.shape, np.float32)
    for index in np.ndindex(codes.shape[:-1]):
        dense[index][tensors["indices"][index]] = tensors["values"][index]
    np.testing.assert_allclose(dense, codes, atol=atol)
    with safe_open(str(path), "np") as file:
        metadata = file.metadata()
    assert metadata["n_features"] == "64" and metadata["method"] == "omp"
    assert json.loads(metadata["input_shape"]) == [3, 4, 24]


def test_against_a_server(url, files, capsys, monkeypatch):
    folder, codes = files
    code, out, _ = unfold(capsys, "dict", "add", "toy", folder / "toy.npy", "--url", url)
    assert code == 0 and out.startswith("registered toy (id ")
    monkeypatch.setenv("UNFOLD_URL", url)  # the same, from the environment
    code, out, _ = unfold(capsys, "dict", "list")
    assert code == 0 and out.splitlines()[0].split() == [
        "NAME",
        "ID",
        "FEATURES",
        "D_MODEL",
        "BIAS",
    ]
    assert any(line.split()[0] == "toy" for line in out.splitlines()[1:])
    code, out, _ = unfold(capsys, "dict", "show", "toy")
    assert code == 0 and json.loads(out)["n_features"] == 64

    output = folder / "codes.safetensors"
    code, _, err = unfold(
        capsys, "run", "toy", folder / "acts.npy", output, "--k", "3", "--batch-size", "5"
    )
    assert code == 0, err
    check_output(output, codes)
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("12 rows (12 solved now in ") and "rows/s" in summary
    assert "mean L0 3.00" in summary and "mean relative error" in summary
    # Parameters the dictionary cannot take are refused before a row is sent or a file written.
    refused = folder / "refused"
    code, _, err = unfold(capsys, "run", "toy", folder / "acts.npy", refused, "--k", "65")
    assert code == 1 and "at most 64, got 65" in err and not refused.exists(), err

    code, out, _ = unfold(capsys, "dict", "rm", "toy")
    assert code == 0 and out.startswith("deleted toy")
    code, _, err = unfold(capsys, "dict", "show", "toy")
    assert code == 1 and err.startswith("unfold: error: no dictionary with id or name 'toy'")


def test_dict_add_uploads_a_saelens_folder(url, tmp_path, capsys):
    directions, codes, x = toy_problem(batch=12, seed=3)
    folder = tmp_path / "sae"
    folder.mkdir()
    tensors = {"W_enc": directions.T.copy(), "W_dec": directions, "b_dec": np.zeros(24, "f4")}
    save_file(tensors, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"d_in": 24, "d_sae": 64}))
    code, out, err = unfold(capsys, "dict", "add", "sae", folder, "--url", url, "--json")
    assert code == 0, err
    assert json.loads(out)["n_features"] == 64 and err == ""  # no bar: not a terminal, small
    np.save(tmp_path / "acts.npy", x)
    output = tmp_path / "codes.safetensors"
    command = ["run", "sae", tmp_path / "acts.npy", output, "--k", "3", "--url", url]
    code, _, err = unfold(capsys, *command)
    assert code == 0, err
    np.testing.assert_allclose(load_file(output)["l0"], 3)
    assert unfold(capsys, "dict", "rm", "sae", "--url", url)[0] == 0


class Stderr:
    def __init__(self, terminal: bool):
        self.terminal, self.text = terminal, ""

    def isatty(self) -> bool:
        return self.terminal

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize(
    ("terminal", "total", "quiet", "shown"),
    [
        (True, 1000, False, True),
        (False, 1000, False, False),
        (False, UPLOAD_BAR_BYTES, False, True),
        (True, UPLOAD_BAR_BYTES, True, False),
    ],
)
def test_the_upload_bar_shows_on_a_terminal_or_for_large_uploads(
    terminal, total, quiet, shown, monkeypatch
):
    stderr = Stderr(terminal)
    monkeypatch.setattr("sys.stderr", stderr)
    bar = UploadBar(quiet)
    for sent in (0, total // 2, 0, total // 2, total):  # a retry starts again from 0
        bar(sent, total)
    if shown:
        assert bar.bar.n == total and bar.bar.total == total
    bar.close()
    assert ("upload" in stderr.text) == shown


def test_safetensors_input_and_errors(url, files, capsys):
    folder, codes = files
    assert unfold(capsys, "dict", "add", "toy2", folder / "toy.npy", "--url", url)[0] == 0
    x = np.load(folder / "acts.npy")
    save_file({"resid": x, "other": np.zeros(3, np.float32)}, folder / "acts.safetensors")
    output = folder / "out.safetensors"
    common = ["--url", url, "--k", "3", "--quiet", "--overwrite"]
    code, _, err = unfold(capsys, "run", "toy2", folder / "acts.safetensors", output, *common)
    assert code == 1 and "--input-tensor" in err and not output.exists()
    code, _, err = unfold(
        capsys,
        "run",
        "toy2",
        folder / "acts.safetensors",
        output,
        "--input-tensor",
        "resid",
        *common,
    )
    assert code == 0, err
    check_output(output, codes)
    half = folder / "acts-bf16.safetensors"  # read as bfloat16, solved in float32
    half.write_bytes(safetensors_bytes({"resid": x.astype(ml_dtypes.bfloat16)}))
    code, _, err = unfold(capsys, "run", "toy2", half, output, *common)
    assert code == 0, err
    check_output(output, codes, atol=0.05)  # bfloat16 keeps 8 bits of each activation

    np.save(folder / "narrow.npy", np.zeros((2, 23), np.float32))
    code, _, err = unfold(capsys, "run", "toy2", folder / "narrow.npy", output, *common)
    assert code == 1 and "d_model=23" in err
    code, _, err = unfold(
        capsys, "run", "toy2", folder / "acts.npy", output, "--k", "99", "--url", url, "--overwrite"
    )
    last = err.strip().splitlines()[-1]
    assert code == 1 and last == "unfold: error: k must be at least 1 and at most 64, got 99"
    code, _, err = unfold(capsys, "run", "nope", folder / "acts.npy", output, "--url", url)
    assert code == 1 and "no dictionary" in err
    code, _, err = unfold(capsys, "run", "toy2", folder / "missing.npy", output, "--url", url)
    assert code == 1 and "missing.npy" in err
    assert len(err.strip().splitlines()) == 1


def test_in_process(files, capsys, tmp_path):
    folder, codes = files
    data = ["--data-dir", tmp_path / "data"]
    directions = np.load(folder / "toy.npy")
    save_file({"W_dec": directions, "b_dec": np.zeros(24, np.float32)}, folder / "sae.safetensors")
    code, out, err = unfold(capsys, "dict", "add", "local", folder / "sae.safetensors", *data)
    assert code == 0, err
    code, out, _ = unfold(capsys, "dict", "list", "--json", *data)
    assert [d["name"] for d in json.loads(out)] == ["local"]
    code, _, err = unfold(capsys, "dict", "add", "again", folder / "toy.npy", *data)
    assert code == 1 and "already registered as 'local'" in err  # same content, other name

    output = folder / "local.safetensors"
    code, _, err = unfold(capsys, "run", "local", folder / "acts.npy", output, "--k", "3", *data)
    assert code == 0, err
    check_output(output, codes)
    # A dictionary file in place of a name.
    code, _, err = unfold(
        capsys, "run", folder / "toy.npy", folder / "acts.npy", output, "--k", "3", "--overwrite"
    )
    assert code == 0, err
    check_output(output, codes)

    code, _, err = unfold(capsys, "run", "nope", folder / "acts.npy", output, *data)
    assert code == 1 and "no dictionary with id or name 'nope'" in err
    code, _, err = unfold(
        capsys, "run", "local", folder / "acts.npy", output, "--alpha", "-1", *data
    )
    assert code == 1 and "alpha" in err
    (folder / "bad.npy").write_bytes(b"not an npy file")
    code, _, err = unfold(capsys, "dict", "add", "bad", folder / "bad.npy", *data)
    assert code == 1 and err.startswith("unfold: error:") and "bad.npy" in err
    code, out, _ = unfold(capsys, "dict", "rm", "local", *data)
    assert code == 0 and out.startswith("deleted local")


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["dict"],
        ["dict", "add"],
        ["dict", "list"],
        ["dict", "show"],
        ["dict", "rm"],
        ["run"],
    ],
)
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: unfold" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "only-one-argument"])
    assert exit_.value.code == 2


def test_real_process_exit_code_when_the_server_is_down():
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "dict",
            "list",
            "--url",
            f"http://127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 1
    assert process.stderr.startswith("unfold: error: cannot reach")
    assert len(process.stderr.strip().splitlines()) == 1
