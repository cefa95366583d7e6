"""A timm-style registry: a builder per name returns any `nn.Module`, with what the rest of the chain must know.

The chain never looks inside a network for "fc" or "layer4": fine-tuning, pretraining and
checkpoint import ask the spec where the classification head is (`head`, replaced for a linear
probe or by Identity for self-supervised pretraining), which Linear depends on the class count
(`classifier`), how wide the features entering the head are, and which modules form the stem
(kept at 8 bits by the default quantization config). Small inputs (<= 64 px) get each family's
small-input variant, as the ResNet CIFAR stem: the same parameters, so checkpoints move freely
between the two, with the first strides reduced.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ssql_deploy.errors import UserError

Stem = Literal["cifar", "imagenet"]  # "cifar": the small-input variant of any family
SMALL_INPUT_MAX = 64  # inputs up to this size get the small-input variant
Builder = Callable[[int, bool], nn.Module]  # (num_classes, small_input) -> model


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    build: Builder
    head: str  # the submodule mapping pooled features to logits
    classifier: str  # the Linear whose output is the class count
    stem: tuple[str, ...]  # module-name patterns of the stem (default override: 8 bits)
    description: str

    def num_features(self, model: nn.Module) -> int:
        """Width of the pooled features entering the head (its first Linear's input)."""
        head = model.get_submodule(self.head)
        first = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
        return int(first.in_features)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str, family: str, head: str, classifier: str, stem: tuple[str, ...], description: str
) -> Callable[[Builder], Builder]:
    def register(build: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, family, build, head, classifier, stem, description)
        return build

    return register


def list_models() -> list[ModelSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: (s.family, s.name))


def families() -> list[str]:
    return sorted({s.family for s in _REGISTRY.values()})


def model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise UserError(f"unknown architecture {name!r}",
                        f"families: {', '.join(families())}; models: {', '.join(sorted(_REGISTRY))} (see `ssql-deploy models`)")  # fmt: skip
    return _REGISTRY[name]


def pick_stem(input_size: int) -> Stem:
    return "cifar" if input_size <= SMALL_INPUT_MAX else "imagenet"


def create_model(name: str, num_classes: int, stem: Stem = "imagenet") -> nn.Module:
    spec = model_spec(name)
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    return spec.build(num_classes, stem == "cifar")


def replace_head(model: nn.Module, spec: ModelSpec, head: nn.Module) -> None:
    """Put `head` where the spec's head is (a new Linear for a linear probe, Identity for a feature extractor)."""
    parent, _, leaf = spec.head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, head)


def feature_extractor(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """The same module (in place) returning pooled features instead of logits: what pretraining trains."""
    replace_head(model, spec, nn.Identity())
    return model
