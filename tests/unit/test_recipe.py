"""The training recipe: the DP recipe whenever DP-SGD is on, set keys win."""

from __future__ import annotations

from wardround.client.trainer import LocalTrainSpec, make_optimizer
from wardround.common.config import OptimizerKind, RunConfig, TrainableScope
from wardround.common.recipe import PLAIN, PRIVATE, training_recipe
from wardround.models import build_model


def test_dp_on_takes_the_private_recipe_and_dp_off_the_plain_one():
    assert training_recipe(RunConfig()) == PRIVATE
    assert (
        training_recipe(RunConfig().with_overrides(privacy={"enabled": False})) == PLAIN
    )


def test_under_dp_the_batch_is_a_share_of_the_sites_patients_within_bounds():
    recipe = training_recipe(RunConfig())
    assert recipe.batch_for(160) == 20
    assert recipe.batch_for(2400) == 300
    assert recipe.batch_for(10) == 8  # never below the floor
    assert recipe.batch_for(10**7) == 4096
    # a set batch size is used as it is, at every site
    fixed = training_recipe(RunConfig().with_overrides(train={"batch_size": 48}))
    assert fixed.batch_for(160) == fixed.batch_for(2400) == 48
    assert (
        training_recipe(
            RunConfig().with_overrides(privacy={"enabled": False})
        ).batch_for(2400)
        == PLAIN.batch_size
    )


def test_keys_the_run_sets_win_over_the_recipe():
    config = RunConfig().with_overrides(
        train={"batch_size": 8, "learning_rate": 0.02, "optimizer": "adamw"},
        model={"trainable": "all"},
    )
    recipe = training_recipe(config)
    assert (recipe.batch_size, recipe.learning_rate) == (8, 0.02)
    assert recipe.optimizer is OptimizerKind.ADAMW
    assert recipe.trainable is TrainableScope.ALL


def test_the_spec_carries_the_resolved_recipe_and_builds_its_optimizer():
    spec = LocalTrainSpec.from_config(
        RunConfig(), seed=1, proximal_mu=0.0, patients=800
    )
    assert spec.optimizer is OptimizerKind.SGD
    assert (spec.batch_size, spec.learning_rate) == (100, PRIVATE.learning_rate)
    import torch

    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], spec)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == PRIVATE.momentum


def test_under_dp_only_the_fusion_module_and_the_head_train(tiny_config):
    private = build_model(
        tiny_config.with_overrides(
            privacy={"enabled": True}, model={"trainable": "auto"}
        )
    ).model
    trained = {n for n, p in private.named_parameters() if p.requires_grad}
    assert trained
    assert all(".fusion." in n or ".head." in n or ".wide." in n for n in trained)
    assert not any("encoder" in n or "_proj" in n for n in trained)
    plain = build_model(tiny_config.with_overrides(privacy={"enabled": False})).model
    plain_trained = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert any("vision_encoder" in n and "lora_" in n for n in plain_trained)

    def deep(model, names):  # the wide term trains in both, in full
        return sum(
            p.numel()
            for n, p in model.named_parameters()
            if n in names and ".wide." not in n
        )

    assert deep(private, trained) < deep(plain, plain_trained) / 5
