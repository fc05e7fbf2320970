"""The names of the prediction backends, in a module of their own so that the CLI can offer
them without importing torch or FastAPI, and the app can check them without importing its
own package's ``__init__`` (which re-exports the app: that would be an import circle)."""

BACKENDS = ("torch", "onnx")  # what predicts; explanations always use the PyTorch model
