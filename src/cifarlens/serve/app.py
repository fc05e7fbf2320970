"""The web app: one static page and a small JSON API over one trained run.

Endpoints (``create_app`` builds them; ``cifarlens serve`` runs them under uvicorn)::

    GET  /              the page (inline CSS/JS, no external assets)
    GET  /favicon.ico   a small PNG icon
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

Three layers, each importing only the ones below it: :mod:`cifarlens.serve.upload` (body
cap, image validation), :mod:`cifarlens.serve.service` (backends, the loaded run) and this
module (routes and error handling).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cifarlens.api import load_run
from cifarlens.errors import CifarlensError
from cifarlens.serve.backends import BACKENDS
# The layers below, re-exported: ``cifarlens.serve.app`` was one module and is still imported as one.
from cifarlens.serve.service import (  # noqa: F401
    DEFAULT_MAX_CONCURRENCY, MAX_TOPK, Backend, OnnxBackend, Service, TorchBackend, onnx_backend, top_k,
)
from cifarlens.serve.upload import (  # noqa: F401
    DEFAULT_MAX_UPLOAD_BYTES, UPLOAD_PATHS, ApiError, UploadLimit, decode_upload,
)


class TopClass(BaseModel):
    label: str
    index: int
    prob: float


class PredictResponse(BaseModel):
    model: str
    backend: str
    top: list[TopClass]  # most probable first
    calibrated: bool  # whether the probabilities are temperature-scaled (fitted on the validation split)
    temperature: float | None  # the temperature the logits were divided by (None: raw softmax)
    latency_ms: float  # decoding and inference on the server


def error_response(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status, headers=headers)


def _add_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the swagger-ui-py package's copy of Swagger UI 5, so the docs work
    offline (FastAPI's default page loads its script and style from a CDN). Not swagger-ui-bundle:
    its Swagger UI 4.15 cannot read the OpenAPI 3.1 schema FastAPI writes ("Unable to render this
    definition")."""
    from importlib.resources import files

    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs-assets", StaticFiles(directory=str(files("swagger_ui") / "static")), name="docs-assets")

    @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
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
    calibrated: bool = True,
) -> FastAPI:
    """The FastAPI app serving ``run_dir`` (loaded now, once); see the module docstring for the API.

    ``backend="onnx"`` predicts through onnxruntime on ``RUN_DIR/model.onnx``, exporting it
    (with the PyTorch comparison) first when it is missing or stale; explanations always
    use the PyTorch model. Both paths are warmed up (:meth:`Service.warm_up`) before this returns.
    """
    if backend not in BACKENDS:
        raise CifarlensError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    for name, value in (("max_upload_bytes", max_upload_bytes), ("topk", topk), ("max_concurrency", max_concurrency)):
        if value < 1:
            raise CifarlensError(f"{name} must be at least 1, got {value}")
    if topk > MAX_TOPK:  # the page sends it with every upload, which the API then refused (422)
        raise CifarlensError(f"topk must be at most {MAX_TOPK}, got {topk}")
    run = load_run(run_dir, device=device, calibrated=calibrated)  # the run's temperature, unless told not to
    chosen: Backend = onnx_backend(run, log) if backend == "onnx" else TorchBackend(run)
    service = Service(run, chosen, topk, max_upload_bytes, max_concurrency)
    log(f"warmed up: one prediction and one {service.default_method} explanation in {service.warm_up():.1f} s")

    app = FastAPI(title="cifarlens", version=_version(), docs_url=None,
                  description=f"Predictions and explanations of the run `{run.path.name}` "
                              f"({service.model_name} on {run.info.name}).")
    app.state.service = service
    _add_offline_docs(app)
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    _add_error_handlers(app)

    from cifarlens.serve.page import PAGE, favicon_png

    # HEAD as well as GET on the page and the health check: uptime monitors and `curl -I` ask with HEAD
    # (Starlette's own routes answer it; FastAPI's GET routes answered 405)
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        # the CSP makes "no external network" a browser-enforced fact, not just a habit
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'")})

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
    def favicon() -> Response:  # browsers ask for it on every page: a 404 would sit in their console
        return Response(favicon_png(), media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    @app.api_route("/api/health", methods=["GET", "HEAD"])
    def health() -> dict:
        return {"status": "ok", "model": service.model_name, "backend": chosen.name,
                "warmed_up": service.warm_up_seconds is not None}

    @app.api_route("/api/model", methods=["GET", "HEAD"])
    def model() -> dict:
        return service.description

    @app.post("/api/predict", response_model=PredictResponse)
    async def predict(request: Request, file: UploadFile = File(..., description="the image"),
                      topk: int = Form(service.topk, ge=1, le=MAX_TOPK, description="how many classes")) -> dict:
        await _one_file(request)
        data = await file.read()
        return await run_in_threadpool(service.predict, data, file.filename, topk)

    @app.post("/api/explain", response_class=Response,
              responses={200: {"content": {"image/png": {}},
                               "description": "the overlay at the model's input size; X-* headers describe it"}})
    async def explain(request: Request, file: UploadFile = File(..., description="the image"),
                      method: str = Form(service.default_method, description=f"one of {service.methods}"),
                      target: str | None = Form(None, description="class name or index; default the prediction"),
                      ) -> Response:
        if method not in service.methods:
            raise ApiError(422, f"unknown explanation method {method[:40]!r}; choose one of: "
                                f"{', '.join(service.methods)}")
        await _one_file(request)
        index = service.resolve_target(target)
        data = await file.read()
        png, headers = await run_in_threadpool(service.explain, data, file.filename, method, index)
        return Response(png, media_type="image/png", headers=headers)

    return app


async def _one_file(request: Request) -> None:
    """422 for a form with several ``file`` parts, or a file under another field as well: answering
    for one of them would be half an answer (FastAPI keeps the last ``file`` and ignores the other
    fields). The form is parsed once; this reads FastAPI's parsed copy."""
    form = await request.form()
    if len(form.getlist("file")) > 1:
        raise ApiError(422, "one image per request: the form has several 'file' fields")
    others = sorted({key for key, value in form.multi_items() if key != "file" and not isinstance(value, str)})
    if others:
        raise ApiError(422, "one image per request, in the field 'file': the form has a file in "
                            f"{', '.join(repr(key[:40]) for key in others[:3])}{', ...' if len(others) > 3 else ''} too")


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
                if isinstance((await request.form()).get("file"), str):  # a part without a filename is text
                    return error_response(422, "the form field 'file' holds text, not a file: send the image as "
                                               "a file part, with a filename (curl -F file=@image.png)",
                                          detail=errors)
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
