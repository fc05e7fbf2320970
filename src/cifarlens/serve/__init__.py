"""Serving a trained run: the web app (``create_app``) and the ``serve`` / ``export`` commands.

Importing this package does not import FastAPI; ``create_app`` and the backends load on use.
"""

from cifarlens.serve.backends import BACKENDS  # noqa: F401  (public: cifarlens.serve.BACKENDS)

__all__ = ["create_app", "TorchBackend", "OnnxBackend"]


def __getattr__(name):
    if name in __all__:
        from cifarlens.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'cifarlens.serve' has no attribute {name!r}")
