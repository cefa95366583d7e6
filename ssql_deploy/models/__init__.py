"""Backbones by name (registry.py); importing this package registers every family."""

from ssql_deploy.models import mobile, resnet  # noqa: F401  (registers the families)
from ssql_deploy.models.registry import ModelSpec, create_model, feature_extractor, list_models, model_spec, pick_stem, replace_head

__all__ = ["ModelSpec", "create_model", "feature_extractor", "list_models", "model_spec", "pick_stem", "replace_head"]
