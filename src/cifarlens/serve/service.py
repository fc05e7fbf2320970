"""The model behind the web app: prediction backends and :class:`Service`, the loaded run
that the endpoints share (decode, predict, explain), with a bound on concurrent work."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import numpy as np
import torch

from cifarlens.api import Prediction, Run
from cifarlens.errors import CifarlensError
from cifarlens.images import MAX_PIXELS
from cifarlens.serve.upload import ApiError, decode_upload
from cifarlens.tta import tta_logits

DEFAULT_MAX_CONCURRENCY = 4
MAX_TOPK = 1000  # the most classes one answer lists (the API's topk field, serve --topk)


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
        from cifarlens.onnxfile import onnx_session

        self.run, self.path = run, Path(path)
        self.session = onnx_session(self.path)  # InferenceSession.run is thread-safe
        shape = self.session.get_inputs()[0].shape  # e.g. ['batch', 3, 32, 32]
        want = [run.info.in_channels, run.info.image_size, run.info.image_size]
        if list(shape[1:]) != want:
            raise CifarlensError(f"{self.path} takes inputs of shape {shape[1:]}, but the run's model takes {want}; "
                                 f"export it again: cifarlens export {run.path} --format onnx")

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        from cifarlens.onnxfile import run_onnx

        def forward(x: torch.Tensor) -> torch.Tensor:  # (B, K), divided by the run's temperature inside the graph
            return torch.from_numpy(run_onnx(self.session, x.numpy())).float()

        x = self.run.preprocess(images).cpu()  # (B, C, H, W)
        # as the run was evaluated: with its TTA, the same views and weights as the torch backend's
        logits = tta_logits(forward, x, self.run.tta_translate) if self.run.tta else forward(x)
        return logits.softmax(dim=1)


def onnx_backend(run: Run, log=print) -> OnnxBackend:
    """The run's ``model.onnx``, exported (and checked) first when missing or older than the weights.
    Served uncalibrated (``--no-calibration``), a calibrated run uses ``model.uncalibrated.onnx``
    instead, so that the calibrated file ``export`` wrote is never replaced."""
    from cifarlens.export import default_onnx_path, export_onnx, onnx_is_current

    path = default_onnx_path(run)
    if not onnx_is_current(run.path, path, run.temperature):  # the temperature is part of the graph
        log(f"{path} is {'stale' if path.is_file() else 'missing'}; exporting it from {run.path}/model.safetensors")
        export_onnx(run.path, path, log=log, calibrated=run.calibrated)
    return OnnxBackend(run, path)


def top_k(probs: torch.Tensor, classes, k: int) -> list[Prediction]:
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [Prediction([classes[i] for i in idx.tolist()], vals.tolist(), idx.tolist())
            for vals, idx in zip(values, indices)]



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
        self.warm_up_seconds: float | None = None  # set by warm_up()

    def _describe(self) -> dict:
        from cifarlens.export import describe_run
        from cifarlens.runs import RunDir

        run_dir = RunDir(self.run.path)
        meta, unfinished = run_dir.meta(), run_dir.unfinished_warning()
        described = describe_run(self.run)
        return {
            "run": self.run.path.name,  # the name only: the server does not publish its file system
            **{k: described[k] for k in ("model", "dataset", "test_metrics", "preprocessing")},
            "trained": {k: meta[k] for k in ("status", "epochs_done", "best_epoch") if k in meta}
            # what predict warns of, from the run folder's name only: "int was interrupted after 3 epoch(s): ..."
            | ({"note": unfinished.replace(str(self.run.path), self.run.path.name, 1)} if unfinished else {}),
            "backend": self.backend.name,
            "explain_backend": "torch",  # Grad-CAM needs gradients, so always the PyTorch model
            "methods": self.methods,
            "default_method": self.default_method,
            "topk": self.topk,
            "probabilities": self.run.calibration_info(),
            "limits": {"max_upload_bytes": self.max_upload_bytes, "max_pixels": MAX_PIXELS},
        }

    def warm_up(self) -> float:
        """Predict and explain a blank image once, through the very path of a request (PNG
        decoding, the backend, the default CAM method, the overlay PNG); returns the seconds.

        What happens on first use only (imports, the first backward pass, allocator and thread
        pool set-up) made the first /api/explain after start take 6.6 s against ~30 ms after it;
        done here, at start-up, the first user does not wait for it.
        """
        from PIL import Image

        size = self.run.info.image_size
        blank = io.BytesIO()
        Image.new("RGB", (size, size), (128, 128, 128)).save(blank, format="PNG")
        start = time.perf_counter()
        self.predict(blank.getvalue(), "warm-up.png", self.topk)
        self.explain(blank.getvalue(), "warm-up.png", self.default_method, None)
        self.warm_up_seconds = time.perf_counter() - start
        return self.warm_up_seconds

    # -- work done in the thread pool ---------------------------------------------------
    def decode(self, data: bytes, filename: str | None) -> torch.Tensor:
        """Upload bytes -> uint8 (C, H, W) at the model's size (see :func:`decode_upload`)."""
        return decode_upload(data, filename, self.run.info.in_channels, self.run.info.image_size)

    def predict(self, data: bytes, filename: str | None, k: int) -> dict:
        start = time.perf_counter()
        with self.slots:
            image = self.decode(data, filename)
            pred = top_k(self.backend.predict_proba(image[None]), self.run.classes, k)[0]
        return {"model": self.model_name, "backend": self.backend.name, **pred.as_dict(),
                **self.run.calibration_info(), "latency_ms": round((time.perf_counter() - start) * 1000, 2)}

    def explain(self, data: bytes, filename: str | None, method: str, target: int | None) -> tuple[bytes, dict]:
        from PIL import Image

        from cifarlens.explain import explain_run, overlay

        start = time.perf_counter()
        with self.slots:
            image = self.decode(data, filename)  # (C, H, W) uint8
            # explain_run's prediction and probabilities are the run's own (with its TTA, as
            # /api/predict reports them); the map explains that class on the image as given
            exp = explain_run(self.run, image[None], method=method, target=target)
            probs, predicted = exp.probs[0], int(exp.predictions[0])
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
        if len(target) > max(200, *(len(c) for c in self.run.classes)):  # longer than any class: none of them
            raise ApiError(422, f"unknown class: a name of {len(target):,} characters")
        try:
            return resolve_class(target, self.run.classes)
        except CifarlensError as err:
            raise ApiError(422, str(err)) from None
