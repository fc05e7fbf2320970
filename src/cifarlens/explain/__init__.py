"""Explanations: class activation maps (Grad-CAM and friends), overlays, faithfulness scores.

::

    from cifarlens.api import load_run
    from cifarlens.explain import explain_run, overlay

    run = load_run("runs/cifar10-resnet20")
    ex = explain_run(run, ["cat.png"], method="gradcam", target="dog")  # "why dog?"
    ex.maps[0]    # (H, W) in [0, 1]; ex.empty[0] True means "no evidence", not a heatmap

Adding a method: ``register_method(name, loader, summary)`` in :mod:`cifarlens.explain.methods`,
where ``loader()`` returns a pytorch-grad-cam ``BaseCAM`` subclass.

Modules: ``methods`` (the registry), ``hooks`` (lock, eval mode, layer hook, layer lookup),
``cam`` (the result, the maths, :func:`explain`), ``faithfulness``, ``figures``, ``cli``.
"""

from cifarlens.explain.cam import CoarseMapWarning, Explanation, explain, explain_run, resolve_class
from cifarlens.explain.hooks import default_layer, get_layer, layer_names
from cifarlens.explain.methods import METHODS, CamMethod, list_methods, register_method
from cifarlens.explain.faithfulness import faithfulness
from cifarlens.explain.figures import (
    caption,
    class_average_maps,
    overlay,
    plot_class_averages,
    plot_explanation,
    plot_gallery,
)

__all__ = [
    "METHODS", "CamMethod", "CoarseMapWarning", "Explanation", "caption", "class_average_maps", "default_layer",
    "explain", "explain_run", "faithfulness", "get_layer", "layer_names", "list_methods", "overlay",
    "plot_class_averages", "plot_explanation", "plot_gallery", "register_method", "resolve_class",
]
