"""The web app, end to end: a real uvicorn server on localhost, httpx and raw sockets against it,
the ``cifarlens serve`` command in a subprocess, and the page in headless Debian chromium."""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from cifarlens.api import load_run, train
from cifarlens.cli import main
from cifarlens.config import RunConfig, merge
from cifarlens.explain import list_methods
from cifarlens.serve.app import create_app
from conftest import make_cifar10

LIMIT = 1 << 20  # the test server's upload cap: 1 MiB


class LiveServer:
    """The app under a real uvicorn server in a background thread, on a free localhost port."""

    def __init__(self, app):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LensNet trained for a few seconds on synthetic CIFAR-10 (RGB, 32x32)."""
    root = tmp_path_factory.mktemp("serve")
    data = make_cifar10(root / "data", n_train_per_batch=40, n_test=40)
    cfg = merge(RunConfig(), {
        "data": {"dataset": "cifar10", "data_dir": str(data.data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
        "train": {"batch_size": 32, "epochs": 2},
    })
    train(cfg, root / "run")
    return root / "run", data


@pytest.fixture(scope="module")
def server(trained):
    run_dir, _ = trained
    with LiveServer(create_app(run_dir, max_upload_bytes=LIMIT)) as live:
        yield live


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def rgb(data, i: int) -> np.ndarray:
    return data.test_images[i].transpose(1, 2, 0)  # (H, W, 3) uint8


def encode(array: np.ndarray, fmt: str) -> bytes:
    """An (H, W, 3) uint8 image in one of the formats and modes users upload."""
    img = Image.fromarray(array).resize((45, 37))  # any size: the server resizes to the model's
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG")
    elif fmt == "jpeg":
        img.save(buf, "JPEG", quality=92)
    elif fmt == "webp":
        img.save(buf, "WEBP", lossless=True)
    elif fmt == "bmp":
        img.save(buf, "BMP")
    elif fmt == "gif-animated":  # the first frame counts
        second = Image.fromarray(255 - np.asarray(img))
        img.quantize(64).save(buf, "GIF", save_all=True, append_images=[second.quantize(64)], duration=100)
    elif fmt == "png-16bit":
        Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257).save(buf, "PNG")
    elif fmt == "png-rgba":
        Image.fromarray(np.dstack([np.asarray(img), np.full(img.size[::-1], 180, np.uint8)])).save(buf, "PNG")
    elif fmt == "png-palette":
        img.quantize(32).save(buf, "PNG")
    elif fmt == "png-gray":
        img.convert("L").save(buf, "PNG")
    elif fmt == "tiff":
        img.save(buf, "TIFF")
    else:
        raise ValueError(fmt)
    return buf.getvalue()


FORMATS = ["png", "jpeg", "webp", "bmp", "gif-animated", "png-16bit", "png-rgba", "png-palette", "png-gray", "tiff"]


def upload(data: bytes, name: str = "image.png") -> dict:
    return {"file": (name, data, "application/octet-stream")}


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_any_format(fmt, client, trained):
    run_dir, data = trained
    image = encode(rgb(data, 3), fmt)
    r = client.post("/api/predict", files=upload(image, f"x.{fmt}"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "lensnet_light" and body["backend"] == "torch" and body["latency_ms"] > 0
    probs = [t["prob"] for t in body["top"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # the server says what the library says for the same bytes
    expected = load_run(run_dir).predict([image], topk=5)[0]
    assert [t["label"] for t in body["top"]] == expected.labels
    assert np.allclose(probs, expected.probs, atol=1e-5)


def test_conversions_mean_what_they_say(client, trained):
    """An animated GIF is its first frame; 16-bit grey is 8-bit grey scaled by 257."""
    _, data = trained
    probs = lambda image: [t["prob"] for t in client.post("/api/predict", files=upload(image)).json()["top"]]  # noqa: E731
    first = Image.fromarray(rgb(data, 4)).resize((45, 37)).quantize(64)
    single = io.BytesIO()
    first.save(single, "GIF")
    assert probs(encode(rgb(data, 4), "gif-animated")) == probs(single.getvalue())
    assert probs(encode(rgb(data, 4), "png-16bit")) == probs(encode(rgb(data, 4), "png-gray"))


def test_predict_topk_and_health_model_docs(client, trained):
    run_dir, data = trained
    r = client.post("/api/predict", files=upload(encode(rgb(data, 0), "png")), data={"topk": "3"})
    assert r.status_code == 200 and len(r.json()["top"]) == 3
    # training fitted a temperature: the answer says its probabilities are calibrated, and by what
    temperature = json.loads((run_dir / "run.json").read_text())["calibration"]["temperature"]
    assert r.json()["calibrated"] is True and r.json()["temperature"] == temperature
    assert client.get("/api/health").json() == {"status": "ok", "model": "lensnet_light", "backend": "torch",
                                                "warmed_up": True}

    info = client.get("/api/model").json()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert info["dataset"]["classes"] == list(data.classes) and info["dataset"]["image_size"] == 32
    assert info["test_metrics"]["accuracy"] == metrics["accuracy"]
    assert info["methods"] == list_methods() and info["default_method"] == "gradcam"
    assert info["backend"] == "torch" and info["explain_backend"] == "torch"
    assert info["limits"]["max_upload_bytes"] == LIMIT and str(run_dir) not in json.dumps(info)
    assert info["probabilities"] == {"calibrated": True, "temperature": temperature}

    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    # the docs work offline: every script and style comes from this server
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and all(a.startswith("/") for a in assets), assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert {"/api/predict", "/api/explain", "/api/health", "/api/model"} <= set(client.get("/openapi.json").json()["paths"])


def test_explain_returns_an_overlay_png(client, trained):
    run_dir, data = trained
    image = encode(rgb(data, 5), "png")
    r = client.post("/api/explain", files=upload(image))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(r.content))
    assert png.format == "PNG" and png.size == (32, 32) and png.mode == "RGB"
    predicted = load_run(run_dir).predict([image])[0]
    assert r.headers["x-method"] == "gradcam" and r.headers["x-explain-backend"] == "torch"
    assert r.headers["x-explained-class"] == r.headers["x-predicted-class"] == predicted.labels[0]
    assert float(r.headers["x-explained-prob"]) == pytest.approx(predicted.probs[0], abs=1e-4)
    assert r.headers["x-empty-map"] in ("true", "false") and float(r.headers["x-latency-ms"]) > 0

    # a requested class, by name and by index; another method
    other = data.classes[(data.classes.index(predicted.labels[0]) + 1) % 10]
    r = client.post("/api/explain", files=upload(image), data={"target": other, "method": "gradcam++"})
    assert r.status_code == 200 and r.headers["x-explained-class"] == other and r.headers["x-method"] == "gradcam++"
    r = client.post("/api/explain", files=upload(image), data={"target": "2"})
    assert r.status_code == 200 and r.headers["x-explained-index"] == "2"

    for fields, fragment in [({"target": "dragon"}, "unknown class"), ({"target": "10"}, "class index 10 out of range"),
                             ({"target": "x" * 5000}, "unknown class"), ({"method": "magic"}, "unknown explanation")]:
        r = client.post("/api/explain", files=upload(image), data=fields)
        assert r.status_code == 422 and fragment in r.json()["error"], (fields, r.text[:200])


def test_every_method_explains(client, trained):
    _, data = trained
    image = encode(rgb(data, 7), "png")
    for method in list_methods():
        r = client.post("/api/explain", files=upload(image), data={"method": method})
        assert r.status_code == 200, (method, r.text[:300])
        assert Image.open(io.BytesIO(r.content)).size == (32, 32)


def png_header_bomb() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels, in 70 bytes."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def real_bomb() -> bytes:
    """A real 8000 x 6000 bilevel PNG: 48 million pixels in a few kilobytes."""
    buf = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buf, "PNG")
    return buf.getvalue()


def chunked_upload(size: int) -> list[bytes]:
    """A multipart body as a list of chunks: httpx streams it with Transfer-Encoding: chunked."""
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
    return [head] + [b"\x89" * 65536] * (size // 65536)


PREDICT, EXPLAIN = ("/api/predict",), ("/api/explain",)
BOTH = PREDICT + EXPLAIN


def hostile_requests(good_png: bytes):
    """(what, request kwargs, expected status, fragment of the error[, paths]) for every kind of bad input."""
    multipart = {"content-type": "multipart/form-data; boundary=xyz"}
    return [
        ("empty body", dict(content=b""), 400, "empty request"),
        ("empty multipart body", dict(content=b"", headers=multipart), 400, "empty request"),
        ("empty file", dict(files=upload(b"")), 400, "empty"),
        ("not an image", dict(files=upload(b"%PDF-1.4 definitely not pixels" * 10)), 400, "cannot read image"),
        ("truncated png", dict(files=upload(good_png[: len(good_png) // 2])), 400, "cannot read image"),
        ("truncated jpeg", dict(files=upload(encode(np.full((40, 40, 3), 99, np.uint8), "jpeg")[:300])), 400,
         "cannot read image"),
        ("png header bomb", dict(files=upload(png_header_bomb())), 413, "more pixels than the limit of 40,000,000"),
        ("real decompression bomb", dict(files=upload(real_bomb())), 413, "refusing to decode"),
        ("too many bytes", dict(files=upload(b"\0" * (LIMIT + 1))), 413, "upload too large"),
        ("far too many bytes", dict(files=upload(b"\0" * (6 * LIMIT))), 413, "upload too large"),
        ("chunked, over the cap", dict(content=chunked_upload(3 * LIMIT), headers=multipart), 413,
         "upload too large"),
        ("wrong field name", dict(files={"image": ("a.png", good_png, "image/png")}), 422, "field 'file'"),
        ("file as a text field", dict(data={"file": "a.png"}, files={"x": ("x", b"1")}), 422,
         "'file' holds text, not a file"),
        ("raw image body", dict(content=good_png, headers={"content-type": "image/png"}), 415, "multipart/form-data"),
        ("json body", dict(json={"file": "a.png"}), 415, "multipart/form-data"),
        ("multipart without boundary", dict(content=b"--", headers={"content-type": "multipart/form-data"}), 400,
         "boundary"),
        ("garbage multipart", dict(content=b"garbage" * 100, headers=multipart), 400, "multipart"),
        ("topk not a number", dict(files=upload(good_png), data={"topk": "many"}), 422, "topk", PREDICT),
        ("topk zero", dict(files=upload(good_png), data={"topk": "0"}), 422, "topk", PREDICT),
        ("unknown method", dict(files=upload(good_png), data={"method": "magic"}), 422, "method", EXPLAIN),
        ("unknown class", dict(files=upload(good_png), data={"target": "dragon"}), 422, "unknown class", EXPLAIN),
    ]


def test_both_paths_are_warmed_up_before_the_first_request(trained, monkeypatch):
    """create_app predicts and explains once itself, so the first user does not pay for first use."""
    import cifarlens.explain
    from cifarlens.serve.service import TorchBackend

    run_dir, data = trained
    calls: list[str] = []
    explain_run, predict_proba = cifarlens.explain.explain_run, TorchBackend.predict_proba
    monkeypatch.setattr(cifarlens.explain, "explain_run",
                        lambda *a, **k: calls.append(f"explain {k['method']}") or explain_run(*a, **k))
    monkeypatch.setattr(TorchBackend, "predict_proba", lambda *a: calls.append("predict") or predict_proba(*a))
    log: list[str] = []
    app = create_app(run_dir, log=log.append)
    assert calls == ["predict", "explain gradcam"]  # before any request came
    assert [line for line in log if line.startswith("warmed up: one prediction and one gradcam explanation in ")]
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.get("/api/health").json()["warmed_up"] is True
        assert c.post("/api/explain", files=upload(encode(rgb(data, 0), "png"))).status_code == 200
    assert calls == ["predict", "explain gradcam", "explain gradcam"]  # the request went the warmed path


def test_hostile_inputs_get_json_errors_and_the_server_keeps_serving(client, trained):
    _, data = trained
    good = encode(rgb(data, 1), "png")
    expected = client.post("/api/predict", files=upload(good)).json()["top"]
    cases = hostile_requests(good)
    sent = 0
    for what, kwargs, status, fragment, *paths in cases:
        for path in paths[0] if paths else BOTH:
            r = client.post(path, **kwargs)
            sent += 1
            assert r.status_code == status, (what, path, r.status_code, r.text[:300])
            body = r.json()
            assert body["status"] == status and fragment in body["error"], (what, body)
    for path, method, status in [("/nope", "GET", 404), ("/api/predict", "GET", 405), ("/api/health", "POST", 405)]:
        r = client.request(method, path)
        assert r.status_code == status and r.json()["status"] == status
    for path in ("/", "/api/health", "/api/model", "/docs", "/favicon.ico"):  # uptime monitors and curl -I ask
        # with HEAD (it was 405)
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)
    assert sent >= 20
    again = client.post("/api/predict", files=upload(good))
    assert again.status_code == 200 and again.json()["top"] == expected


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict]:
    """Read one HTTP response (status, JSON body) from a raw socket."""
    sock.settimeout(timeout)
    raw = b""
    while b"\r\n\r\n" not in raw:
        part = sock.recv(65536)
        assert part, f"connection closed before a response: {raw!r}"
        raw += part
    head, body = raw.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return int(head.split()[1]), json.loads(body[:length])


def test_a_huge_declared_body_is_refused_without_reading_it(server):
    """A client that announces a terabyte and sends one kilobyte gets its 413 at once."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: multipart/form-data; boundary=xyz\r\n"
                     b"Content-Length: 1000000000000\r\n\r\n" + b"--xyz\r\n" + b"a" * 1024)
        status, body = read_response(sock, timeout=10)
        assert status == 413 and "1,000,000,000,000 bytes" in body["error"]
        assert time.monotonic() - start < 5


