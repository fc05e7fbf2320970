"""Exporting a run's best weights: ONNX (checked against PyTorch) and self-describing safetensors.

``export_onnx`` writes ``model.onnx`` into the run folder (what ``serve --backend onnx``
loads) and refuses to keep a file whose logits differ from PyTorch's by more than
the tolerance, on a random batch and on real images. ``export_safetensors`` writes the
weights plus a JSON sidecar (classes, mean/std, model name and options), everything
needed to rebuild the model without the run folder.

A calibrated run (one with a fitted temperature, see :mod:`cifarlens.calibration`) is exported
with the temperature inside the ONNX graph: its ``logits`` output is already divided by T, so
its softmax gives the calibrated probabilities that ``predict`` shows (``calibrated=False``
exports the raw logits). The metadata says which. The safetensors export carries T in its
description (``calibration``); the weights themselves are the raw model's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cifarlens.errors import CifarlensError
from cifarlens.images import ImageSource
from cifarlens.io import atomic_write, atomic_write_json
from cifarlens.onnxfile import (  # noqa: F401 (reading an export: imported from here too)
    INPUT_NAME, ONNX_FILE, OUTPUT_NAME, add_metadata, onnx_is_current, onnx_metadata, onnx_session, run_onnx,
    weights_digest,
)
from cifarlens.runs import RunDir, info_to_dict, refuse_runs_file

# The torch.export-based exporter (torch >= 2.9's default; needs onnxscript) emits opset 18
# natively. Asking it for 17 runs a version converter that has no Pad adapter (ResNets) and
# then silently leaves the model at 18, so 18 is the honest default.
DEFAULT_OPSET = 18
# Max |logit(onnx) - logit(torch)|, relative to the largest |logit| when that is above 1:
# float32 kernels differ in summation order (measured ~1e-6 on our models).
ONNX_TOLERANCE = 1e-4
UNCALIBRATED_ONNX_FILE = "model.uncalibrated.onnx"  # serve --backend onnx --no-calibration of a calibrated run
CHECK_BATCH = 8  # images per verification batch
PREPROCESSING = ("decode with cifarlens.images.load_image (RGB or L, first frame, EXIF), resize to "
                 "image_size x image_size (bilinear), scale to [0, 1], then (x - mean) / std per channel")


class _Scaled(torch.nn.Module):
    """``model``'s logits divided by a fixed temperature (a constant in the exported graph)."""

    def __init__(self, model: torch.nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


@contextlib.contextmanager
def _quiet_converter():
    """onnxscript's opset converter logs a failed conversion with its whole traceback (then writes
    the model unconverted, which the load check below names in one line): kept off the terminal."""
    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load(run_dir: str | Path, calibrated: bool):
    """(load_run of ``run_dir`` on the CPU, the sha256 of its weights): the digest is taken first, so a
    training that replaces the weights meanwhile is caught by :func:`_check_unchanged`."""
    from cifarlens.api import load_run

    digest = weights_digest(run_dir) if RunDir(run_dir).is_run() else None  # else load_run says what is wrong
    return load_run(run_dir, device="cpu", calibrated=calibrated), digest


def _check_unchanged(run, digest: str | None, out: Path) -> None:
    """An export is of the weights it describes: the weights replaced while it ran (a training of the
    run going on, then its end removing the exports it made stale) are an error, not an older file."""
    if digest is None or weights_digest(run.path) != digest:
        raise CifarlensError(f"the weights of {run.path} changed while they were exported (is it still training?); "
                             f"not writing {out}: export again when the run has finished")


def describe_run(run, digest: str | None = None) -> dict:
    """What a consumer of exported weights needs: model name/options, classes, preprocessing, calibration;
    ``digest``: the weights' sha256 when taken before they were loaded (:func:`_load`)."""
    from cifarlens import __version__
    from cifarlens.models import model_info

    cfg = run.config
    info = model_info(run.model)
    metrics_file = run.path / "metrics.json"
    test_metrics = None
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    except ValueError:
        metrics = None  # damaged: the export describes the weights without it
    if isinstance(metrics, dict):
        test_metrics = {k: metrics[k] for k in ("accuracy", "top5_accuracy", "f1_macro", "split_size") if k in metrics}
    return {
        "format": "cifarlens-export",
        "cifarlens_version": __version__,
        "model": {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs),
                  "architecture": info["architecture"], "params": info["params"]},
        "dataset": info_to_dict(run.info),
        "preprocessing": PREPROCESSING,
        "test_metrics": test_metrics,
        "calibration": run.calibration_info(),
        # the graph and the weights give one view per image: predict, evaluate and the metrics average
        # these views' outputs (serve --backend onnx does it around the graph)
        "tta": {"flip": run.tta, "translate_px": run.tta_translate},
        "weights_sha256": digest or weights_digest(run.path),
        # "finished", or the weights of a run still training / stopped ("interrupted" after epochs_done)
        "run_status": {key: meta.get(key) for meta in (RunDir(run.path).meta(),) for key in ("status", "epochs_done")},
    }


