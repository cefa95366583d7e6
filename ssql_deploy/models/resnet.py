"""ResNets whose parameter names match torchvision's, with a CIFAR stem and a width knob.

torchvision's `ResNet` hard-codes 64 base channels and the ImageNet stem; SSQL's CIFAR runs and
our CPU tests need a 3x3 stride-1 stem without max-pool and narrower layers, while checkpoints
must stay interchangeable with torchvision (same keys, same shapes at full width).
"""

import torch
from torch import nn

from ssql_deploy.models.registry import Stem, register_model


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


class ResNet(nn.Module):
    """A torchvision-compatible ResNet; `fc` is the classifier and `num_features` its input width."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        base_width: int = 64,
        stem: Stem = "imagenet",
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.base_width = base_width
        self.inplanes = base_width
        if stem == "cifar":
            self.conv1 = _conv3x3(3, base_width)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, base_width, layers[0], 1)
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = base_width * 8 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # SSQL reference setting: each block starts as the identity
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], width: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != width * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, width * block.expansion, stride), nn.BatchNorm2d(width * block.expansion))
        layers = [block(self.inplanes, width, stride, downsample)]
        self.inplanes = width * block.expansion
        layers += [block(self.inplanes, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _register(name: str, block: type[BasicBlock] | type[Bottleneck], layers: list[int], width: int, what: str) -> None:
    def build(num_classes: int, small_input: bool) -> nn.Module:
        return ResNet(block, layers, num_classes, width, "cifar" if small_input else "imagenet")

    register_model(name, "resnet", "fc", "fc", ("conv1", "relu"),
                   f"{what}; small inputs: 3x3 stride-1 stem, no max-pool")(build)  # fmt: skip


for _name, _block, _layers, _what in (
    ("resnet18", BasicBlock, [2, 2, 2, 2], "ResNet-18"),
    ("resnet34", BasicBlock, [3, 4, 6, 3], "ResNet-34"),
    ("resnet50", Bottleneck, [3, 4, 6, 3], "ResNet-50"),
):
    _register(_name, _block, _layers, 64, f"{_what}, torchvision layout")
    _register(f"{_name}_half", _block, _layers, 32, f"{_what} at half width (32 base channels)")
    _register(f"{_name}_quarter", _block, _layers, 16, f"{_what} at quarter width (16 base channels)")
_register("test_resnet", BasicBlock, [1, 1, 1, 1], 8, "tiny 4-block ResNet for tests (8 base channels)")