def test_a_chunked_body_is_cut_off_at_the_limit(server):
    """No Content-Length: the bytes are counted as they stream, and the server stops at the cap."""
    head = (b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n")
    part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n' \
           b"Content-Type: image/png\r\n\r\n"
    block = b"\x89" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < 40 * LIMIT:  # a client that would go on for 40 MiB
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and hung up while we were still sending
        status, body = read_response(sock, timeout=10)
    assert status == 413 and "upload too large" in body["error"]
    assert sent < 8 * LIMIT  # stopped near the cap, not after reading everything


def test_concurrent_requests_match_sequential_ones(server, trained):
    _, data = trained
    images = [encode(rgb(data, i), "png") for i in range(8)]

    def both(i: int):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            p = c.post("/api/predict", files=upload(images[i]))
            e = c.post("/api/explain", files=upload(images[i]), data={"target": str(i % 10)})
        assert p.status_code == 200 and e.status_code == 200, (p.text[:200], e.text[:200])
        return p.json()["top"], e.content, e.headers["x-explained-index"]

    sequential = [both(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(both, range(8)))
    for (top_s, png_s, idx_s), (top_c, png_c, idx_c) in zip(sequential, concurrent):
        assert [t["label"] for t in top_s] == [t["label"] for t in top_c]
        assert np.allclose([t["prob"] for t in top_s], [t["prob"] for t in top_c], atol=1e-6)
        assert idx_s == idx_c
        a, b = (np.asarray(Image.open(io.BytesIO(p)), dtype=int) for p in (png_s, png_c))
        assert np.abs(a - b).max() <= 1  # the same overlay (float sums may round one level apart)


# ---------------------------------------------------------------------------
# The ONNX backend (exported on the fly) and the ``cifarlens serve`` command
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def onnx_server(trained, tmp_path_factory):
    """The ONNX backend on a copy of the run without model.onnx, so create_app exports it first."""
    run_dir, _ = trained
    copy = tmp_path_factory.mktemp("onnx") / "run"
    shutil.copytree(run_dir, copy)
    (copy / "model.onnx").unlink(missing_ok=True)
    log: list[str] = []
    with LiveServer(create_app(copy, backend="onnx", log=log.append)) as live:
        live.run_dir, live.log = copy, log
        yield live


def test_onnx_backend_predicts_what_torch_predicts(onnx_server, server, trained):
    _, data = trained
    assert "missing" in onnx_server.log[0] and (onnx_server.run_dir / "model.onnx").is_file()
    assert any("onnx check" in line and "tolerance" in line for line in onnx_server.log)
    with httpx.Client(base_url=onnx_server.url, timeout=60) as onnx, \
            httpx.Client(base_url=server.url, timeout=60) as torch_:
        info = onnx.get("/api/model").json()
        assert info["backend"] == "onnx" and info["explain_backend"] == "torch"
        for i in range(12):
            image = encode(rgb(data, i), "png")
            a = onnx.post("/api/predict", files=upload(image)).json()
            b = torch_.post("/api/predict", files=upload(image)).json()
            assert a["backend"] == "onnx" and a["top"][0]["label"] == b["top"][0]["label"]
            assert a["calibrated"] and a["temperature"] == b["temperature"]  # T inside the ONNX graph
            assert np.allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=1e-4)
        r = onnx.post("/api/explain", files=upload(encode(rgb(data, 0), "png")))
        assert r.status_code == 200 and r.headers["x-explain-backend"] == "torch"
        assert onnx.post("/api/predict", files=upload(b"junk")).status_code == 400


def test_the_onnx_backend_without_calibration_leaves_the_calibrated_export_alone(onnx_server):
    """It exported raw logits over the calibrated model.onnx that `export` wrote."""
    from cifarlens.export import onnx_metadata

    run_dir = onnx_server.run_dir
    calibrated = (run_dir / "model.onnx").read_bytes()
    assert onnx_metadata(run_dir / "model.onnx")["calibration"]["calibrated"]
    log: list[str] = []
    create_app(run_dir, backend="onnx", calibrated=False, log=log.append)
    assert (run_dir / "model.onnx").read_bytes() == calibrated
    raw = run_dir / "model.uncalibrated.onnx"
    assert onnx_metadata(raw)["calibration"]["calibrated"] is False and str(raw) in log[0]
    log.clear()
    create_app(run_dir, backend="onnx", calibrated=False, log=log.append)  # current now: not exported again
    assert not any("exporting" in line for line in log)
    # `export --no-calibration` writes the same raw file, not over the calibrated one
    from cifarlens.cli import main

    raw.unlink()
    assert main(["export", str(run_dir), "--format", "onnx", "--no-calibration"]) == 0
    assert (run_dir / "model.onnx").read_bytes() == calibrated
    assert onnx_metadata(raw)["calibration"]["calibrated"] is False



@pytest.mark.slow  # a uvicorn process, ~7 s; CI runs it with the slow set (the page tests use a live server too)
def test_serve_command(onnx_server):
    """The real ``cifarlens serve`` in a subprocess: binds 127.0.0.1, reuses a current model.onnx, stops on Ctrl+C."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cifarlens.cli", "serve", str(onnx_server.run_dir),
                             "--backend", "onnx", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health.json()["backend"] == "onnx"
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            out = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    assert proc.returncode == 0, out
    assert f"on http://127.0.0.1:{port}/" in out and "server stopped" in out
    assert "exporting" not in out and "Traceback" not in out
    assert out.index("warmed up: one prediction") < out.index(f"on http://127.0.0.1:{port}/")  # warm, then open


def test_serving_without_calibration_gives_the_raw_softmax(trained, client):
    from cifarlens.api import load_run

    run_dir, data = trained
    image = encode(rgb(data, 3), "png")
    raw_run = load_run(run_dir, calibrated=False)
    with LiveServer(create_app(run_dir, calibrated=False)) as live, httpx.Client(base_url=live.url, timeout=60) as raw:
        assert raw.get("/api/model").json()["probabilities"] == {"calibrated": False, "temperature": None}
        a = raw.post("/api/predict", files=upload(image)).json()
    b = client.post("/api/predict", files=upload(image)).json()
    assert a["calibrated"] is False and a["top"][0]["label"] == b["top"][0]["label"]
    from cifarlens.images import load_image

    want = raw_run.predict_proba(load_image(image, 3, 32)[None])[0].max().item()
    assert a["top"][0]["prob"] == pytest.approx(want, abs=1e-5)


def test_serve_refuses_a_busy_port_and_bad_flags(trained, capsys, monkeypatch):
    import cifarlens.serve.app as app

    run_dir, _ = trained
    with socket.create_server(("127.0.0.1", 0)) as busy, monkeypatch.context() as patch:
        patch.setattr(app, "create_app", lambda *a, **k: pytest.fail("the model was loaded before the port"))
        port = busy.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--max-upload-mb", "0"]) == 2
    assert main(["serve", str(run_dir.parent / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The page, in a real browser
# ---------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for get_log("browser")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def console_errors(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_the_api_page_renders_every_route_offline(browser, server):
    """/docs showed "Unable to render this definition": swagger-ui-bundle's Swagger UI 4.15 cannot
    read the OpenAPI 3.1 schema FastAPI writes."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/docs")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.text.replace("\u200b", "") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/api/predict", "/api/explain", "/api/health", "/api/model"} <= paths, paths
    assert "Unable to render" not in browser.page_source
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(server.url) or u.startswith("data:") for u in resources), resources