# ---------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------


def default_onnx_path(run) -> Path:
    """``RUN_DIR/model.onnx``; for the raw logits of a calibrated run (``--no-calibration``)
    ``model.uncalibrated.onnx``, so that neither replaces the other."""
    return run.path / (UNCALIBRATED_ONNX_FILE if _raw_of_calibrated(run) else ONNX_FILE)


def _raw_of_calibrated(run) -> bool:
    """Whether ``run`` was loaded without the temperature its run folder has (``--no-calibration``)."""
    from cifarlens.inference import run_temperature
    from cifarlens.runs import RunDir

    return not run.calibrated and run_temperature(RunDir(run.path).meta()) is not None


def export_onnx(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    batch_dynamic: bool = True,
    images: Sequence[ImageSource] | None = None,
    log: Callable[[str], None] | None = None,
    calibrated: bool = True,
) -> tuple[Path, float]:
    """Export a run's best weights to ONNX (default :func:`default_onnx_path`); return (path, max |diff|).

    The file is only written after onnxruntime's logits match PyTorch's within
    ``ONNX_TOLERANCE`` on a random batch and on real images (``images``, else the
    first test images of the run's dataset when it is still on disk, else random
    uint8 images through the real preprocessing; reading a large image folder takes a
    while, so pass ``images`` there). Raises CifarlensError otherwise. With ``calibrated`` (default)
    and a fitted temperature, the output is the logits divided by it.
    """
    from cifarlens.models import unwrap_model

    import onnx

    log = log or (lambda line: None)
    if not DEFAULT_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise CifarlensError(f"opset {opset} cannot be written here: torch's exporter writes opset {DEFAULT_OPSET} "
                             f"natively, and this onnx knows opsets up to {onnx.defs.onnx_opset_version()}")
    run, digest = _load(run_dir, calibrated)
    out = Path(out) if out is not None else default_onnx_path(run)
    refuse_runs_file(out, "--out", default=str(default_onnx_path(run)), source=run.path)
    if out.suffix.lower() != ".onnx" and not out.is_dir():  # model.safetensors, last.pt: surely a slip
        raise CifarlensError(f"--out {out} should end in .onnx (or give --format safetensors)")
    if out.is_dir():
        raise CifarlensError(f"{out} is a folder; give the file to write, e.g. {out / ONNX_FILE}")
    _check_folder(out, run)
    model = unwrap_model(run.model).eval()
    if run.calibrated:
        model = _Scaled(model, run.temperature).eval()
    c, s = run.info.in_channels, run.info.image_size
    example = torch.zeros(2 if batch_dynamic else 1, c, s, s)  # torch.export specialises a size-1 dim
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if batch_dynamic else None

    gen = torch.Generator().manual_seed(0)
    real, real_source = _real_images(run, images)
    batches = {"random normal": torch.randn(CHECK_BATCH, c, s, s, generator=gen),
               real_source: run.preprocess(real).cpu()}
    description = describe_run(run, digest) | {"opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME,
                                       "output_is": "logits divided by the temperature" if run.calibrated else "logits",
                                       "batch_dynamic": batch_dynamic}

    def write(tmp: Path) -> None:
        try:
            # optimize=False halves the export time; onnxruntime runs its own graph optimisations
            # (constant folding, Conv+BatchNorm fusion) when it loads the model anyway.
            with _quiet_converter():
                torch.onnx.export(model, (example,), str(tmp), dynamo=True, optimize=False, external_data=False,
                                  verbose=False, opset_version=opset, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes)
        except Exception as err:  # the exporter raises many types; the user needs one line and the model name
            _reraise_interrupt(err)
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(err).strip()).splitlines()  # without torch's colour codes
            raise CifarlensError(f"ONNX export of {run.config.model.name} failed ({type(err).__name__}: "
                                 f"{first[0][:300] if first else ''})") from err
        try:
            session = onnx_session(tmp)
        except CifarlensError as err:  # e.g. an op the exporter could not convert to this opset
            why = re.sub(r"Load model from \S+ failed: ?", "", str(err).split(" (", 1)[-1].rstrip(")"))  # not the temp file
            raise CifarlensError(f"torch's exporter did not write a loadable {run.config.model.name} at opset {opset} "
                                 f"({why[:200]}); not writing {out}"
                                 + (f"; the default --opset {DEFAULT_OPSET} is its native one" if opset != DEFAULT_OPSET
                                    else "")) from None
        worst, tol_used = 0.0, ONNX_TOLERANCE
        for what, x in batches.items():
            with torch.no_grad():
                ref = model(x).float().numpy()  # (B, K) logits
            got = run_onnx(session, x.numpy())
            diff = float(np.abs(got - ref).max())
            tol = ONNX_TOLERANCE * max(1.0, float(np.abs(ref).max()))
            same_top1 = bool((got.argmax(1) == ref.argmax(1)).all())
            log(f"onnx check on {len(x)} {what} inputs: max |logit diff| {diff:.2e} "
                f"(tolerance {tol:.1e}), top-1 {'identical' if same_top1 else 'DIFFERS'}")
            if not diff <= tol:  # also catches NaN
                raise CifarlensError(f"the ONNX model's logits differ from PyTorch's by {diff:.3g} on {what} "
                                     f"inputs (tolerance {tol:.1e}); not writing {out}")
            worst, tol_used = max(worst, diff), max(tol_used, tol)
        add_metadata(tmp, description | {"max_abs_diff": worst, "tolerance": tol_used})
        _check_unchanged(run, digest, out)

    atomic_write(out, write)
    log(f"wrote {out} (opset {opset}, {'dynamic' if batch_dynamic else 'fixed'} batch)")
    return out, float(onnx_metadata(out)["max_abs_diff"])


