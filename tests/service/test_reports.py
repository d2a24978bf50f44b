"""Per-dictionary reports: their numbers against brute force and theory, the API that serves
them, and the HTML page in a real browser."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

import solvers
from service import report_page, reports
from service.demo import demo_dictionary
from tests.service.conftest import running_client
from tests.service.helpers import serve


def brute_force_coherence(directions: np.ndarray) -> float:
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    cosines = np.abs(unit @ unit.T)
    np.fill_diagonal(cosines, 0)
    return float(cosines.max())


def test_k_grid_steps_by_about_sqrt2():
    assert reports.k_grid(16) == [1, 2, 3, 4, 6, 8, 11, 16]
    assert reports.k_grid(1) == [1]


def test_a_large_dictionary_is_analysed_on_a_sample_and_says_so(client):
    rng = np.random.default_rng(3)
    directions = rng.standard_normal((64, 24)).astype(np.float32)
    labels = [f"f{i}" for i in range(64)]
    entry, _ = client.app.state.registry.register("big", directions, labels=labels)
    settings = reports.ReportSettings(max_features=40, trials=4, curve_seconds=1e-9)
    report = reports.build_report(entry, settings)
    coherence = report["coherence"]
    assert coherence["sampled_features"] == 40 == report["recovery"]["sampled_features"]
    assert "random sample of 40 of the 64 features" in report["recovery"]["note"]
    pairs = coherence["top_pairs"]
    i, j = pairs[0]["i"], pairs[0]["j"]
    assert pairs[0]["labels"] == [f"f{i}", f"f{j}"]
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    assert abs(pairs[0]["cosine"]) == pytest.approx(abs(unit[i] @ unit[j]), rel=1e-5)
    assert coherence["mutual"] <= brute_force_coherence(directions) + 1e-6
    assert coherence["welch_bound"] == pytest.approx(solvers.welch_bound(64, 24))
    theory = report["recovery"]["l1_transition"]
    assert theory["signed"] == pytest.approx(solvers.l1_transition(40, 24))
    # A spent time budget is said, never silently cut.
    for curve in report["recovery"]["curves"]:
        assert curve["ks"] == [] and "time budget" in curve["truncated"]
    json.dumps(report, allow_nan=False)  # valid JSON: no NaN or infinities


def wait_for_report(client, ref: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/dictionaries/{ref}/report")
        if response.status_code != 202:
            return response
        assert response.headers["retry-after"] == "5"
        assert response.json()["state"] in ("queued", "running")
        assert time.monotonic() < deadline, "report not ready in time"
        time.sleep(0.5)


@pytest.mark.slow
def test_report_api_computes_stores_and_serves_the_report(tmp_path):
    directions, labels = demo_dictionary()
    with running_client(tmp_path) as client:  # reports on demand only
        first = client.get("/v1/dictionaries/demo/report")
        assert first.status_code == 202  # asked for: scheduled now
        report = wait_for_report(client, "demo").json()
        assert client.get("/v1/dictionaries/nothing/report").status_code == 404
    assert report["state"] == "ready" and report["dictionary"]["name"] == "demo"
    coherence = report["coherence"]
    assert coherence["mutual"] == pytest.approx(brute_force_coherence(directions), rel=1e-6)
    assert coherence["mutual"] == pytest.approx(0.25)  # standard basis against Hadamard
    assert coherence["guaranteed_k"] == 2
    assert coherence["top_pairs"][0]["labels"][0].startswith("basis_")
    assert sum(coherence["histogram"]["counts"]) == 32 * 31 // 2
    assert report["norms"]["min"] == pytest.approx(1) == report["norms"]["max"]
    recovery = report["recovery"]
    assert recovery["note"] is None and recovery["sampled_features"] == 32
    for curve in recovery["curves"]:
        shares = dict(zip(curve["ks"], curve["recovered"], strict=True))
        # The coherence bound guarantees k <= 2 for OMP and l1, signed or not.
        assert shares[1] == shares[2] == 1.0
        assert curve["recommended_k"] >= coherence["guaranteed_k"]
        assert shares[curve["recommended_k"]] >= 0.95
        assert curve["recovered"][-1] == 0.0  # the curve runs until recovery fails
    assert set(recovery["recommended_k"]) == {"omp", "omp_positive", "lasso", "lasso_positive"}
    assert recovery["l1_transition"]["signed"] == pytest.approx(solvers.l1_transition(32, 16))
    # Stored with the dictionary: served at once after a restart, gone with the dictionary.
    stored = tmp_path / "dictionaries" / report["dictionary"]["id"] / "report.json"
    assert stored.exists()
    with running_client(tmp_path) as client:
        again = client.get("/v1/dictionaries/demo/report")
        assert again.status_code == 200 and again.json()["computed_at"] == report["computed_at"]
        assert client.delete("/v1/dictionaries/demo").status_code == 204
    assert not stored.exists()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_chromium = pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"),
    reason="headless Chromium not installed (Debian: apt-get install chromium; CI installs it)",
)


def browse(url: str, *args: str) -> subprocess.CompletedProcess:
    command = [chromium() or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
               "--virtual-time-budget=15000", *args, url]  # fmt: skip
    return subprocess.run(command, capture_output=True, timeout=120, check=True)


def color_pixels(image, rgb: tuple[int, int, int], rows: slice) -> int:
    pixels = np.asarray(image.convert("RGB"))[rows]
    return int(np.sum(np.all(np.abs(pixels.astype(int) - rgb) <= 8, axis=-1)))


@pytest.mark.slow
@needs_chromium
def test_report_page_renders_its_plots_and_the_playground_answers(tmp_path):
    from PIL import Image

    with serve(tmp_path, env={"UNFOLD_REPORTS": "true"}) as client:
        assert wait_for_report(client, "demo").status_code == 200
        url = f"{client.base_url}/v1/dictionaries/demo/report.html#example"
        page = client.get("/v1/dictionaries/demo/report.html")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert not re.search(r"""(src|href)=["']?https?://""", page.text)  # self-contained
        dom = browse(url, "--dump-dom").stdout.decode()
        screenshot = tmp_path / "report.png"
        browse(url, f"--screenshot={screenshot}", "--window-size=1100,2200")
    # The plots: four recovery curves with recommended-k marks, two histograms.
    assert dom.count('class="curve"') == 4 and dom.count('class="recommended"') == 4
    assert 'id="coherence-plot"' in dom and 'id="norms-plot"' in dom
    # The playground unfolded the example (2, 1, 0.5 times three features) and certified it.
    summary = re.search(r'<div id="result-summary">(.*?)</div>', dom, re.S).group(1)
    assert '<span class="ok" id="certificate">certified</span>' in summary
    bars = re.findall(r'<text[^>]*>(\w+) \((\d+)\)</text><rect class="feature-bar"', dom)
    _, features = demo_example_features()
    assert sorted(int(index) for _, index in bars) == features
    labels = demo_dictionary()[1]
    assert all(labels[int(index)] == label for label, index in bars)
    image = Image.open(io.BytesIO(screenshot.read_bytes()))
    height = image.size[1]
    top, bottom = slice(0, height // 2), slice(height // 2, height)
    assert color_pixels(image, (0x1F, 0x77, 0xB4), top) > 100  # the OMP curve
    assert color_pixels(image, (0xD6, 0x27, 0x28), top) > 100  # the l1 curve
    assert color_pixels(image, (0x4C, 0x78, 0xA8), top) > 100  # histogram bars
    assert color_pixels(image, (0x4C, 0x78, 0xA8), bottom) > 500  # the playground's bars


def demo_example_features():
    from service.report_page import example_activation

    class Record:
        directions, labels = demo_dictionary()
        bias = None

    class Entry:
        record = Record

    return example_activation(Entry)


def test_the_encoder_section_compares_the_saes_encoder_with_unfold(client):
    """On the `toy-model` demo (its encoder: the model's ReLU read-out), the report's encoder
    comparison finds Unfold's supports better, and the page plots both."""
    entry = client.app.state.registry.get("toy-model")
    settings = reports.ReportSettings(trials=16)
    comparison = reports.encoder_comparison(entry, settings, None)
    assert comparison["architecture"] == "standard" and comparison["ks"][:3] == [1, 2, 3]
    f1 = np.array(comparison["unfold_f1"]), np.array(comparison["encoder_f1"])
    assert f1[0][0] == 1.0  # one feature: non-negative OMP finds it
    assert np.all((f1[1] >= 0) & (f1[1] <= 1))
    assert np.mean(f1[0][:4]) > np.mean(f1[1][:4]) + 0.2  # the amortisation gap
    # F1 of the encoder's codes at k = 1, recomputed from the encoder itself.
    rng = np.random.default_rng(1)
    truth = solvers.synthetic_codes(16, 80, 1, positive=True, rng=rng)
    x = (truth @ np.asarray(entry.record.directions)).astype(np.float32)
    indices, values = entry.record.encoder.encode(x, None)
    codes = np.zeros_like(truth)
    for row, (i, v) in enumerate(zip(indices, values, strict=True)):
        codes[row, i[i >= 0]] = v[i >= 0]
    assert comparison["encoder_f1"][0] == pytest.approx(
        float(np.mean(reports.support_f1(codes, truth)))
    )
    report = reports.build_report(entry, reports.ReportSettings(trials=4, curve_seconds=1e-9))
    assert report["encoder"]["ks"] == []  # the time budget applies here too, and says so
    report["encoder"] = comparison
    page = report_page.render(entry, "ready", report, refresh_s=5)
    assert 'id="encoder-plot"' in page and page.count('class="encoder-curve"') == 2
    assert '"encoder": true' in page  # the playground asks for the comparison


def test_reports_are_computed_in_a_child_process_that_shutdown_ends(client, tmp_path):
    """The child writes the report (its compiled programs leave with it); shutdown ends it
    and nothing is written; a failure says why."""
    registry, store_root = client.app.state.registry, client.app.state.registry.store.root
    entry = registry.get("demo")
    work = reports.Reports(store_root, client.app.state.background, reports.ReportSettings())
    stopping = threading.Event()
    threading.Timer(2.0, stopping.set).start()
    assert work._compute_apart(entry.record.id, stopping) == "stopped"
    assert not (store_root / entry.record.id / "report.json").exists()
    failure = work._compute_apart("0" * 24, threading.Event())
    assert failure.startswith("exit status 1") and "manifest.json" in failure
