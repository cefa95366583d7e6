from ssql_deploy.models.registry import create_model, list_models, pick_stem
from ssql_deploy.models.resnet import ResNet

__all__ = ["ResNet", "create_model", "list_models", "pick_stem"]
