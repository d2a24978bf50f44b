"""Registration uploads: only the tensors the server keeps (`SafetensorsSubset`), streamed
from the file, with progress, and sent whole again on a retry. Against a mock transport that
parses what was sent; `test_client.py` registers against a real server."""

from __future__ import annotations

import asyncio
import json
import struct

import httpx
import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save_file

from service.client import AsyncUnfoldClient, SafetensorsSubset, UnfoldClient, Upload
from service.formats import SafetensorsFile, map_file

CREATED = {"id": "d-1", "name": "sae", "n_features": 512, "d_model": 64}


def make_sae(folder, n_features=512, d_model=64, seed=0):
    """A SAELens folder (encoder and decoder, cfg.json); returns its tensors."""
    rng = np.random.default_rng(seed)
    tensors = {
        "W_enc": rng.standard_normal((d_model, n_features)).astype(np.float32),
        "b_enc": rng.standard_normal(n_features).astype(np.float32),
        "W_dec": rng.standard_normal((n_features, d_model)).astype(np.float32),
        "b_dec": rng.standard_normal(d_model).astype(np.float32),
        "threshold": rng.uniform(size=n_features).astype(np.float32),
    }
    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / "sae_weights.safetensors")
    cfg = {"d_in": d_model, "d_sae": n_features, "architecture": "jumprelu"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return tensors


def recording_transport():
    """Answers every request 201 with `CREATED`; records (request, body) pairs."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request, request.content))
        return httpx.Response(201, json=CREATED)

    return httpx.MockTransport(handler), seen


def multipart(body: bytes) -> dict[str, tuple[str, bytes]]:
    """The parts of a multipart/form-data body: name -> (their headers, content)."""
    boundary = body.split(b"\r\n", 1)[0]  # "--" + the boundary
    parts = {}
    for part in body.split(boundary)[1:-1]:
        head, content = part[2:].split(b"\r\n\r\n", 1)
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        parts[name] = (head.decode(), content[:-2])  # each part ends with CRLF
    return parts


def raw_safetensors(path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata=None):
    """Write a safetensors file by hand (any dtype, e.g. BF16, which numpy lacks)."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        offsets = [len(data), len(data) + len(raw)]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": offsets}
        data += raw
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_a_subset_is_a_safetensors_file_of_only_the_kept_tensors(tmp_path):
    tensors = make_sae(tmp_path / "sae")
    with open(tmp_path / "sae" / "sae_weights.safetensors", "rb") as source:
        locations = SafetensorsFile(map_file(source), "sae").tensors
        subset = SafetensorsSubset(source, {k: locations[k] for k in ("W_dec", "b_dec")})
        whole = subset.read()
        assert len(whole) == subset.size == subset.seek(0, 2)
        (header_size,) = struct.unpack("<Q", whole[:8])
        assert header_size % 8 == 0  # padded as the format recommends
        loaded = load_safetensors(whole)
        assert set(loaded) == {"W_dec", "b_dec"}
        for name, array in loaded.items():
            np.testing.assert_array_equal(array, tensors[name])
        # Read again from anywhere, in small pieces: the same bytes.
        subset.seek(5)
        pieces = iter(lambda: subset.read(1000), b"")
        assert b"".join(pieces) == whole[5:] and subset.tell() == len(whole)
        subset.seek(-10, 2)
        assert subset.read() == whole[-10:] and subset.read() == b""


def test_a_subset_keeps_the_tensors_dtype(tmp_path):
    rng = np.random.default_rng(0)
    bf16 = rng.integers(0, 2**16, size=(8, 4), dtype=np.uint16).tobytes()  # raw bfloat16
    f16 = rng.standard_normal(4).astype(np.float16)
    raw_safetensors(
        tmp_path / "half.safetensors",
        {"W_dec": ("BF16", (8, 4), bf16), "b_dec": ("F16", (4,), f16.tobytes())},
        metadata={"format": "pt"},
    )
    with open(tmp_path / "half.safetensors", "rb") as source:
        locations = SafetensorsFile(map_file(source), "half").tensors
        assert set(locations) == {"W_dec", "b_dec"}  # __metadata__ is not a tensor
        whole = SafetensorsSubset(source, locations).read()
    (header_size,) = struct.unpack("<Q", whole[:8])
    header = json.loads(whole[8 : 8 + header_size])
    assert header["W_dec"] == {"dtype": "BF16", "shape": [8, 4], "data_offsets": [0, 64]}
    assert header["b_dec"] == {"dtype": "F16", "shape": [4], "data_offsets": [64, 72]}
    assert whole[8 + header_size :] == bf16 + f16.tobytes()


