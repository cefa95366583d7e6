"""MobileNetV2/V3, EfficientNet and RegNet: torchvision's own classes, so users' torchvision state dicts load as they are.

Why torchvision's code rather than ours (as for ResNet, whose CIFAR stem changes parameter shapes):
the small-input variant of these families changes no shape, only strides, so the torchvision
module *is* the network; owning a copy would only let parameter names drift. The small-input
variant (as common CIFAR ports do) sets stride 1 in the stem and in the first strided block, so
a 32-px image keeps 4x4 instead of 1x1 at the last stage. The `test_*` models are the same
classes at a few channels and blocks: every family's code path in seconds.
"""

from functools import partial

from torch import nn
from torchvision.models import efficientnet, mobilenetv2, mobilenetv3, regnet

from ssql_deploy.models.registry import register_model

V3 = mobilenetv3.InvertedResidualConfig


def _small_input(model: nn.Module, block_depth: int) -> nn.Module:
    """Stride 1 for the stem conv and for every strided conv of the first strided block (its path's first `block_depth` parts)."""
    strided = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    block = ".".join(strided[1][0].split(".")[:block_depth])
    for name, conv in strided:
        if conv is strided[0][1] or name.startswith(block + "."):
            conv.stride = (1, 1)
    return model


def _variant(model: nn.Module, small_input: bool, block_depth: int) -> nn.Module:
    return _small_input(model, block_depth) if small_input else model


def _mobilenet_v2(width: float, num_classes: int, small_input: bool, setting: list[list[int]] | None = None) -> nn.Module:
    return _variant(mobilenetv2.MobileNetV2(num_classes, width_mult=width, inverted_residual_setting=setting), small_input, 2)


def _mobilenet_v3(arch: str, num_classes: int, small_input: bool) -> nn.Module:
    setting, last = mobilenetv3._mobilenet_v3_conf(arch)
    return _variant(mobilenetv3.MobileNetV3(setting, last, num_classes), small_input, 2)


_V2 = dict(family="mobilenet_v2", head="classifier", classifier="classifier.1", stem=("features.0.*",))
_V3 = dict(family="mobilenet_v3", head="classifier", classifier="classifier.3", stem=("features.0.*",))
_EFFICIENT = dict(family="efficientnet", head="classifier", classifier="classifier.1", stem=("features.0.*",))
_REGNET = dict(family="regnet", head="fc", classifier="fc", stem=("stem.*",))

register_model("mobilenet_v2", description="MobileNetV2 1.0 (torchvision)", **_V2)(partial(_mobilenet_v2, 1.0))
register_model("mobilenet_v2_050", description="MobileNetV2 at width 0.5 (torchvision)", **_V2)(partial(_mobilenet_v2, 0.5))
register_model("test_mobilenet_v2", description="tiny MobileNetV2 for tests (3 inverted-residual stages)", **_V2)(
    partial(_mobilenet_v2, 0.25, setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2]])
)
register_model("mobilenet_v3_small", description="MobileNetV3-Small (torchvision; Hardswish, squeeze-excite)", **_V3)(
    partial(_mobilenet_v3, "mobilenet_v3_small")
)
register_model("mobilenet_v3_large", description="MobileNetV3-Large (torchvision; Hardswish, squeeze-excite)", **_V3)(
    partial(_mobilenet_v3, "mobilenet_v3_large")
)


@register_model("test_mobilenet_v3", description="tiny MobileNetV3 for tests (ReLU and Hardswish blocks, squeeze-excite)", **_V3)
def _test_mobilenet_v3(num_classes: int, small_input: bool) -> nn.Module:
    setting = [V3(8, 3, 16, 8, True, "RE", 2, 1, 1.0), V3(8, 3, 24, 16, False, "RE", 2, 1, 1.0), V3(16, 5, 48, 16, True, "HS", 1, 1, 1.0),
               V3(16, 3, 48, 24, True, "HS", 2, 1, 1.0)]  # fmt: skip
    return _variant(mobilenetv3.MobileNetV3(setting, 64, num_classes), small_input, 2)


@register_model("efficientnet_b0", description="EfficientNet-B0 (torchvision; SiLU, squeeze-excite, stochastic depth)", **_EFFICIENT)
def _efficientnet_b0(num_classes: int, small_input: bool) -> nn.Module:
    setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=1.0, depth_mult=1.0)
    return _variant(efficientnet.EfficientNet(setting, 0.2, num_classes=num_classes, last_channel=last), small_input, 3)


@register_model("test_efficientnet", description="tiny EfficientNet for tests (MBConv with SiLU and squeeze-excite)", **_EFFICIENT)
def _test_efficientnet(num_classes: int, small_input: bool) -> nn.Module:
    mb = partial(efficientnet.MBConvConfig, width_mult=1.0, depth_mult=1.0)
    setting = [mb(1, 3, 1, 16, 8, 1), mb(4, 3, 2, 8, 16, 2), mb(4, 5, 2, 16, 24, 1), mb(4, 3, 2, 24, 32, 1)]
    return _variant(efficientnet.EfficientNet(setting, 0.2, num_classes=num_classes, last_channel=64), small_input, 3)


def _regnet(params: regnet.BlockParams, num_classes: int, small_input: bool, stem_width: int = 32) -> nn.Module:
    return _variant(regnet.RegNet(params, num_classes, stem_width), small_input, 3)


register_model("regnet_x_400mf", description="RegNetX-400MF (torchvision; grouped convs)", **_REGNET)(
    partial(_regnet, regnet.BlockParams.from_init_params(depth=22, w_0=24, w_a=24.48, w_m=2.54, group_width=16))
)
register_model("test_regnet", description="tiny RegNetX for tests (grouped convs, 3 stages)", **_REGNET)(
    partial(_regnet, regnet.BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8), stem_width=8)
)
