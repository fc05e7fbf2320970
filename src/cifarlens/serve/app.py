"""The web app: one static page and a small JSON API over one trained run.

Endpoints (``create_app`` builds them; ``cifarlens serve`` runs them under uvicorn)::

    GET  /              the page (inline CSS/JS, no external assets)
    GET  /api/health    {"status": "ok", ...}
    GET  /api/model     dataset, classes, model, test metrics, explanation methods, limits
    POST /api/predict   multipart field ``file`` (+ optional ``topk``) -> top-k JSON with latency
    POST /api/explain   multipart field ``file`` (+ ``method``, ``target``) -> overlay PNG
    GET  /docs          OpenAPI docs (FastAPI's Swagger UI)

Every error is JSON ``{"error": message, "status": code}``:

    400  empty body or file, bytes that are not an image, truncated image, malformed multipart
    404  unknown path; 405 wrong method
    413  body over ``max_upload_bytes`` (answered from Content-Length before reading, or as soon
         as a streamed body passes the cap), or an image over ``images.MAX_PIXELS`` pixels
         (a decompression bomb: too large as well, and the fix is the same, a smaller image)
    415  body not multipart/form-data
    422  no field ``file``, unknown explanation method or class, bad ``topk``

Safety: uploaded bytes only ever go through ``cifarlens.images.load_image`` (never
unpickled, never written to a path we choose); the model comes from the run folder
given at start-up, loaded once. Requests run in FastAPI's thread pool; at most
``max_concurrency`` decode-and-infer at once, which bounds memory under a flood.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import anyio
import numpy as np
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cifarlens.api import Prediction, Run, load_run
from cifarlens.errors import CifarlensError
from cifarlens.images import MAX_PIXELS, ImageTooLarge, load_image
from cifarlens.serve import BACKENDS

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 4
UPLOAD_PATHS = ("/api/predict", "/api/explain")


class TopClass(BaseModel):
    label: str
    index: int
    prob: float


class PredictResponse(BaseModel):
    model: str
    backend: str
    top: list[TopClass]  # most probable first
    latency_ms: float  # decoding and inference on the server


class ApiError(Exception):
    """An error answered as JSON with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------
# Prediction backends
# ---------------------------------------------------------------------------


class Backend(Protocol):
    name: str

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) at the model's size -> probabilities (B, num_classes) on the CPU."""


class TorchBackend:
    name = "torch"

    def __init__(self, run: Run):
        self.run = run

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        return self.run.predict_proba(images)


class OnnxBackend:
    """onnxruntime on the run's exported model, with exactly the run's preprocessing."""

    name = "onnx"

    def __init__(self, run: Run, path: str | Path):
        from cifarlens.export import onnx_session

        self.run, self.path = run, Path(path)
        self.session = onnx_session(self.path)  # InferenceSession.run is thread-safe
        shape = self.session.get_inputs()[0].shape  # e.g. ['batch', 3, 32, 32]
        want = [run.info.in_channels, run.info.image_size, run.info.image_size]
        if list(shape[1:]) != want:
            raise CifarlensError(f"{self.path} takes inputs of shape {shape[1:]}, but the run's model takes {want}; "
                                 f"export it again: cifarlens export {run.path} --format onnx")

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        from cifarlens.export import run_onnx

        x = self.run.preprocess(images).cpu().numpy()  # (B, C, H, W)
        logits = run_onnx(self.session, x)  # (B, K)
        if self.run.tta:  # as the run was evaluated: the mean with the mirror image's logits
            logits = 0.5 * (logits + run_onnx(self.session, np.ascontiguousarray(x[..., ::-1])))
        return torch.from_numpy(logits).float().softmax(dim=1)


def onnx_backend(run: Run, log=print) -> OnnxBackend:
    """The run's ``model.onnx``, exported (and checked) first when missing or older than the weights."""
    from cifarlens.export import ONNX_FILE, export_onnx, onnx_is_current

    path = run.path / ONNX_FILE
    if not onnx_is_current(run.path, path):
        log(f"{path} is {'stale' if path.is_file() else 'missing'}; exporting it from {run.path}/model.safetensors")
        export_onnx(run.path, path, log=log)
    return OnnxBackend(run, path)


def top_k(probs: torch.Tensor, classes, k: int) -> list[Prediction]:
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [Prediction([classes[i] for i in idx.tolist()], vals.tolist(), idx.tolist())
            for vals, idx in zip(values, indices)]


# ---------------------------------------------------------------------------
# Body-size cap
# ---------------------------------------------------------------------------


