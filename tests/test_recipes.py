"""The training recipes: every zoo model has one, with and without batch norm, and apply_recipe fills
only what the user left unset."""
import pytest

from cnn_gpu.models import DEFAULT_BATCH_NORM, MODELS
from cnn_gpu.recipes import DEFAULT_LR, RECIPE_KEYS, RECIPES, apply_recipe


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_model_has_a_complete_recipe(name, batch_norm):
    recipe = RECIPES[(name, batch_norm)]
    assert set(RECIPE_KEYS) | {"optimizer", "lr"} <= set(recipe)
    assert recipe["optimizer"] in DEFAULT_LR and recipe["lr"] > 0 and recipe["batch_size"] > 0


@pytest.mark.parametrize("name", ["resnet20", "mobilenet", "vgg"])
def test_deep_networks_without_batch_norm_take_a_fifth_of_the_learning_rate(name):
    assert RECIPES[(name, False)]["lr"] == pytest.approx(RECIPES[(name, True)]["lr"] / 5)
    assert RECIPES[(name, False)]["batch_size"] == RECIPES[(name, True)]["batch_size"]


def test_apply_recipe_fills_what_is_unset_from_the_models_default_recipe():
    settings = {"model": "resnet20", "batch_norm": None, "optimizer": None, "lr": None,
                **{key: None for key in RECIPE_KEYS}}
    apply_recipe(settings)
    recipe = RECIPES[("resnet20", DEFAULT_BATCH_NORM["resnet20"])]
    assert settings["batch_norm"] is True
    assert settings["optimizer"] == recipe["optimizer"] and settings["lr"] == recipe["lr"]
    assert all(settings[key] == recipe[key] for key in RECIPE_KEYS)


def test_apply_recipe_keeps_what_the_user_gave():
    settings = {"model": "seed_cnn", "batch_norm": True, "optimizer": None, "lr": 0.3,
                **{key: None for key in RECIPE_KEYS}, "batch_size": 7, "erase": 0.25}
    apply_recipe(settings)
    assert settings["lr"] == 0.3 and settings["batch_size"] == 7 and settings["erase"] == 0.25
    assert settings["max_shift"] == RECIPES[("seed_cnn", True)]["max_shift"]


def test_another_optimizer_takes_its_own_default_learning_rate():
    # The plain seed recipe is Adam at 1e-3; asking for SGD must not keep Adam's rate.
    settings = {"model": "seed_cnn", "batch_norm": False, "optimizer": "sgd", "lr": None,
                **{key: None for key in RECIPE_KEYS}}
    apply_recipe(settings)
    assert RECIPES[("seed_cnn", False)]["optimizer"] == "adam"
    assert settings["lr"] == DEFAULT_LR["sgd"]
