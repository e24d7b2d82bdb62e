"""The pretrained base: label-free alignment, the base folder, the public cache, the recipe."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from wardround.common.config import RunConfig
from wardround.common.errors import ConfigError
from wardround.models import build_model, public_base
from wardround.models.alignment import alignment_loss
from wardround.models.base_folder import MANIFEST, read_manifest
from wardround.models.pretraining import PretrainSettings
from wardround.models.public_base import PublicCorpus, pretrain_base

FEW_STEPS = PretrainSettings(steps=4, batch_size=16, warmup_steps=1, threads=1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_alignment_loss_is_lower_for_matched_views_than_for_shuffled_ones():
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(32, 16, generator=generator)
    views = torch.stack(
        [
            _unit(shared + 0.1 * torch.randn(32, 16, generator=generator))
            for _ in range(3)
        ],
        dim=1,
    )
    present = torch.ones(32, 3)
    matched = alignment_loss(views, present, temperature=0.1)
    shuffled = views.clone()
    shuffled[:, 2] = views[torch.randperm(32, generator=generator), 2]
    assert matched is not None
    assert matched < alignment_loss(shuffled, present, temperature=0.1)


def test_alignment_loss_uses_only_examples_that_have_both_modalities():
    views = _unit(torch.randn(4, 3, 8))
    present = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 0]]).float()
    # no pair is present in two examples: nothing to contrast
    assert alignment_loss(views, present, temperature=0.1) is None
    present[3, 2] = 1  # now EHR-note is present in examples 2 and 3
    before = alignment_loss(views, present, temperature=0.1)
    scrambled = views.clone()
    scrambled[:2] = _unit(torch.randn(2, 3, 8))  # examples without the pair
    assert torch.allclose(before, alignment_loss(scrambled, present, temperature=0.1))


@pytest.fixture(scope="module")
def built_base(synthetic_sites, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "base"
    tomls = sorted(synthetic_sites.glob("*/site.toml"))
    manifest = pretrain_base(tiny_config, tomls, out, FEW_STEPS, {"kind": "sites"})
    return out, manifest


def test_pretraining_writes_a_save_pretrained_base_that_model_base_names(
    built_base, tiny_config
):
    from transformers import AutoModel

    out, manifest = built_base
    assert (out / "vision" / "config.json").is_file()
    assert (out / "text" / "model.safetensors").is_file()
    assert read_manifest(out)["pretrain"]["steps"] == FEW_STEPS.steps
    assert len(manifest["corpus_examples"]) == 2
    assert manifest["loss_first"] > 0

    pretrained = build_model(tiny_config.with_overrides(model={"base": str(out)}))
    random = build_model(tiny_config)
    assert pretrained.base_fingerprint != random.base_fingerprint
    saved = AutoModel.from_pretrained(out / "vision").state_dict()
    loaded = pretrained.model.base_model.model.vision_encoder.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # the same folder gives the same base, fingerprint included
    again = build_model(tiny_config.with_overrides(model={"base": str(out)}))
    assert again.base_fingerprint == pretrained.base_fingerprint


def test_pretraining_is_reproducible_and_reads_no_label(
    synthetic_sites, tiny_config, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    tomls = sorted(synthetic_sites.glob("*/site.toml"))
    outs = []
    for name in ("a", "b"):
        pretrain_base(tiny_config, tomls, tmp_path / name, FEW_STEPS, {"kind": "sites"})
        outs.append(load_file(str(tmp_path / name / "encoders.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_a_base_built_for_other_shapes_is_refused_with_the_fix(built_base, tiny_config):
    out, _ = built_base
    other = tiny_config.with_overrides(model={"base": str(out), "image_size": 48})
    with pytest.raises(ConfigError) as info:
        build_model(other)
    assert "image_size" in info.value.message
    assert "wardround pretrain" in info.value.hint


def test_a_folder_without_a_manifest_is_not_a_base(tmp_path, tiny_config):
    with pytest.raises(ConfigError, match="not a wardround base"):
        build_model(tiny_config.with_overrides(model={"base": str(tmp_path)}))
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 99}))
    with pytest.raises(ConfigError, match="format"):
        build_model(tiny_config.with_overrides(model={"base": str(tmp_path)}))


def test_the_public_base_is_built_once_then_reused(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("WARDROUND_CACHE", str(tmp_path / "cache"))
    corpus = PublicCorpus(sites=2, patients_per_site=24)
    # what a build killed by SIGTERM leaves: its staging folder, half written
    where = public_base.public_base_path(tiny_config, corpus, FEW_STEPS)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = f"{where.name}.partial-{socket.gethostname()}-"
    killed = where.with_name(f"{prefix}{dead.pid}")
    building = where.with_name(f"{prefix}{os.getppid()}")  # a live process's
    elsewhere = where.with_name(f"{where.name}.partial-other-host-{dead.pid}")
    for leftover in (killed, building, elsewhere):
        (leftover / "corpus" / "site-01").mkdir(parents=True)
    first = public_base.public_base_folder(tiny_config, corpus, FEW_STEPS)
    assert (first / MANIFEST).is_file()
    assert read_manifest(first)["corpus"]["seed"] == corpus.seed
    # the killed build's staging folder and this build's are gone; a live
    # build's and another host's are not this build's to remove
    assert sorted(p.name for p in first.parent.iterdir()) == sorted(
        [first.name, first.with_suffix(".lock").name, building.name, elsewhere.name]
    )

    def no_second_build(*args, **kwargs):
        raise AssertionError("the cached base was built again")

    monkeypatch.setattr(public_base, "build_public_base", no_second_build)
    assert public_base.public_base_folder(tiny_config, corpus, FEW_STEPS) == first
    # other pretraining settings are another base
    other = PretrainSettings(steps=5, batch_size=16, warmup_steps=1, threads=1)
    assert public_base.base_key(tiny_config, corpus, other) != public_base.base_key(
        tiny_config, corpus, FEW_STEPS
    )


def test_the_public_corpus_refuses_a_task_with_other_ehr_features(tiny_config):
    other_task = tiny_config.with_overrides(
        task={
            "numeric": {"lactate": {"mean": 1.5, "std": 1.0}},
            "units": {},
            "ranges": {},
        }
    )
    with pytest.raises(ConfigError, match="public synthetic corpus") as info:
        public_base.check_public_corpus_fits(other_task)
    assert "wardround pretrain --corpus" in info.value.hint


def test_the_public_corpus_seed_is_not_one_a_study_or_simulation_uses():
    from wardround.simulations.study.plan import StudySettings, StudySize

    full = StudySettings.for_size(StudySize.FULL)
    seeds = {seed for n in full.patients for seed in full.seeds_for(n)}
    seeds.add(RunConfig().data.synth_seed)
    assert PublicCorpus().seed not in seeds
    assert PublicCorpus().heterogeneity != public_base.Heterogeneity()


def test_image_views_differ_stay_in_range_and_repeat_for_a_seed():
    from wardround.models.alignment import augment_images

    images = torch.rand(6, 1, 32, 32)
    first = augment_images(images, torch.Generator().manual_seed(3))
    again = augment_images(images, torch.Generator().manual_seed(3))
    other = augment_images(images, torch.Generator().manual_seed(4))
    assert first.shape == images.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, images)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_named_checkpoints_are_the_base_and_nothing_is_built(
    tiny_config, tmp_path, monkeypatch
):
    from transformers import AutoModel

    from wardround.common.text import get_tokenizer
    from wardround.models.fusion import tiny_text_config, tiny_vision_config

    AutoModel.from_config(tiny_vision_config(32)).save_pretrained(tmp_path / "vit")
    AutoModel.from_config(
        tiny_text_config(len(get_tokenizer("byte")), 32)
    ).save_pretrained(tmp_path / "bert")

    def no_build(*args, **kwargs):
        raise AssertionError("the public base was built for named checkpoints")

    monkeypatch.setattr(public_base, "public_base_folder", no_build)
    config = tiny_config.with_overrides(
        model={
            "base": "pretrained",
            "vision": str(tmp_path / "vit"),
            "text": str(tmp_path / "bert"),
        }
    )
    built = build_model(config)
    saved = AutoModel.from_pretrained(tmp_path / "bert").state_dict()
    loaded = built.model.get_base_model().text_encoder.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_the_pretrain_command_writes_a_base_and_explains_a_bad_corpus(
    synthetic_sites, tmp_path
):
    from typer.testing import CliRunner

    from wardround.cli import app

    run_toml = tmp_path / "run.toml"
    run_toml.write_text(
        '[model]\nimage-size = 32\nmax-note-tokens = 32\nbase = "random"\n'
    )
    out = tmp_path / "base"
    args = ["pretrain", "--config", str(run_toml), "--steps", "2", "--batch-size", "8"]
    result = CliRunner().invoke(
        app, [*args, "--corpus", str(synthetic_sites), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["corpus"]["sites"] == ["site-01", "site-02"]
    assert "model.base" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = CliRunner().invoke(
        app, [*args, "--corpus", str(empty), "--out", str(out)]
    )
    assert refused.exit_code == 2
    assert "site folder" in refused.output


def test_a_model_with_nothing_to_align_is_refused(
    synthetic_sites, tiny_config, tmp_path
):
    ehr_only = tiny_config.with_overrides(model={"modalities": ["ehr"]})
    tomls = sorted(synthetic_sites.glob("*/site.toml"))
    with pytest.raises(ConfigError, match="nothing to align"):
        pretrain_base(ehr_only, tomls, tmp_path / "base", FEW_STEPS, {"kind": "sites"})