def _real_images(run, images: Sequence[ImageSource] | None) -> tuple[torch.Tensor | list, str]:
    """A batch of real images for the check: given files, the dataset's test images, or random pixels."""
    c, s = run.info.in_channels, run.info.image_size
    if images:
        return list(images), "given image"
    from cifarlens.data import load_dataset

    data = run.config.data
    try:
        test = load_dataset(data.dataset, data.data_dir, download=False, image_size=data.image_size).test
        if tuple(test.images.shape[1:]) == (c, s, s) and len(test):
            return test.images[:CHECK_BATCH], f"{data.dataset} test image"
    except CifarlensError:
        pass  # the dataset moved or was deleted: still check the real preprocessing path
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (CHECK_BATCH, c, s, s), dtype=torch.uint8, generator=gen), "random-pixel image"


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------


def export_safetensors(run_dir: str | Path, out: str | Path | None = None, *, calibrated: bool = True) -> Path:
    """Write the run's best weights to ``out`` plus ``out.json`` (default RUN_DIR/export/model.safetensors;
    ``model.uncalibrated.safetensors`` for a calibrated run exported with ``calibrated=False``, so that
    neither export replaces the other, as with ONNX).

    The safetensors header and the JSON sidecar carry the same description (model
    name and options, classes, mean/std, image size, test metrics, the temperature): tools that read only
    the weights file find it in its header; ``load_exported`` reads the sidecar, so keep
    the two together.
    """
    from cifarlens.checkpoint import save_weights
    from cifarlens.models import unwrap_model

    run, digest = _load(run_dir, calibrated)
    default = run.path / "export" / f"model{'.uncalibrated' if _raw_of_calibrated(run) else ''}.safetensors"
    out = Path(out) if out is not None else default
    if out.suffix.lower() != ".safetensors":
        raise CifarlensError(f"--out {out} should end in .safetensors")
    for path in (out, out.with_suffix(".json")):  # the weights and their description beside them
        refuse_runs_file(path, "--out", default=str(default), source=run.path)
    _check_folder(out, run)
    if not _earlier_description(out):  # e.g. the user's own notes.json beside --out notes.safetensors
        raise CifarlensError(f"--out {out} would replace {out.with_suffix('.json')}, which is not an earlier "
                             "export's description (written beside the weights); choose another --out")
    description = describe_run(run, digest) | {"weights": out.name}
    _check_unchanged(run, digest, out)
    save_weights(unwrap_model(run.model).state_dict(), out, description)
    atomic_write_json(out.with_suffix(".json"), description)
    return out


