import pytest
import torch
import torchvision

from ssql_deploy.errors import UserError
from ssql_deploy.models import create_model, list_models, pick_stem


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_parameter_names_and_shapes_match_torchvision(name: str) -> None:
    ours = create_model(name, 1000).state_dict()
    theirs = getattr(torchvision.models, name)().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_loads_torchvision_weights_and_computes_the_same() -> None:
    tv = torchvision.models.resnet18().eval()
    ours = create_model("resnet18", 1000).eval()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours(x), tv(x), atol=1e-5)


def test_cifar_stem_keeps_resolution_and_is_picked_for_small_inputs() -> None:
    assert pick_stem(32) == "cifar" and pick_stem(224) == "imagenet"
    model = create_model("resnet18_quarter", 10, "cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    feats = model.layer1(model.relu(model.bn1(model.conv1(torch.randn(1, 3, 32, 32)))))
    assert feats.shape[-1] == 32


def test_width_variants_shrink_and_classify() -> None:
    full = sum(p.numel() for p in create_model("resnet18", 10, "cifar").parameters())
    quarter = sum(p.numel() for p in create_model("resnet18_quarter", 10, "cifar").parameters())
    assert quarter < full / 10
    assert create_model("test_resnet", 7, "cifar")(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert {"resnet18", "resnet18_half", "resnet18_quarter", "resnet50", "test_resnet"} <= {m.name for m in list_models()}


def test_zero_init_residual_starts_blocks_as_identity() -> None:
    model = create_model("resnet18", 10)
    assert all(not block.bn2.weight.detach().any() for block in model.layer1)


def test_unknown_architecture_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown architecture 'resnet19'.*resnet18"):
        create_model("resnet19", 10)


TORCHVISION = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "regnet_x_400mf"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_families_keep_torchvision_names_and_load_its_state_dicts(name: str) -> None:
    theirs = getattr(torchvision.models, name)().eval()
    ours = create_model(name, 1000).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_width_half_mobilenet_v2_matches_torchvision() -> None:
    theirs = torchvision.models.mobilenet_v2(width_mult=0.5)
    assert {k: v.shape for k, v in create_model("mobilenet_v2_050", 1000).state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


@pytest.mark.parametrize("name", [*TORCHVISION, "test_mobilenet_v2", "test_mobilenet_v3", "test_efficientnet", "test_regnet"])
def test_small_input_variant_reduces_two_strides_and_keeps_the_parameters(name: str) -> None:
    small, large = create_model(name, 10, pick_stem(32)).eval(), create_model(name, 10, pick_stem(224)).eval()
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in large.state_dict().items()}
    last = [m for m in small.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    seen: list[int] = []
    last.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[-1]))
    with torch.no_grad():
        small(torch.randn(1, 3, 32, 32))
    assert seen[0] >= 2, "the small-input variant keeps more than 1x1 at 32 px"
    strided = lambda m: sum(c.stride == (2, 2) for c in m.modules() if isinstance(c, torch.nn.Conv2d))  # noqa: E731
    assert strided(large) - strided(small) >= 2


def test_every_family_has_a_tiny_model_and_the_listing_counts_parameters() -> None:
    families = {s.family for s in list_models()}
    assert families == {"resnet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "regnet"}
    for family in families:
        tiny = [s for s in list_models() if s.family == family and s.name.startswith("test_")]
        assert tiny, family
        model = create_model(tiny[0].name, 10, "cifar")
        assert sum(p.numel() for p in model.parameters()) < 200_000
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_architecture_lists_the_families() -> None:
    with pytest.raises(UserError, match="families: efficientnet, mobilenet_v2, mobilenet_v3, regnet, resnet"):
        create_model("vgg16", 10)