def test_a_fresh_page_shows_hints_not_broken_images_and_logs_no_error(browser, server):
    """Before the first upload: no broken-image placeholder, a hint instead; no 404 (favicon) or
    script error in the console."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#method option"))
    shown = browser.execute_script("""
        return [...document.images].filter(i => i.getClientRects().length > 0)
          .map(i => ({id: i.id, ok: i.complete && i.naturalWidth > 0}));""")
    assert all(img["ok"] for img in shown), shown  # every visible image is a real, loaded image
    hints = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".hint") if e.is_displayed()]
    assert len(hints) == 2 and all(hints), hints  # in place of the image and of the overlay
    # the page's icon is served (were it not, its 404 would be a console error, checked below)
    browser.get(server.url + "/favicon.ico")  # and it is an image the browser can draw
    assert browser.execute_script("const i = document.querySelector('img'); return i && i.naturalWidth") == 32
    assert console_errors(browser) == []


def test_page_in_a_real_browser(browser, server, trained, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, data = trained
    image = tmp_path / "cat.webp"
    image.write_bytes(encode(rgb(data, 2), "webp"))
    wait = WebDriverWait(browser, 60)

    browser.get(server.url + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#method option"))
    assert "lensnet_light" in browser.find_element(By.ID, "model-name").text
    assert "Probabilities are calibrated (temperature scaling, T = " in browser.find_element(By.ID, "backend-note").text
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 5)
    wait.until(lambda d: d.execute_script("const i = document.getElementById('overlay');"
                                          "return i.complete && i.naturalWidth > 0"))
    probs = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .prob")]
    assert all(re.fullmatch(r"\d{1,3}\.\d%", p) for p in probs), probs
    assert browser.execute_script("return document.getElementById('overlay').naturalWidth") == 32
    assert re.search(r"[\d.]+ ms", browser.find_element(By.ID, "latency").text)
    wait.until(lambda d: "gradcam" in d.find_element(By.ID, "explain-note").text)
    assert browser.find_element(By.ID, "error").text == ""

    # clicking a bar explains that class
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    second = bars[1].find_element(By.CSS_SELECTOR, ".label").text
    bars[1].click()
    wait.until(lambda d: f"\u201c{second}\u201d" in d.find_element(By.ID, "explain-note").text)

    # drag and drop: a file made in the page itself, dropped on the drop zone
    browser.execute_script("""
        const c = document.createElement('canvas'); c.width = 50; c.height = 40;
        const g = c.getContext('2d'); g.fillStyle = '#3080c0'; g.fillRect(0, 0, 50, 40);
        c.toBlob((blob) => {
          const dt = new DataTransfer();
          dt.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
          document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        }, 'image/png');""")
    wait.until(lambda d: "dropped.png" in d.find_element(By.ID, "preview-note").text)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 5)

    # a broken file shows the server's message
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not really a png")
    browser.find_element(By.ID, "file").send_keys(str(broken))
    wait.until(lambda d: "cannot read image" in d.find_element(By.ID, "error").text)
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\0" * (2 * LIMIT))
    browser.find_element(By.ID, "file").send_keys(str(huge))
    wait.until(lambda d: "upload too large" in d.find_element(By.ID, "error").text)

    # nothing left the machine: every resource came from this server (or a blob: URL made by the page)
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(u.startswith(server.url) or u.startswith("blob:") for u in resources), resources
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", browser.page_source)
    assert "default-src 'none'" in httpx.get(server.url + "/").headers["content-security-policy"]


def test_several_images_in_one_request_and_a_non_ascii_digit_target_are_422(client, trained):
    """Two 'file' parts were answered for the last one alone; target '²' (str.isdigit) was a 500."""
    _, data = trained
    good, other = encode(rgb(data, 0), "png"), encode(rgb(data, 1), "png")
    for path in ("/api/predict", "/api/explain"):
        r = client.post(path, files=[("file", ("a.png", good, "image/png")), ("file", ("b.png", other, "image/png"))])
        assert r.status_code == 422 and "one image per request" in r.json()["error"], r.text
        # a second image under another field was ignored silently: the answer was about one of the two
        r = client.post(path, files=[("file", ("a.png", good, "image/png")), ("image2", ("b.png", other, "image/png"))])
        assert r.status_code == 422 and "a file in 'image2' too" in r.json()["error"], r.text
    r = client.post("/api/explain", files=upload(good), data={"target": "\u00b2"})
    assert r.status_code == 422 and "unknown class" in r.json()["error"], r.text


def test_serve_flags_outside_their_range_are_one_line_errors(trained, capsys):
    run_dir, _ = trained
    for flags, message in ((["--max-upload-mb", "inf"], "--max-upload-mb must be in (0, 1024]"),
                           (["--max-upload-mb", "nan"], "--max-upload-mb must be in (0, 1024]"),
                           (["--topk", "0"], "--topk must be from 1 to 1000"),
                           (["--topk", "1500"], "--topk must be from 1 to 1000"),  # every upload of the page got 422
                           (["--max-upload-mb", "1e-9"], "--max-upload-mb must be at least 1 KiB"),
                           (["--host", "192.0.2.1"], "is --host an address of this machine?")):
        assert main(["serve", str(run_dir), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def numeric_classes_run(tmp_path_factory):
    """An image folder whose classes are '1', 'cat' and 'dog': the class named '1' sorts first (index 0)."""
    from conftest import make_imagefolder

    root = tmp_path_factory.mktemp("numeric")
    data = make_imagefolder(root / "images", classes=("1", "cat", "dog"), n_per_class=12, sizes=((32, 32),))
    cfg = merge(RunConfig(), {
        "data": {"dataset": "imagefolder", "data_dir": str(data.data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
        "train": {"batch_size": 16, "epochs": 1},
    })
    train(cfg, root / "run", evaluate_test=False)
    return root / "run"


def test_a_slow_answer_about_an_earlier_image_is_not_shown_beside_the_next(browser, server, trained, tmp_path):
    """The first image's late prediction drew its bars beside the second image, whose explanation
    then ran on the new image: two images' answers mixed on one page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, data = trained
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(encode(rgb(data, 0), "png"))
    second.write_bytes(encode(255 - rgb(data, 1), "png"))
    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#method option"))
    browser.execute_script("""
        const real = window.fetch; window.lateDone = 0;
        window.fetch = async (path, options) => {  // every answer about first.png comes 1.5 s late
          const file = options && options.body && options.body.get ? options.body.get('file') : null;
          const response = await real(path, options);
          if (file && file.name === 'first.png') {
            await new Promise((ok) => setTimeout(ok, 1500)); window.lateDone++;
          }
          return response;
        };""")
    browser.find_element(By.ID, "file").send_keys(str(first))
    browser.find_element(By.ID, "file").send_keys(str(second))
    wait.until(lambda d: d.execute_script("return window.lateDone") >= 1 and
               "gradcam" in d.find_element(By.ID, "explain-note").text)
    time.sleep(0.5)  # anything the late answer would still draw
    expected = httpx.post(server.url + "/api/predict", files={"file": ("second.png", second.read_bytes(), "image/png")},
                          data={"topk": "5"}).json()["top"]
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .label")]
    probs = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .prob")]
    assert labels == [t["label"] for t in expected]
    assert probs == [f"{100 * t['prob']:.1f}%" for t in expected]
    assert "second.png" in browser.find_element(By.ID, "preview-note").text
    assert browser.find_element(By.ID, "error").text == ""
    assert browser.execute_script("return window.lateDone") == 1  # the first image's explanation never asked