@pytest.mark.parametrize("encoder", [True, False], ids=["with-encoder", "decoder-only"])
def test_register_saelens_uploads_only_what_the_server_keeps(tmp_path, encoder):
    tensors = make_sae(tmp_path / "sae", n_features=2048, d_model=128)
    tensors["other"] = np.zeros((64, 64), np.float32)  # neither decoder nor encoder: stays home
    save_file(tensors, tmp_path / "sae" / "sae_weights.safetensors")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    transport, seen = recording_transport()
    progress = []
    with UnfoldClient("http://unfold.test", transport=transport) as client:
        info = client.register_saelens(
            "sae", tmp_path / "sae", progress=lambda *a: progress.append(a), encoder=encoder
        )
    assert info == CREATED
    [(request, body)] = seen
    assert int(request.headers["content-length"]) == len(body)
    boundary = request.headers["content-type"].removeprefix("multipart/form-data; boundary=")
    assert body.startswith(f"--{boundary}\r\n".encode())
    parts = multipart(body)
    assert set(parts) == {"name", "tensor", "bias_tensor", "file", "cfg"}
    assert (parts["name"][1], parts["tensor"][1], parts["bias_tensor"][1]) == (
        b"sae",
        b"W_dec",
        b"b_dec",
    )
    assert parts["cfg"][1] == (tmp_path / "sae" / "cfg.json").read_bytes()
    uploaded = load_safetensors(parts["file"][1])
    sent = {"W_dec", "b_dec"} | ({"W_enc", "b_enc", "threshold"} if encoder else set())
    assert set(uploaded) == sent
    for name in sent:
        np.testing.assert_array_equal(uploaded[name], tensors[name])
    payload = sum(tensors[name].nbytes for name in sent)
    assert payload < len(body) < payload + 2048
    if not encoder:  # W_enc (as large as W_dec), b_enc and threshold stayed home
        assert len(body) < 0.55 * weights.stat().st_size
    # Progress: from 0 to the whole body, in order.
    assert progress[0] == (0, len(body)) and progress[-1] == (len(body), len(body))
    assert [sent for sent, _ in progress] == sorted(sent for sent, _ in progress)


def test_register_file_names_the_tensors_it_sends(tmp_path):
    rng = np.random.default_rng(1)
    D, b = rng.standard_normal((32, 8)).astype(np.float32), rng.standard_normal(8).astype("f4")
    save_file({"D": D, "b": b, "E": D.T.copy()}, tmp_path / "d.safetensors")
    save_file({"only": D, "v": b}, tmp_path / "one.safetensors")
    transport, seen = recording_transport()
    with UnfoldClient("http://unfold.test", transport=transport) as client:
        client.register_file("d", tmp_path / "d.safetensors", tensor="D", bias_tensor="b")
        client.register_file("one", tmp_path / "one.safetensors")  # the only 2-D tensor
    named, only = (multipart(body) for _, body in seen)
    assert named["tensor"][1] == b"D" and named["bias_tensor"][1] == b"b"
    assert set(load_safetensors(named["file"][1])) == {"D", "b"}
    assert only["tensor"][1] == b"only" and "bias_tensor" not in only and "cfg" not in only
    assert set(load_safetensors(only["file"][1])) == {"only"}


