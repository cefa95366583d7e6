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
