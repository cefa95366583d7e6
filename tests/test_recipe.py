from pathlib import Path

import pytest

from ssql_deploy.errors import UserError
from ssql_deploy.recipe import FinetuneRecipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_unknown_key_names_the_key_and_the_valid_ones(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("kind: finetune\nlearning_rate: 0.1\n")
    with pytest.raises(UserError) as exc:
        FinetuneRecipe.build(path)
    assert "unknown key 'learning_rate'" in str(exc.value) and "lr" in str(exc.value) and "epochs" in str(exc.value)


def test_flags_override_recipe_values_and_mode_fills_reference_defaults(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("kind: finetune\nmode: linear\nepochs: 7\nbatch_size: 64\n")
    recipe = FinetuneRecipe.build(path, epochs=3, lr=None)
    assert (recipe.epochs, recipe.batch_size) == (3, 64)
    assert (recipe.lr, recipe.weight_decay, recipe.milestones) == (30.0, 0.0, [0.6, 0.8])
    full = FinetuneRecipe.build(None, mode="full")
    assert (full.epochs, full.lr, full.weight_decay) == (50, 0.01, 1e-4)


@pytest.mark.parametrize("text, needle", [
    ("kind: pretrain\n", "is a 'pretrain' recipe"),
    ("epochs: -1\n", "epochs"),
    ("mode: probe\n", "mode"),
    ("[1, 2]\n", "must be a mapping"),
    ("epochs: [\n", "not valid YAML"),
])  # fmt: skip
def test_bad_recipes(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle):
        FinetuneRecipe.build(path)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        FinetuneRecipe.build(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((RECIPES / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_finetune_recipes_validate(path: Path) -> None:
    FinetuneRecipe.build(path)