def test_files_the_client_cannot_use_fail_before_any_upload(tmp_path):
    D = np.ones((4, 3), np.float32)
    save_file({"A": D, "B": D}, tmp_path / "two.safetensors")
    good = tmp_path / "good.safetensors"
    save_file({"W_dec": D, "b_dec": np.ones(3, np.float32)}, good)
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file at all")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-8])
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(good.read_bytes()[:20])
    transport, seen = recording_transport()
    cases = [
        (("two.safetensors",), {}, "cannot tell which tensor holds the directions"),
        (("good.safetensors",), {"tensor": "nope"}, "no tensor 'nope'"),
        (("good.safetensors",), {"bias_tensor": "nope"}, "no bias tensor 'nope'"),
        (("junk.safetensors",), {}, "truncated or corrupt"),
        (("cut.safetensors",), {}, "does not fit its data offsets"),
        (("sae",), {}, "truncated or corrupt"),
        (("sae",), {"tensor": "W_dec"}, "safetensors files only"),
    ]
    with UnfoldClient("http://unfold.test", transport=transport) as client:
        for (path,), options, message in cases:
            with pytest.raises(ValueError, match=message):
                client.register_file("x", tmp_path / path, **options)
    assert seen == []


def test_npy_is_streamed_from_the_file(tmp_path):
    directions = np.random.default_rng(2).standard_normal((3000, 200)).astype(np.float32)
    np.save(tmp_path / "d.npy", directions)  # 2.4 MB: three chunks of at most 1 MiB
    transport, seen = recording_transport()
    streams, progress = [], []
    with UnfoldClient("http://unfold.test", transport=transport) as client:
        client._http.event_hooks["request"].append(lambda request: streams.append(request.stream))
        client.register_file("d", tmp_path / "d.npy", progress=lambda *a: progress.append(a))
    [(request, body)] = seen
    assert isinstance(streams[0], Upload)  # not the file's bytes, read in one go
    assert body == (tmp_path / "d.npy").read_bytes()
    assert request.headers["content-type"] == "application/x-npy"
    assert request.url.params["name"] == "d"
    assert int(request.headers["content-length"]) == len(body)
    total = len(body)
    assert progress == [(0, total), (2**20, total), (2**21, total), (total, total)]


class FlakyUpload(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Reads the first 100 bytes of the body, then loses the connection; then reads the whole
    body and answers `CREATED`. Records the body it read in full."""

    def __init__(self):
        self.attempts, self.bodies = 0, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        body = b""
        for chunk in request.stream:
            body += chunk
            if self.attempts == 1 and len(body) >= 100:
                raise httpx.WriteError("connection reset while sending")
        self.bodies.append(body)
        return httpx.Response(201, json=CREATED)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        body = b""
        async for chunk in request.stream:
            body += chunk
            if self.attempts == 1 and len(body) >= 100:
                raise httpx.WriteError("connection reset while sending")
        self.bodies.append(body)
        return httpx.Response(201, json=CREATED)


def test_a_retry_sends_the_streamed_body_again(tmp_path):
    tensors = make_sae(tmp_path / "sae")
    np.save(tmp_path / "d.npy", tensors["W_dec"])
    transport = FlakyUpload()
    progress = []
    with UnfoldClient("http://unfold.test", transport=transport) as client:
        client._sleep = lambda seconds: None
        client.register_saelens("sae", tmp_path / "sae", progress=lambda *a: progress.append(a))
    assert transport.attempts == 2
    sent = [s for s, _ in progress]
    assert sent.count(0) == 2 and sent[-1] == progress[-1][1]  # started again from 0
    uploaded = load_safetensors(multipart(transport.bodies[0])["file"][1])
    np.testing.assert_array_equal(uploaded["W_dec"], tensors["W_dec"])

    transport = FlakyUpload()

    async def main():
        async with AsyncUnfoldClient("http://unfold.test", transport=transport) as client:

            async def sleep(seconds):
                pass

            client._sleep = sleep
            await client.register_file("d", tmp_path / "d.npy")

    asyncio.run(main())
    assert transport.attempts == 2
    assert transport.bodies == [(tmp_path / "d.npy").read_bytes()]