def test_the_page_explains_the_class_chosen_when_class_names_are_numbers(browser, numeric_classes_run, tmp_path):
    """The page sent the chosen class's index ("1" for cat), which the API read as the class named "1"."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image = tmp_path / "x.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(image)
    wait = WebDriverWait(browser, 60)
    with LiveServer(create_app(numeric_classes_run, max_upload_bytes=LIMIT)) as live:
        browser.get(live.url + "/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#target option"))
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: "gradcam" in d.find_element(By.ID, "explain-note").text)
        for name in ("cat", "1", "dog"):
            browser.execute_script("document.getElementById('explain-note').textContent = ''")  # a new answer only
            Select(browser.find_element(By.ID, "target")).select_by_visible_text(name)
            wait.until(lambda d: f"\u201c{name}\u201d" in d.find_element(By.ID, "explain-note").text)


def test_the_page_of_an_unfinished_run_says_what_its_weights_lack(browser, trained, tmp_path):
    """It said "without a test evaluation" after `evaluate` had made one (predict's warning did not)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    copy = tmp_path / "halfway"
    shutil.copytree(trained[0], copy)
    meta = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps(meta | {"status": "interrupted", "epochs_done": 1}))
    for lacks, note in ((False, "these are its weights so far."),
                        (True, "these are its weights so far, without a test evaluation.")):
        if lacks:
            (copy / "metrics.json").unlink()
        with LiveServer(create_app(copy)) as live:
            assert httpx.get(live.url + "/api/model").json()["trained"]["note"] == \
                f"halfway was interrupted after 1 epoch(s): {note[:-1]}"
            browser.get(live.url + "/")
            WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#method option"))
            text = browser.find_element(By.ID, "backend-note").text
            assert text.startswith(f"When the server started, run halfway was interrupted after 1 epoch(s): {note} "
                                   "Predictions: torch backend."), text
            assert str(tmp_path) not in text  # the server does not publish its file system


def test_a_class_name_longer_than_200_characters_can_be_explained_by_name():
    """The page sends class names as the target; one over 200 characters (an image folder's class may
    have 255 bytes) was 'unknown class' although the model has it."""
    from types import SimpleNamespace

    from cifarlens.serve.upload import ApiError
    from cifarlens.serve.service import Service

    long = "a" * 220
    service = SimpleNamespace(run=SimpleNamespace(classes=("cat", long)))
    assert Service.resolve_target(service, long) == 1 and Service.resolve_target(service, "cat") == 0
    with pytest.raises(ApiError, match="unknown class: a name of 5,000 characters"):
        Service.resolve_target(service, "x" * 5000)
