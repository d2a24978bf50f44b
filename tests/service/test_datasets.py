"""`unfold run` over datasets: folders of shards in every format, outputs written shard by
shard, interrupted runs resumed with identical results, and bad datasets refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import solvers
from service import cli
from service.datasets import MANIFEST

D_MODEL = 16


@pytest.fixture
def dictionary(tmp_path):
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((96, D_MODEL)).astype(np.float32)
    np.save(tmp_path / "dictionary.npy", directions)
    return tmp_path / "dictionary.npy", directions


def activations(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, D_MODEL)).astype(np.float32)


def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def read_shards(folder) -> dict[str, np.ndarray]:
    manifest = json.loads((folder / MANIFEST).read_text())
    shards = [
        load_file(folder / s["file"])
        for _, s in sorted(manifest["shards"].items(), key=lambda i: int(i[0]))
    ]
    return {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}


def test_a_folder_of_shards_in_every_format_unfolds_into_a_folder_of_shards(
    tmp_path, dictionary, capsys
):
    path, directions = dictionary
    x = activations(50)
    shards = tmp_path / "acts"
    shards.mkdir()
    np.save(shards / "a.npy", x[:20])
    save_file({"resid": x[20:35]}, shards / "b.safetensors")
    np.savez(shards / "c.npz", resid=x[35:].reshape(3, 5, D_MODEL))
    (shards / "notes.txt").write_text("ignored: not an activations file")
    out = tmp_path / "codes"
    code, err = run(capsys, "run", path, shards, out, "--k", "4", "--shard-rows", "16",
                    "--batch-size", "8", "--quiet")  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["shards"]) == 4 and manifest["method"] == "omp"
    assert [part["file"] for part in manifest["input"]] == ["a.npy", "b.safetensors", "c.npz"]
    codes = read_shards(out)
    expected = solvers.unfold(x, directions, k=4)
    np.testing.assert_array_equal(codes["indices"], expected.indices)
    np.testing.assert_allclose(codes["values"], expected.values, rtol=1e-5, atol=1e-6)
    assert "50 rows (50 solved now" in err


def test_an_interrupted_run_resumes_from_its_last_shard_with_identical_results(
    tmp_path, dictionary, capsys, monkeypatch
):
    path, _ = dictionary
    x = activations(70).reshape(7, 10, D_MODEL)
    np.save(tmp_path / "acts.npy", x)
    options = ["--method", "lasso", "--alpha", "0.05", "--shard-rows", "16", "--batch-size", "8"]
    whole = tmp_path / "whole.safetensors"
    assert run(capsys, "run", path, tmp_path / "acts.npy", whole, *options, "--quiet")[0] == 0

    solver, calls = cli.Local.solver, []

    def interrupted(self, ref, method, params):
        solve, info = solver(self, ref, method, params)

        def counting(rows):
            calls.append(rows.shape[0])
            if len(calls) == 5:  # in the third shard (two calls per shard)
                raise KeyboardInterrupt
            return solve(rows)

        return counting, info

    monkeypatch.setattr(cli.Local, "solver", interrupted)
    resumed = tmp_path / "resumed.safetensors"
    code, err = run(capsys, "run", path, tmp_path / "acts.npy", resumed, *options, "--quiet")
    assert code == 130 and "3 of 5 shards left" in err and "--resume" in err
    assert not resumed.exists()
    monkeypatch.setattr(cli.Local, "solver", solver)
    code, err = run(capsys, "run", path, tmp_path / "acts.npy", resumed, *options, "--quiet")
    assert code == 1 and "--resume" in err  # not silently started again
    changed = [*options[:3], "0.1", *options[4:]]
    code, err = run(capsys, "run", path, tmp_path / "acts.npy", resumed, *changed, "--resume")
    assert code == 1 and "params differ" in err
    other = tmp_path / "other"  # other rows of the same shape, under the same name
    other.mkdir()
    np.save(other / "acts.npy", activations(70, seed=9).reshape(7, 10, D_MODEL))
    code, err = run(capsys, "run", path, other / "acts.npy", resumed, *options, "--resume")
    assert code == 1 and "input differ" in err
    code, err = run(capsys, "run", path, tmp_path / "acts.npy", resumed, *options, "--resume")
    assert code == 0, err
    assert "70 rows (38 solved now" in err
    expected, got = load_file(whole), load_file(resumed)
    assert (
        got["indices"].shape[:2] == (7, 10)
        and not (tmp_path / "resumed.safetensors.parts").exists()
    )
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    code, err = run(capsys, "run", path, tmp_path / "acts.npy", resumed, *options, "--resume")
    assert code == 1 and "complete already" in err


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: (np.save(d / "a.npy", activations(4)), np.save(d / "b.npy", np.zeros((4, 8)))),
         "different widths"),
        (lambda d: (d / "a.npy").write_bytes(np.lib.format.MAGIC_PREFIX + b"\x01\x00garbage"),
         "a.npy"),
        (lambda d: (d / "a.npz").write_bytes(b"PK\x03\x04 not a zip"), "a.npz"),
        (lambda d: np.save(d / "a.npy", np.zeros((4, D_MODEL), np.complex64)), "not a real number"),
        (lambda d: np.savez(d / "a.npz", x=activations(2), y=activations(2)), "--input-tensor"),
        (lambda d: None, "holds no"),
        (lambda d: np.save(d / "a.npy", np.zeros((0, D_MODEL), np.float32)), "no activations"),
    ],
    ids=["widths", "truncated-npy", "bad-npz", "complex", "two-arrays", "empty", "no-rows"],
)  # fmt: skip
def test_bad_datasets_are_refused_with_what_to_change(tmp_path, dictionary, capsys, make, says):
    path, _ = dictionary
    folder = tmp_path / "acts"
    folder.mkdir()
    make(folder)
    code, err = run(capsys, "run", path, folder, tmp_path / "out", "--quiet")
    assert code == 1 and err.startswith("unfold: error:") and says in err, err
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, dictionary, capsys):
    path, _ = dictionary
    np.save(tmp_path / "acts.npy", activations(5))
    out = tmp_path / "out"
    assert run(capsys, "run", path, tmp_path / "acts.npy", out, "--quiet")[0] == 0
    code, err = run(capsys, "run", path, tmp_path / "acts.npy", out, "--quiet")
    assert code == 1 and "--overwrite" in err
    code, err = run(capsys, "run", path, tmp_path / "acts.npy", out, "--resume", "--overwrite")
    assert code == 1 and "pick one" in err
    code, err = run(capsys, "run", path, tmp_path / "acts.npy", out, "--k", "2", "--overwrite")
    assert code == 0, err
    assert json.loads((out / MANIFEST).read_text())["params"] == {"k": 2}
