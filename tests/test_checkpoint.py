"""Checkpoint import: the formats users already have, and every way a file can be wrong."""

from pathlib import Path

import pytest
import torch
import torchvision

from ssql_deploy.errors import UserError
from ssql_deploy.models import create_model, model_spec
from ssql_deploy.models.checkpoint import import_weights, load_checkpoint, save_atomic


def ssql_reference_checkpoint(backbone: torch.nn.Module, prefix: str = "module.encoder.") -> dict:
    """What the SSQL reference code saves from a DDP SimSiam+SSQL model (SSQL.md)."""
    sd = {prefix + k: v.clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    dim = backbone.fc.in_features
    head = prefix.rsplit(".", 2)[0] + "." if prefix.count(".") > 1 else ""
    sd |= {  # projector lives in encoder.fc as a 3-layer MLP with BN
        f"{prefix}fc.0.weight": torch.randn(2048, dim), f"{prefix}fc.1.weight": torch.ones(2048),
        f"{prefix}fc.1.running_mean": torch.zeros(2048), f"{prefix}fc.3.weight": torch.randn(2048, 2048),
        f"{head}predictor.0.weight": torch.randn(512, 2048), f"{head}predictor.3.weight": torch.randn(2048, 512),
        f"{prefix}layer1.0.conv1.weight_quantizer.scale": torch.ones(1),
        f"{prefix}layer1.0.act_quantizer.observer.min_val": torch.zeros(()),
    }  # fmt: skip
    return {"state_dict": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 400}


@pytest.mark.parametrize("prefix", ["module.encoder.", "module.encoder_q.", "encoder_q.model."])
def test_ssql_reference_checkpoint_keeps_only_the_backbone(tmp_path: Path, prefix: str) -> None:
    source = create_model("resnet18_quarter", 10, "cifar")
    for p in source.parameters():
        p.data.normal_()
    path = tmp_path / "ssql.pth.tar"
    torch.save(ssql_reference_checkpoint(source, prefix), path)
    target = create_model("resnet18_quarter", 10, "cifar")
    report = import_weights(load_checkpoint(path), target, model_spec("resnet18_quarter"))
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(target.bn1.running_var, source.bn1.running_var)
    assert report.missing == ["fc.weight", "fc.bias"]
    dropped = {reason: len(keys) for reason, keys in report.dropped.items()}
    assert dropped["projector (encoder.fc)"] == 4 and dropped["SSL head / quantizer state"] == 4
    assert "loaded" in str(report.table().columns[0]._cells)


def test_torchvision_state_dict_drops_a_classifier_of_another_task(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), path)
    model = create_model("resnet18", 102)
    report = import_weights(load_checkpoint(path), model, model_spec("resnet18"))
    assert torch.equal(model.conv1.weight, tv.conv1.weight)
    assert report.dropped["classifier of another task"] == ["fc.weight", "fc.bias"]


def test_own_checkpoint_round_trips_with_its_classifier(tmp_path: Path) -> None:
    source = create_model("test_resnet", 10, "cifar")
    path = tmp_path / "best.pt"
    save_atomic({"format": "ssql-deploy", "kind": "model", "arch": "test_resnet", "model": source.state_dict()}, path)
    target = create_model("test_resnet", 10, "cifar")
    report = import_weights(load_checkpoint(path), target, model_spec("test_resnet"))
    assert report.missing == [] and torch.equal(target.fc.weight, source.fc.weight)


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_atomic({"epoch": 2, "bad": Unsaveable()}, path)
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_shape_mismatch_names_the_tensor_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "imagenet-stem.pth"
    torch.save(create_model("resnet18_quarter", 10, "imagenet").state_dict(), path)
    with pytest.raises(UserError, match=r"conv1.weight has shape \[16, 3, 7, 7\].*--stem"):
        import_weights(load_checkpoint(path), create_model("resnet18_quarter", 10, "cifar"), model_spec("resnet18_quarter"))


def test_foreign_checkpoint_matching_nothing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vit.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3), "cls_token": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="holds no weights for test_resnet"):
        import_weights(load_checkpoint(path), create_model("test_resnet", 10), model_spec("test_resnet"))


class _Pickled:
    pass


def test_pickle_that_needs_code_execution_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    torch.save({"model": _Pickled()}, path)
    with pytest.raises(UserError, match="needs code execution"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_files_that_are_not_checkpoints(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a (readable )?PyTorch checkpoint"):
        load_checkpoint(path)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_a_tensor_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match="holds a Tensor"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["test_mobilenet_v2", "test_mobilenet_v3", "test_efficientnet", "test_regnet"])
def test_every_family_imports_torchvision_and_ssql_reference_checkpoints(name: str, tmp_path: Path) -> None:
    spec = model_spec(name)
    source = create_model(name, 1000, "imagenet")
    plain = tmp_path / "torchvision.pth"
    torch.save(source.state_dict(), plain)
    target = create_model(name, 10, "cifar")
    report = import_weights(load_checkpoint(plain), target, spec)
    assert report.dropped == {"classifier of another task": [f"{spec.classifier}.weight", f"{spec.classifier}.bias"]}
    assert report.missing == [f"{spec.classifier}.weight", f"{spec.classifier}.bias"]
    reference = tmp_path / "ssql.pth.tar"  # DDP + encoder prefixes, the projector where the head was, a predictor beside it
    state = {f"module.encoder.{k}": v for k, v in source.state_dict().items() if not k.startswith(spec.head + ".")}
    state |= {f"module.encoder.{spec.head}.0.weight": torch.zeros(4, 4), "module.predictor.0.weight": torch.zeros(4, 4)}
    torch.save({"state_dict": state, "epoch": 400}, reference)
    report = import_weights(load_checkpoint(reference), create_model(name, 10, "cifar"), spec)
    assert report.source_format.endswith("prefix 'module.encoder.'") and not [k for k in report.missing if not k.startswith(spec.head)]
    assert f"projector (encoder.{spec.head})" in report.dropped and "SSL head / quantizer state" in report.dropped


def test_a_checkpoint_of_another_family_names_both(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(create_model("test_resnet", 10).state_dict(), path)
    with pytest.raises(UserError, match=r"no weights for mobilenet_v2, a mobilenet_v2 .*looks like a resnet checkpoint"):
        import_weights(load_checkpoint(path), create_model("mobilenet_v2", 10), model_spec("mobilenet_v2"))