def _reraise_interrupt(err: BaseException) -> None:
    """A Ctrl-C that torch.export caught in a lazy import and wrapped (KeyboardInterrupt -> a half-imported
    module's AttributeError -> TorchExportError) is the interruption it was, not a failed export."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            raise err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


def _check_folder(out: Path, run) -> None:
    """A file the user named goes into a folder that exists, as ``predict --csv``'s does (a typo in
    the folder's name is an error, not a new folder); the run's own export/ is made."""
    if not out.parent.is_dir() and out.parent.absolute() != (run.path / "export").absolute():
        raise CifarlensError(f"--out {out}: no folder {out.parent}")


def _earlier_description(out: Path) -> bool:
    """Whether the JSON beside ``out`` is absent or one that exporting to ``out`` wrote before."""
    sidecar = out.with_suffix(".json")
    if not sidecar.exists():
        return True
    try:
        description = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(description, dict) and description.get("weights") == out.name and "dataset" in description


def load_exported(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model (eval mode) from ``export_safetensors`` output; returns (model, description)."""
    from cifarlens.checkpoint import load_state_into, load_weights
    from cifarlens.models import create_model

    if not isinstance(path, (str, os.PathLike)):
        raise CifarlensError(f"load_exported(path): the .safetensors file's path; got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.is_file():  # (a folder, or a typo: it named the missing .json beside it)
        raise CifarlensError(f"{path} is {'a folder' if path.is_dir() else 'not found'}; give the .safetensors file "
                             "that `cifarlens export --format safetensors` wrote")
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise CifarlensError(f"{sidecar} not found; it is written next to the weights by `cifarlens export`")
    try:
        description = json.loads(sidecar.read_text())
        ds = description["dataset"]
        name, kwargs, classes, channels = (description["model"]["name"], description["model"]["kwargs"],
                                           ds["classes"], ds["in_channels"])
    except (ValueError, KeyError, TypeError) as err:  # not JSON, or not an export's description
        raise CifarlensError(f"{sidecar} is not the description `cifarlens export` writes ({type(err).__name__}: "
                             f"{str(err)[:100]}); export the run again") from None
    model = create_model(name, num_classes=len(classes), in_channels=channels, **kwargs)
    load_state_into(model, load_weights(path), path)
    return model.eval(), description

