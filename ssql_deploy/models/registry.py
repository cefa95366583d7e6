"""A timm-style registry: backbones are created by name, so recipes and checkpoints can name them.

Width-reduced variants (`_half`, `_quarter`) and the `test_resnet` toy keep tests and CPU
benchmarks fast while exercising exactly the same code paths as the full-size networks.
"""

from dataclasses import dataclass

from ssql_deploy.errors import UserError
from ssql_deploy.models.resnet import BasicBlock, Bottleneck, ResNet, Stem

CIFAR_STEM_MAX_INPUT = 64  # inputs up to this size get the 3x3 stride-1 stem without max-pool


@dataclass(frozen=True)
class ModelSpec:
    name: str
    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int, int]
    base_width: int
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


for _name, _block, _layers, _what in (
    ("resnet18", BasicBlock, (2, 2, 2, 2), "ResNet-18"),
    ("resnet34", BasicBlock, (3, 4, 6, 3), "ResNet-34"),
    ("resnet50", Bottleneck, (3, 4, 6, 3), "ResNet-50"),
):
    register_model(ModelSpec(_name, _block, _layers, 64, f"{_what}, torchvision layout"))
    register_model(ModelSpec(f"{_name}_half", _block, _layers, 32, f"{_what} at half width (32 base channels)"))
    register_model(ModelSpec(f"{_name}_quarter", _block, _layers, 16, f"{_what} at quarter width (16 base channels)"))
register_model(ModelSpec("test_resnet", BasicBlock, (1, 1, 1, 1), 8, "4-block toy ResNet for tests (8 base channels)"))


def list_models() -> list[ModelSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: s.name)


def pick_stem(input_size: int) -> Stem:
    return "cifar" if input_size <= CIFAR_STEM_MAX_INPUT else "imagenet"


def create_model(name: str, num_classes: int, stem: Stem = "imagenet", zero_init_residual: bool = True) -> ResNet:
    if name not in _REGISTRY:
        raise UserError(f"unknown architecture {name!r}", f"choose one of: {', '.join(sorted(_REGISTRY))}")
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    spec = _REGISTRY[name]
    return ResNet(spec.block, list(spec.layers), num_classes, spec.base_width, stem, zero_init_residual)
