"""Reading what ``cifarlens export`` wrote: an ONNX session and its logits, the description stored
in the file, and whether the file still holds the run's current weights (serve --backend onnx,
``cifarlens calibrate``). Writing is :mod:`cifarlens.export`'s.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from cifarlens.errors import CifarlensError
from cifarlens.runs import RunDir

ONNX_FILE = "model.onnx"
METADATA_KEY = "cifarlens"
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def weights_digest(run_dir: str | Path) -> str:
    """sha256 of the weights a run serves, so an ONNX file can tell whether it is stale."""
    run = RunDir(run_dir)
    source = run.weights if run.weights.is_file() else run.last_checkpoint
    if not source.is_file():
        raise CifarlensError(f"{run.path} has no trained weights yet (model.safetensors); train it first")
    h = hashlib.sha256()
    with source.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_session(path: str | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CifarlensError(f"{path} is not a loadable ONNX model ({str(err).strip()[:300]})") from None


def run_onnx(session, x: np.ndarray) -> np.ndarray:
    """Logits (B, K) for a normalised float batch (B, C, H, W); a fixed-batch model goes one image at a time."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    batch_dim = session.get_inputs()[0].shape[0]
    if isinstance(batch_dim, int) and batch_dim != len(x):
        return np.concatenate([session.run(None, {INPUT_NAME: x[i:i + 1]})[0] for i in range(len(x))])
    return session.run(None, {INPUT_NAME: x})[0]


def add_metadata(path: Path, description: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(description)
    onnx.save(model, str(path))


def onnx_metadata(path: str | Path) -> dict:
    """The ``describe_run`` record stored in an exported ONNX file ({} when absent)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise CifarlensError(f"{path} is not an ONNX file ({type(err).__name__})") from None
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


def onnx_is_current(run_dir: str | Path, path: str | Path | None = None, temperature: float | None = None) -> bool:
    """Whether ``path`` (default RUN_DIR/model.onnx) exists and was exported from the run's current
    weights with ``temperature`` (None: uncalibrated) in its graph."""
    path = Path(path) if path is not None else Path(run_dir) / ONNX_FILE
    if not path.is_file():
        return False
    try:
        meta = onnx_metadata(path)
        return (meta.get("weights_sha256") == weights_digest(run_dir)
                and (meta.get("calibration") or {}).get("temperature") == temperature)
    except CifarlensError:
        return False
