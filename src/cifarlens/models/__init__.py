"""Model registry and families. Importing this package registers every model.

Adding a model: write a ``ClassifierBase`` subclass and a factory
``def name(num_classes, in_channels=3, **options)`` decorated with
``@register_model(recipe="...")`` (the recipe a run of it gets without ``--recipe``),
in a module imported below.
"""

from cifarlens.models.registry import (
    MODELS,
    check_input_size,
    create_model,
    default_model,
    default_recipe,
    list_models,
    model_info,
    register_model,
    unwrap_model,
)

# imported for their @register_model side effect
from cifarlens.models import fastnet, lensnet, preact_resnet  # noqa: E402,F401  isort: skip
from cifarlens.models import pretrained, resnet_cifar, wide_resnet  # noqa: E402,F401  isort: skip

__all__ = ["MODELS", "check_input_size", "create_model", "default_model", "default_recipe", "list_models", "model_info", "register_model", "unwrap_model"]