class UploadLimit:
    """ASGI middleware: answer 413 JSON for bodies over ``max_bytes`` without reading them whole.

    A declared Content-Length over the cap is refused before the app runs (no byte of
    the body is read). A body without one (chunked) or lying about it is counted as it
    streams; once past the cap the app's read fails and whatever it would have answered
    is replaced by the 413. The connection is closed after the answer.
    """

    # After the 413 is written, what the client is still sending is read and dropped for at
    # most this long before closing: closing a socket with unread data makes the kernel send
    # a reset, and most clients (browsers, httpx, curl) then report "connection reset" instead
    # of the answer they already received. Bounded in time, and nothing is kept.
    drain_seconds = 2.0

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(receive, send, int(declared))

        received, exceeded, responded = 0, False, False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal responded
            if exceeded:  # swap the app's answer to the failed read (400, 500...) for the 413
                if message["type"] == "http.response.start" and not responded:
                    responded = True
                    await self._reject(receive, send, None)
                return
            if message["type"] == "http.response.start":
                responded = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not responded:
            await self._reject(receive, send, None)

    async def _reject(self, receive, send, declared: int | None) -> None:
        size = f"{declared:,} bytes" if declared is not None else f"more than {self.max_bytes:,} bytes"
        body = json.dumps({"error": f"upload too large: {size}; the limit is {self.max_bytes:,} bytes "
                                    f"({self.max_bytes / 2**20:.1f} MiB)", "status": 413}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": True})  # the client has it all now
        with anyio.move_on_after(self.drain_seconds):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _BodyTooLarge(Exception):
    pass


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------


class Service:
    """The loaded run and what the endpoints share; thread-safe (the models are only read)."""

    def __init__(self, run: Run, backend: Backend, topk: int, max_upload_bytes: int, max_concurrency: int):
        from cifarlens.explain import list_methods

        self.run, self.backend, self.topk = run, backend, topk
        self.max_upload_bytes = max_upload_bytes
        self.slots = threading.BoundedSemaphore(max_concurrency)
        self.methods = list(list_methods())
        self.default_method = "gradcam" if "gradcam" in self.methods else self.methods[0]
        self.model_name = run.config.model.name
        self.description = self._describe()

    def _describe(self) -> dict:
        from cifarlens.export import describe_run
        from cifarlens.runs import RunDir

        meta = RunDir(self.run.path).meta()
        described = describe_run(self.run)
        return {
            "run": self.run.path.name,  # the name only: the server does not publish its file system
            **{k: described[k] for k in ("model", "dataset", "test_metrics", "preprocessing")},
            "trained": {k: meta[k] for k in ("status", "epochs_done", "best_epoch") if k in meta},
            "backend": self.backend.name,
            "explain_backend": "torch",  # Grad-CAM needs gradients, so always the PyTorch model
            "methods": self.methods,
            "default_method": self.default_method,
            "topk": self.topk,
            "limits": {"max_upload_bytes": self.max_upload_bytes, "max_pixels": MAX_PIXELS},
        }

    # -- work done in the thread pool ---------------------------------------------------
    def decode(self, data: bytes, filename: str | None) -> torch.Tensor:
        """Upload bytes -> uint8 (C, H, W) at the model's size, through the one image decoder."""
        if not data:
            raise ApiError(400, "the uploaded file is empty")
        name = f"upload {filename[:80]!r}" if filename else "upload"
        try:
            return load_image(data, self.run.info.in_channels, self.run.info.image_size, name=name)
        except ImageTooLarge as err:  # decompression-bomb guard
            raise ApiError(413, str(err)) from None
        except CifarlensError as err:
            raise ApiError(400, str(err)) from None

    def predict(self, data: bytes, filename: str | None, k: int) -> dict:
        start = time.perf_counter()
        with self.slots:
            image = self.decode(data, filename)
            pred = top_k(self.backend.predict_proba(image[None]), self.run.classes, k)[0]
        return {"model": self.model_name, "backend": self.backend.name, **pred.as_dict(),
                "latency_ms": round((time.perf_counter() - start) * 1000, 2)}

    def explain(self, data: bytes, filename: str | None, method: str, target: int | None) -> tuple[bytes, dict]:
        from PIL import Image

        from cifarlens.explain import explain_run, overlay

        start = time.perf_counter()
        with self.slots:
            image = self.decode(data, filename)  # (C, H, W) uint8
            # the prediction and probabilities are the run's own (with its flip TTA, as
            # /api/predict reports them); the map explains that class on the image as given
            probs = self.run.predict_proba(image[None])[0]
            predicted = int(probs.argmax())
            exp = explain_run(self.run, image[None], method=method, target=predicted if target is None else target)
            rgb = overlay(image, exp.maps[0])  # (H, W, 3) uint8
        buf = io.BytesIO()
        Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
        explained = int(exp.targets[0])
        classes = self.run.classes
        headers = {  # class names may be any Unicode: percent-encoded (decodeURIComponent on the page)
            "X-Method": method,
            "X-Predicted-Class": quote(classes[predicted]), "X-Predicted-Index": str(predicted),
            "X-Explained-Class": quote(classes[explained]), "X-Explained-Index": str(explained),
            "X-Explained-Prob": f"{float(probs[explained]):.6f}",
            "X-Empty-Map": "true" if bool(exp.empty[0]) else "false",  # "no evidence", not a heatmap
            "X-Explain-Backend": "torch",
            "X-Latency-Ms": f"{(time.perf_counter() - start) * 1000:.2f}",
        }
        return buf.getvalue(), headers

    def resolve_target(self, target: str | None) -> int | None:
        """A class name or index (as sent in the form) -> class index; None explains the prediction."""
        from cifarlens.explain import resolve_class

        if target is None or target.strip() == "":
            return None
        if len(target) > 200:
            raise ApiError(422, f"unknown class: a name of {len(target):,} characters")
        try:
            return resolve_class(target, self.run.classes)
        except CifarlensError as err:
            raise ApiError(422, str(err)) from None


def _add_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the swagger-ui-bundle package, so the docs work offline
    (FastAPI's default page loads its script and style from a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="cifarlens API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def create_app(
    run_dir: str | Path,
    *,
    backend: str = "torch",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    topk: int = 5,
    device: str = "cpu",
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    log=print,
) -> FastAPI:
    """The FastAPI app serving ``run_dir`` (loaded now, once); see the module docstring for the API.

    ``backend="onnx"`` predicts through onnxruntime on ``RUN_DIR/model.onnx``, exporting it
    (with the PyTorch comparison) first when it is missing or stale; explanations always
    use the PyTorch model.
    """
    if backend not in BACKENDS:
        raise CifarlensError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if max_upload_bytes < 1 or topk < 1 or max_concurrency < 1:
        raise CifarlensError("max_upload_bytes, topk and max_concurrency must be positive")
    run = load_run(run_dir, device=device)
    chosen: Backend = onnx_backend(run, log) if backend == "onnx" else TorchBackend(run)
    service = Service(run, chosen, topk, max_upload_bytes, max_concurrency)

    app = FastAPI(title="cifarlens", version=_version(), docs_url=None,
                  description=f"Predictions and explanations of the run `{run.path.name}` "
                              f"({service.model_name} on {run.info.name}).")
    app.state.service = service
    _add_offline_docs(app)
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    _add_error_handlers(app)

    from cifarlens.serve.page import PAGE

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        # the CSP makes "no external network" a browser-enforced fact, not just a habit
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'")})

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok", "model": service.model_name, "backend": chosen.name}

    @app.get("/api/model")
    def model() -> dict:
        return service.description

    @app.post("/api/predict", response_model=PredictResponse)
    async def predict(file: UploadFile = File(..., description="the image"),
                      topk: int = Form(service.topk, ge=1, le=1000, description="how many classes")) -> dict:
        data = await file.read()
        return await run_in_threadpool(service.predict, data, file.filename, topk)

    @app.post("/api/explain", response_class=Response,
              responses={200: {"content": {"image/png": {}},
                               "description": "the overlay at the model's input size; X-* headers describe it"}})
    async def explain(file: UploadFile = File(..., description="the image"),
                      method: str = Form(service.default_method, description=f"one of {service.methods}"),
                      target: str | None = Form(None, description="class name or index; default the prediction"),
                      ) -> Response:
        if method not in service.methods:
            raise ApiError(422, f"unknown explanation method {method[:40]!r}; choose one of: "
                                f"{', '.join(service.methods)}")
        index = service.resolve_target(target)
        data = await file.read()
        png, headers = await run_in_threadpool(service.explain, data, file.filename, method, index)
        return Response(png, media_type="image/png", headers=headers)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message)

    @app.exception_handler(CifarlensError)
    async def on_user_error(request: Request, exc: CifarlensError):
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]  # without "input": it may hold the upload itself
        if request.url.path in UPLOAD_PATHS:
            ctype = request.headers.get("content-type", "")
            if request.headers.get("content-length") == "0" or (
                    "content-length" not in request.headers and "transfer-encoding" not in request.headers):
                return error_response(400, "empty request: send the image as multipart/form-data "
                                           "in the field 'file'", detail=errors)
            if not ctype.lower().startswith("multipart/form-data"):
                return error_response(415, f"expected multipart/form-data with the image in the field 'file', "
                                           f"got content type {ctype[:60]!r}", detail=errors)
            if any(e["loc"][-1:] == ["file"] for e in errors):
                return error_response(422, "no image in the form field 'file': send the image as multipart/"
                                           "form-data in a field named 'file'", detail=errors)
        message = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'request'}: {e['msg']}" for e in errors)
        return error_response(422, message or "invalid request", detail=errors)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):  # logged by uvicorn; the server keeps serving
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


def _version() -> str:
    from cifarlens import __version__

    return __version__
