"""QuantConfig: per-layer widths as data, resolved on real models of every family, saved and reloaded exactly."""

from pathlib import Path

import pytest
import torch

from ssql_deploy.data import DataSource
from ssql_deploy.errors import UserError
from ssql_deploy.models import create_model, model_spec
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.quant.artifact import load_quantized, save_quantized
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.config import LayerSpec, QuantConfig
from ssql_deploy.quant.placement import act_quantizers, prepare, weight_quantizers


@pytest.mark.parametrize(
    "text, w, a, floating",
    [("w8a8", 8, 8, False), ("w6", 6, None, False), ("a5", None, 5, False), ("float", None, None, True), ("4", 4, 4, False)],
)
def test_layer_specs_parse(text: str, w: int | None, a: int | None, floating: bool) -> None:
    spec = LayerSpec.parse(text, "test")
    assert (spec.w, spec.a, spec.float) == (w, a, floating)
    assert LayerSpec.parse({"w": 6}, "test") == LayerSpec(w=6)


@pytest.mark.parametrize(
    "bad, needle", [("w9", "weight bits 9"), ("a1", "activation bits 1"), ("x3", "malformed"), ({"q": 2}, "unknown key")]
)
def test_bad_layer_specs_name_the_problem(bad: object, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        LayerSpec.parse(bad, "--layer-bits")  # type: ignore[arg-type]


def test_labels_are_stable_and_distinct() -> None:
    assert QuantConfig.from_bits("w4a4").label == "w4a4"
    one = QuantConfig.from_bits("w4a4", ["features.0.*=w8a8", "classifier.*=float"])
    same = QuantConfig.from_bits("4", {"features.0.*": "w8a8", "classifier.*": "float"})
    swapped = QuantConfig.from_bits("w4a4", ["classifier.*=float", "features.0.*=w8a8"])
    assert one.label == same.label and one.label.startswith("w4a4-") and len(one.label) == len("w4a4-") + 6
    assert swapped.label != one.label  # order is meaning: later overrides win
    assert QuantConfig.model_validate(one.model_dump(mode="json")) == one  # round-trips as data


def test_overrides_resolve_in_order_and_the_stem_is_a_default_override() -> None:
    model = create_model("test_mobilenet_v2", 10, "cifar").eval()
    config = QuantConfig.from_bits("w4a4", ["*.conv.1.*=w6", "features.3.*=w3a5", "features.3.conv.1.*=float"])
    gm = prepare(model, "ssql", config, model_spec("test_mobilenet_v2"))
    weights = {layer: q.bits for layer, q in weight_quantizers(gm).items()}
    assert weights["features.0.0"] == 8  # the stem
    assert weights["features.2.conv.1.0"] == 6 and weights["features.2.conv.0.0"] == 4
    assert weights["features.3.conv.0.0"] == 3 and "features.3.conv.1.0" not in weights  # float wins last
    acts = {p.layer: p.bits for p in gm.quant_points.values()}
    assert acts["features.0.2"] == 8 and acts["features.3.conv.0.2"] == 5 and acts["features.2.conv.0.2"] == 4
    user_stem = prepare(model, "ssql", QuantConfig.from_bits("w4a4", ["features.0.*=w5a6"]), model_spec("test_mobilenet_v2"))
    assert weight_quantizers(user_stem)["features.0.0"].bits == 5  # a user's stem override beats the default one


def test_a_pattern_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(UserError, match=r"layer pattern 'featurez\.\*' matches no module"):
        prepare(create_model("test_mobilenet_v2", 10, "cifar"), "ssql", QuantConfig.from_bits("w4a4", ["featurez.*=w8"]))


def test_the_artifact_stores_and_reloads_the_resolved_table(tmp_path: Path, fmnist_root: Path, fmnist_batch: torch.Tensor) -> None:
    model = create_model("test_efficientnet", 10, "cifar").eval()
    config = QuantConfig.from_bits("w4a4", ["features.1.*=w8a8"])
    gm = prepare(model, "ssql", config, model_spec("test_efficientnet"))
    calibrate(gm, [fmnist_batch], "minmax")
    meta = ModelMeta.for_data("test_efficientnet", "cifar", 10, DataSource.of("fashion-mnist", fmnist_root, 32))
    path = tmp_path / "quantized.pt"
    save_quantized(path, gm, meta, config.label, False, {"calibration": {}})
    loaded = load_quantized(path)
    assert loaded.gm.quant_label == config.label and loaded.saved["table"]["weights"][0]["w"] == 8
    for name, q in act_quantizers(gm).items():
        restored = act_quantizers(loaded.gm)[name]
        assert (restored.bits, float(restored.lo), float(restored.hi)) == (q.bits, float(q.lo), float(q.hi))
    x = fmnist_batch[:8]
    with torch.no_grad():
        assert torch.equal(loaded.gm(x), gm(x))
