"""``cifarlens serve`` (web app + JSON API under uvicorn) and ``cifarlens export`` (ONNX, safetensors)."""

from __future__ import annotations

import errno
import socket
import sys

from cifarlens.errors import CifarlensError
from cifarlens.serve.backends import BACKENDS

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD_MB = 1024  # a bound on --max-upload-mb: an upload is read into memory


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="web page and JSON API for a run (FastAPI on uvicorn)",
                       description="Serve a run: the page at /, the API under /api, OpenAPI docs at /docs.")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="what predicts: torch, or onnx (onnxruntime on RUN_DIR/model.onnx, exported first "
                        "when missing or stale); explanations always use the PyTorch model")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted request body (default 10)")
    p.add_argument("--topk", type=int, default=5, help="classes returned by default (default 5)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    p.add_argument("--no-calibration", action="store_true",
                   help="serve raw softmax probabilities: ignore the run's fitted temperature")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a run's best weights to ONNX (checked against PyTorch) or safetensors")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["onnx", "safetensors"], required=True)
    p.add_argument("--out", help="output file (default RUN_DIR/model.onnx; with --no-calibration of a calibrated "
                                 "run RUN_DIR/model.uncalibrated.onnx; or RUN_DIR/export/model.safetensors with "
                                 "model.json beside it, model.uncalibrated.safetensors with --no-calibration of a "
                                 "calibrated run)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 18, the exporter's own, up to what this onnx "
                                              "package writes)")
    p.add_argument("--images", nargs="+", metavar="IMAGE",
                   help="images or folders of them for the ONNX check (default: the first test images of the "
                        "run's dataset)")
    p.add_argument("--no-calibration", action="store_true",
                   help="export raw logits: leave the run's fitted temperature out of the ONNX graph")
    p.set_defaults(func=cmd_export)


def cmd_serve(args) -> int:
    import uvicorn

    from cifarlens.runs import RunDir
    from cifarlens.serve.app import MAX_TOPK, create_app

    if not 0 <= args.port <= 65535:
        raise CifarlensError(f"--port must be in 0..65535, got {args.port}")
    if not 0 < args.max_upload_mb <= MAX_UPLOAD_MB:  # nan and inf too: every upload is bounded
        raise CifarlensError(f"--max-upload-mb must be in (0, {MAX_UPLOAD_MB}], got {args.max_upload_mb}")
    if int(args.max_upload_mb * 2**20) < 1024:  # "max_upload_bytes must be at least 1, got 0" for 1e-9
        raise CifarlensError(f"--max-upload-mb must be at least 1 KiB (0.001), got {args.max_upload_mb:g}")
    if not 1 <= args.topk <= MAX_TOPK:
        raise CifarlensError(f"--topk must be from 1 to {MAX_TOPK}, got {args.topk}")
    # Bind before handing over to uvicorn, so a busy port is a one-line error, not a log and exit(1),
    # and before the model is loaded and warmed up, so that it comes at once
    try:
        sock = socket.create_server((args.host, args.port),
                                    family=socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    except (OSError, OverflowError) as err:
        busy = isinstance(err, OSError) and err.errno == errno.EADDRINUSE
        hint = ("another server is using it: choose another --port" if busy else
                "is --host an address of this machine? (127.0.0.1 for this machine only, 0.0.0.0 for all)")
        raise CifarlensError(f"cannot listen on {args.host}:{args.port} ({getattr(err, 'strerror', None) or err}); "
                             f"{hint}") from None
    try:
        app = create_app(args.run_dir, backend=args.backend, max_upload_bytes=int(args.max_upload_mb * 2**20),
                         topk=args.topk, device=args.device, calibrated=not args.no_calibration)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    unfinished = RunDir(app.state.service.run.path).unfinished_warning()  # the page shows it too (/api/model)
    if unfinished:
        print(f"warning: {unfinished}", flush=True)
    if args.host not in LOOPBACK:
        print(f"warning: listening on {args.host}, so other machines can reach this server; "
              "use --host 127.0.0.1 to keep it local", flush=True)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {args.run_dir} ({app.state.service.model_name}, {args.backend} backend) "
          f"on http://{shown}:{port}/  (API docs at /docs; Ctrl+C to stop)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", server_header=False, timeout_keep_alive=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl+C
        pass
    print("server stopped", flush=True)
    return 0


def cmd_export(args) -> int:
    from cifarlens import export
    from cifarlens.runs import RunDir

    run = RunDir(args.run_dir)
    unfinished = run.unfinished_warning() if run.is_run() else None  # else export's own error says what is wrong
    if unfinished:
        print(f"cifarlens: warning: {unfinished}", file=sys.stderr)
    if args.format == "onnx":
        from cifarlens.run_cli import image_paths

        opset = export.DEFAULT_OPSET if args.opset is None else args.opset  # --opset 0 is refused, not 18
        images = image_paths(args.images) if args.images else None  # folders too, as predict takes them
        path, diff = export.export_onnx(args.run_dir, args.out, opset=opset, images=images, log=print,
                                        calibrated=not args.no_calibration)
        cal = export.onnx_metadata(path).get("calibration") or {}
        print(f"{path}: onnxruntime matches PyTorch, max |logit diff| {diff:.2e} "
              f"(tolerance {export.ONNX_TOLERANCE:g} x max(1, largest |logit|)); output: "
              + (f"logits / {cal['temperature']:.3f} (calibrated)" if cal.get("calibrated") else "raw logits"))
        return 0
    if args.opset is not None or args.images:
        raise CifarlensError("--opset and --images apply to --format onnx only")
    path = export.export_safetensors(args.run_dir, args.out, calibrated=not args.no_calibration)
    print(f"wrote {path} and {path.with_suffix('.json')} (classes, mean/std, model name and options)")
    return 0
