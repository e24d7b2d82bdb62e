"""The learning-quality study's pure parts: statistics, subgroups, plan (cells over
base × patients per site × DP, keys, seeds), the generator's heterogeneity settings
and real sites (--sites-dir). Summary, goals and report: test_study_report.py."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from wardround.common.config import TaskConfig
from wardround.common.errors import ConfigError
from wardround.simulations.study.plan import ArmGroup, Cell, StudySettings, StudySize
from wardround.simulations.study.stats import (
    age_band,
    demographics,
    group_order,
    mean_sd,
    ratio,
    site_mean,
    subgroup_auroc,
)
from wardround.simulations.study.summary import fmt
from wardround.sitedata.ehr import encode_ehr
from wardround.sitedata.site_config import EhrSchema
from wardround.synthetic.hospitals import site_profile
from wardround.synthetic.notes import NoteStyle, site_cues, write_note
from wardround.synthetic.shift import (
    STUDY_HETEROGENEITY,
    Heterogeneity,
    apply_heterogeneity,
)

LABELS = ("nodule", "effusion", "pneumonia", "cardiomegaly")


# -- statistics ---------------------------------------------------------------------
def test_mean_sd_is_the_sample_sd_and_skips_undefined_values():
    assert mean_sd([1.0, 2.0, 3.0]).to_json() == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert mean_sd([0.7, math.nan, None]).n == 1
    one = mean_sd([0.7])
    assert one.mean == 0.7 and math.isnan(one.sd)
    assert mean_sd([]).n == 0 and math.isnan(mean_sd([]).mean)


def test_site_mean_weighs_every_site_once_and_ratio_guards_undefined():
    assert site_mean({"a": 0.6, "b": 0.8, "c": math.nan}) == pytest.approx(0.7)
    assert ratio(0.7, 0.8) == pytest.approx(0.875)
    assert math.isnan(ratio(0.7, 0.0)) and math.isnan(ratio(math.nan, 0.8))


def test_fmt_shows_sd_only_when_defined():
    assert fmt({"mean": 0.7412, "sd": 0.0123, "n": 3}) == "0.741 ± 0.012"
    assert fmt({"mean": 0.7412, "sd": None, "n": 1}) == "0.741"
    assert fmt(None) == "—" and fmt({"mean": None, "sd": None}) == "—"


# -- subgroups ----------------------------------------------------------------------
def test_demographics_reads_sex_and_age_band_from_the_encoded_ehr():
    task = TaskConfig()
    table = pa.table(
        {
            "patient_id": ["p1", "p2", "p3", "p4"],
            "study_uid": ["s1", "s2", "s3", "s4"],
            "age": [45, 72, None, 80],
            "sex": ["F", "M", "M", None],
            **{
                name: pa.array([None] * 4, pa.float64())
                for name in task.numeric
                if name != "age"
            },
            **{name: [1, 0, 0, 1] for name in LABELS},
        }
    )
    encoded = encode_ehr(table, task, EhrSchema())

    sexes, ages = demographics(encoded.features, task)

    assert sexes == ["F", "M", "M", "unknown"]
    assert ages == ["<50", "65–79", "unknown", "≥80"]


@pytest.mark.parametrize(
    ("years", "band"), [(18, "<50"), (49.9, "<50"), (50, "50–64"), (79.9, "65–79")]
)
def test_age_bands_are_half_open(years, band):
    assert age_band(years) == band


def test_subgroup_auroc_per_group_with_undefined_groups_as_nan():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], float)
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.7], [0.1, 0.3], [0.5, 0.5]])
    groups = ["a", "a", "a", "a", "b"]

    out = subgroup_auroc(labels, scores, groups)

    assert out["a"] == {"auroc": 1.0, "n": 4}
    assert out["b"]["n"] == 1 and math.isnan(out["b"]["auroc"])


def test_groups_sort_sexes_then_age_bands_in_order_then_sites():
    names = ["site-02", "≥80", "M", "<50", "unknown", "F", "65–79", "site-01"]
    assert sorted(names, key=group_order) == [
        "F",
        "M",
        "<50",
        "65–79",
        "≥80",
        "unknown",
        "site-01",
        "site-02",
    ]


# -- plan ------------------------------------------------------------------------------
def _names(arms) -> set[str]:
    return {a.name for a in arms}


def test_full_study_crosses_base_size_and_dp_with_the_ablations_at_the_smallest():
    settings = StudySettings.for_size(StudySize.FULL)
    cells = {c.key: c for c in settings.cells()}
    axis = {a.name for a in settings.arms if a.every_cell}

    assert settings.patients == (200, 1000, 3000)
    assert settings.bases == ("pretrained", "random")
    assert axis == {
        "pooled",
        "local",
        "fedavg",
        "fedavg-dp-eps1",
        "fedavg-dp-eps3",
        "fedavg-dp-eps8",
        "classical-pooled",
        "classical-local",
        "classical-fedavg",
        "classical-fedavg-dp-eps1",
        "classical-fedavg-dp-eps3",
        "classical-fedavg-dp-eps8",
        "fedavg-personal",  # judged per site: the larger validation splits
        "fedavg-personal-lora-b",
        "fedavg-own-model",
    }
    # every arm at 200 patients, 3 sites, pretrained
    assert _names(settings.arms_for(cells["200x3-pretrained"])) == _names(settings.arms)
    assert _names(settings.arms_for(cells["200x3-pretrained"])) >= {
        "fedprox-mu0.1",
        "fedavg-secagg",
        "fedavg-dp-eps8-secagg",
        "fedavg-image-only",
        "fedavg-gated",
        "fedavg-cross-attention",
    }
    # 8 sites: reference, classical and strategy arms, at the smallest size and
    # primary base
    assert {a.group for a in settings.arms_for(cells["200x8-pretrained"])} == {
        ArmGroup.REFERENCE,
        ArmGroup.CLASSICAL,
        ArmGroup.STRATEGY,
    }
    # the privacy axis on both bases at every size, on the ablation site count only
    for patients in settings.patients:
        assert _names(settings.arms_for(Cell(patients, 3, "random"))) == axis
        if patients > 200:
            assert _names(settings.arms_for(Cell(patients, 3, "pretrained"))) == axis
            assert settings.arms_for(Cell(patients, 8, "pretrained")) == ()
            assert settings.arms_for(Cell(patients, 8, "random")) == ()
    assert set(cells) == {
        "200x3-pretrained",
        "200x3-random",
        "200x8-pretrained",
        "1000x3-pretrained",
        "1000x3-random",
        "3000x3-pretrained",
        "3000x3-random",
    }
    # fewer seeds at the larger sizes
    assert [len(settings.seeds_for(p)) for p in settings.patients] == [3, 2, 1]
    per_seed_200 = (
        len(settings.arms)
        + len(axis)
        + len(settings.arms_for(cells["200x8-pretrained"]))
    )
    assert settings.arm_count(200) == 3 * per_seed_200
    assert settings.arm_count(1000) == 2 * 2 * len(axis)
    assert settings.arm_count(3000) == 1 * 2 * len(axis)


def test_seeds_are_one_count_or_one_per_size():
    one = StudySettings.for_size(StudySize.FULL, seeds=2)
    each = StudySettings.for_size(StudySize.FULL, patients=(1000, 200), seeds=(4, 1))

    assert [len(one.seeds_for(p)) for p in one.patients] == [2, 2, 2]
    assert each.patients == (200, 1000)  # ascending: the smallest runs every arm
    assert each.seeds_for(1000) == (0, 1, 2, 3) and each.seeds_for(200) == (0,)
    with pytest.raises(ConfigError, match="one per --patients size"):
        StudySettings.for_size(StudySize.FULL, seeds=(3, 1))
    with pytest.raises(ConfigError, match="each size once"):
        StudySettings.for_size(StudySize.FULL, patients=(200, 200), seeds=1)


def test_smoke_runs_the_random_base_only_and_the_first_pretrained_base_is_primary():
    smoke = StudySettings.for_size(StudySize.SMOKE)
    both = StudySettings.for_size(StudySize.SMOKE, bases=("random", "/x/tiny-base"))

    assert smoke.bases == ("random",) and smoke.primary_base == "random"
    assert [c.key for c in smoke.cells()] == ["40x3-random"]
    assert both.primary_base == "/x/tiny-base"
    assert [c.key for c in both.cells()] == ["40x3-tiny-base", "40x3-random"]
    assert _names(both.arms_for(Cell(40, 3, "/x/tiny-base"))) == _names(both.arms)


def test_arm_config_sets_the_arm_the_base_and_leaves_batches_to_the_recipe(tmp_path):
    from wardround.common.recipe import training_recipe

    full = StudySettings.for_size(StudySize.FULL)
    smoke = StudySettings.for_size(StudySize.SMOKE)
    cell = Cell(200, 3, "pretrained")
    arms = {a.name: a for a in full.arms}

    dp = full.arm_config(
        arms["fedavg-dp-eps8-secagg"], cell, str(tmp_path), 1, "r", "/bases/b"
    )
    plain = full.arm_config(arms["fedavg"], Cell(200, 3, "random"), "s", 1, "r")
    small = smoke.arm_config(arms["fedavg-dp-eps8"], Cell(40, 3, "random"), "s", 0, "r")

    assert dp.privacy.enabled and dp.privacy.target_epsilon == 8.0
    assert dp.secure_aggregation.enabled
    assert dp.federation.rounds == full.rounds
    assert dp.federation.min_sites == 3 and dp.model.init_seed == 1
    assert dp.model.base == "/bases/b" and plain.model.base == "random"
    # the study sets no batch size or learning rate: the recipes apply
    assert dp.train.batch_size == 0 and dp.train.learning_rate == 0
    assert training_recipe(dp).batch_size != training_recipe(plain).batch_size
    # the scope is written out as the recipe resolves it, so a site's loaded
    # model (reused per model section) is never one built for the other scope
    assert dp.model.trainable.value == training_recipe(dp).trainable.value == "fusion"
    assert plain.model.trainable.value == "all"
    # the smoke's sites are smaller than the DP batch: its preset sets one
    assert small.train.batch_size == smoke.batch_size > 0
    recipes = full.describe()["recipes"]
    assert recipes["DP-SGD"]["batch_size"] == training_recipe(dp).batch_size
    assert recipes["no DP"]["optimizer"] == training_recipe(plain).optimizer.value


def test_arm_key_changes_with_anything_that_decides_the_result():
    smoke = StudySettings.for_size(StudySize.SMOKE, bases=("pretrained", "random"))
    arm = smoke.arms[2]
    cell = Cell(40, 3, "pretrained")
    key = smoke.arm_key(arm, cell, 0)
    same = StudySettings.for_size(StudySize.SMOKE, bases=("pretrained", "random"))

    assert key == same.arm_key(arm, cell, 0)
    assert key != smoke.arm_key(arm, cell, 1)
    assert key != smoke.arm_key(arm, Cell(40, 4, "pretrained"), 0)
    assert key != smoke.arm_key(smoke.arms[3], cell, 0)
    assert key != smoke.arm_key(arm, Cell(40, 3, "random"), 0)  # the base
    assert key != smoke.arm_key(arm, Cell(80, 3, "pretrained"), 0)  # patients/site
    identity = {"layers_sha256": "ab"}
    assert smoke.arm_key(arm, cell, 0, identity) != key  # which pretrained base
    assert smoke.arm_key(arm, cell, 0, identity) != smoke.arm_key(
        arm, cell, 0, {"layers_sha256": "cd"}
    )


def test_the_delta_bound_keys_the_federated_arms_that_clip(monkeypatch):
    smoke = StudySettings.for_size(StudySize.SMOKE)
    cell = Cell(40, 3, "random")
    arms = {a.name: a for a in smoke.arms}
    names = ("fedavg", "fedavg-dp-eps8", "pooled", "classical-fedavg")
    before = {n: smoke.arm_key(arms[n], cell, 0) for n in names}
    arm_config = StudySettings.arm_config

    def other_bound(self, *args, **kwargs):
        config = arm_config(self, *args, **kwargs)
        return config.with_overrides(federation={"delta_clip_norm": 4.0})

    monkeypatch.setattr(StudySettings, "arm_config", other_bound)
    after = {n: smoke.arm_key(arms[n], cell, 0) for n in names}
    # the sites clip to it; pooled training and the classical FedAvg do not
    assert after["fedavg"] != before["fedavg"]
    assert after["fedavg-dp-eps8"] != before["fedavg-dp-eps8"]
    assert after["pooled"] == before["pooled"]
    assert after["classical-fedavg"] == before["classical-fedavg"]


def test_workers_share_every_federation_once_largest_first():
    from wardround.simulations.study.runner import federation_units, shard_units

    settings = StudySettings.for_size(StudySize.FULL)
    units = federation_units(settings)
    shares = [shard_units(settings, units, i, 2) for i in range(2)]

    assert sorted(shares[0] + shares[1]) == sorted(units)
    assert len(units) == sum(len(settings.seeds_for(p)) for p in (200, 1000, 3000)) + 3
    # the one 3,000-patient federation outweighs the rest of its worker's share
    big = next(s for s in shares if (3000, 0, 3) in s)
    assert all(unit[0] == 200 for unit in big if unit != (3000, 0, 3))


def test_a_one_site_study_and_tiny_sites_are_refused():
    with pytest.raises(ConfigError, match="at least 2"):
        StudySettings.for_size(StudySize.SMOKE, site_counts=(1,))
    with pytest.raises(ConfigError, match="at least 10 patients"):
        StudySettings.for_size(StudySize.SMOKE, patients=(5,))


# -- the generator's heterogeneity ----------------------------------------------------
def test_no_heterogeneity_leaves_a_profile_as_it_is():
    profile = site_profile(1, 0)
    assert apply_heterogeneity(profile, Heterogeneity(), 0) == profile


def test_study_heterogeneity_is_deterministic_and_differs_between_sites():
    a = [
        apply_heterogeneity(site_profile(i, 3), STUDY_HETEROGENEITY, 3)
        for i in range(4)
    ]
    b = [
        apply_heterogeneity(site_profile(i, 3), STUDY_HETEROGENEITY, 3)
        for i in range(4)
    ]

    assert a == b
    assert len({p.prevalence["pneumonia"] for p in a}) == 4
    assert len({p.scanner.scale for p in a}) == 4
    low, high = STUDY_HETEROGENEITY.scanner_noise
    assert all(low <= p.scanner.noise <= high for p in a)
    assert all(0.03 <= v <= 0.7 for p in a for v in p.prevalence.values())


def test_a_site_dialect_writes_only_its_own_phrases():
    rng = np.random.default_rng(0)
    cues = site_cues(NoteStyle.FULL, 0.5, rng)
    everything = site_cues(NoteStyle.FULL, 0.0, rng)
    dropped = {
        phrase
        for name, phrases in everything.items()
        for phrase in phrases
        if phrase not in cues[name]
    }
    assert all(1 <= len(v) < len(everything[k]) for k, v in cues.items())

    notes = [
        write_note(dict.fromkeys(LABELS, 1), 60, "F", NoteStyle.FULL, rng, cues)
        for _ in range(50)
    ]

    assert not any(p[0].upper() + p[1:] in n for n in notes for p in dropped)


def test_a_two_site_federation_runs_without_the_secagg_arms(tmp_path):
    settings = StudySettings.for_size(StudySize.SMOKE, site_counts=(2,))
    cell = Cell(40, 2, "random")

    two = settings.arms_for(cell)

    assert two and not any(a.secure_aggregation for a in two)
    assert {a.name for a in settings.arms_left_out(2)} >= {"fedavg-secagg"}
    assert settings.arms_left_out(3) == ()
    for arm in two:  # every arm that runs has a valid config
        config = settings.arm_config(arm, cell, str(tmp_path), 0, str(tmp_path / "r"))
        assert not config.secure_aggregation.enabled


# -- real sites (--sites-dir) ----------------------------------------------------------
def _site_folders(root, n):
    for i in range(n):
        (root / f"hospital-{i}").mkdir(parents=True)
        (root / f"hospital-{i}" / "site.toml").write_text(f'[site]\nname = "h{i}"\n')
    return root


def test_a_sites_dir_study_is_one_cell_of_its_own_sites(tmp_path):
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, _site_folders(tmp_path, 3))

    (cell,) = settings.cells()
    assert cell.own_data and cell.sites == 3 and cell.key == "sites3-random"
    assert "own data" in cell.label
    assert _names(settings.arms_for(cell)) == _names(settings.arms)


def test_arms_that_need_a_modality_no_site_has_are_skipped_with_the_reason(tmp_path):
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, _site_folders(tmp_path, 3))
    imageless = replace(settings, missing={"image": "no site has images"})

    (cell,) = imageless.cells()
    assert imageless.skipped() == {"fedavg-image-only": "no site has images"}
    assert "fedavg-image-only" not in _names(imageless.arms_for(cell))
    assert "fedavg" in _names(imageless.arms_for(cell))
    assert imageless.describe()["skipped_arms"] == imageless.skipped()


def test_an_arm_is_not_scored_at_a_site_with_none_of_its_inputs(tmp_path):
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, _site_folders(tmp_path, 3))
    mixed = replace(settings, site_gaps={"hospital-2": ("image", "note")})
    arms = {a.name: a for a in mixed.arms}

    assert mixed.unscored_sites(arms["fedavg-image-only"]) == {
        "hospital-2": "hospital-2 has no images in its validation split"
    }
    assert mixed.unscored_sites(arms["fedavg-note-only"]) == {
        "hospital-2": "hospital-2 has no notes in its validation split"
    }
    assert mixed.unscored_sites(arms["fedavg-ehr-only"]) == {}
    assert mixed.unscored_sites(arms["fedavg"]) == {}
    assert mixed.skipped() == {}  # two sites have images: the arm runs
    assert set(mixed.describe()["unscored_sites"]) == {
        "fedavg-image-only",
        "fedavg-note-only",
    }


def test_the_arms_a_two_site_federation_cannot_run_are_in_the_report(tmp_path):
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, _site_folders(tmp_path, 2))

    left_out = settings.describe()["arms_left_out"]

    assert set(left_out) == {"2"} and "fedavg-secagg" in left_out["2"]
    from wardround.simulations.study.report_setup import _arm_notes

    (line,) = [n for n in _arm_notes(settings.describe()) if "Not run" in n]
    assert "Not run at 2 sites" in line and "fedavg-secagg" in line


def test_a_sites_dir_needs_two_site_folders(tmp_path):
    with pytest.raises(ConfigError, match="at least 2"):
        StudySettings.for_sites_dir(StudySize.SMOKE, _site_folders(tmp_path, 1))
    with pytest.raises(ConfigError, match="not a folder"):
        StudySettings.for_sites_dir(StudySize.SMOKE, tmp_path / "absent")


def test_a_sites_settings_that_change_results_key_its_arms_and_its_paths_do_not(
    synthetic_sites,
):
    from wardround.simulations.study.study_data import site_settings_key
    from wardround.sitedata.site_config import SiteConfig

    site = SiteConfig.from_toml(synthetic_sites / "site-01" / "site.toml")
    key = site_settings_key(site)

    def changed(section: str, **values: object) -> str:
        part = getattr(site, section).model_copy(update=values)
        return site_settings_key(site.model_copy(update={section: part}))

    assert changed("privacy", min_noise_multiplier=3.0) != key
    assert changed("answers", decimals=1) != key
    assert changed("data", split_seed=site.data.split_seed + 1) != key
    assert changed("privacy", ledger_dir="/elsewhere/ledger") == key
    assert changed("data", cache_dir="/elsewhere/cache") == key


def _copy_sites(synthetic_sites, tmp_path):
    import shutil

    folder = tmp_path / "sites"
    shutil.copytree(synthetic_sites, folder)
    return folder


def test_sites_that_share_a_name_are_refused_naming_both_folders(
    synthetic_sites, tmp_path
):
    from wardround.common.errors import ConfigError
    from wardround.sitedata.site_config import check_distinct_names

    folder = _copy_sites(synthetic_sites, tmp_path)
    tomls = sorted(folder.glob("*/site.toml"))
    check_distinct_names(tomls)
    second = tomls[1]
    second.write_text(
        second.read_text().replace('name = "site-02"', 'name = "site-01"')
    )
    with pytest.raises(ConfigError) as err:
        check_distinct_names(tomls)
    assert "share the name 'site-01'" in err.value.message
    assert str(tomls[0].parent) in err.value.message
    assert str(tomls[1].parent) in err.value.message


def test_a_site_reading_its_ehr_from_a_database_is_staged_without_a_table_path(
    synthetic_sites, tmp_path
):
    import tomllib

    import tomli_w

    from wardround.simulations.study.study_data import stage_sites

    folder = _copy_sites(synthetic_sites, tmp_path)
    toml = folder / "site-02" / "site.toml"
    doc = tomllib.loads(toml.read_text())
    del doc["data"]["ehr"]
    doc["data"]["ehr-database"] = {
        "url": "postgresql://reader@127.0.0.1:5432/ehr",
        "table": "ehr",
        "password-file": "secrets/pw.txt",
    }
    toml.write_text(tomli_w.dumps(doc))
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, folder)
    staged = stage_sites(settings, tmp_path / "out")
    database = tomllib.loads(staged[1].read_text())["data"]
    assert "ehr" not in database
    assert database["ehr-database"]["password-file"] == str(
        (folder / "site-02").resolve() / "secrets" / "pw.txt"
    )


def test_a_run_configs_own_require_image_is_kept_on_site_folders(tmp_path):
    sites = _site_folders(tmp_path / "sites", 3)
    plain = StudySettings.for_sites_dir(StudySize.SMOKE, sites)
    (cell,) = plain.cells()
    # image-less sites train on EHR and notes unless the researcher says otherwise
    assert plain.base_config(str(sites), cell, 0).task.require_image is False
    strict = tmp_path / "run.toml"
    strict.write_text("[task]\nrequire-image = true\n")
    kept = StudySettings.for_sites_dir(StudySize.SMOKE, sites, run_config=strict)
    assert kept.base_config(str(sites), cell, 0).task.require_image is True


def test_every_broken_site_toml_of_a_folder_is_named_at_once(synthetic_sites, tmp_path):
    from wardround.common.errors import ConfigError
    from wardround.sitedata.site_config import check_distinct_names

    folder = _copy_sites(synthetic_sites, tmp_path)
    tomls = sorted(folder.glob("*/site.toml"))
    tomls[0].write_text(tomls[0].read_text() + "\n[data]\nsplit-seed = -1\n")
    tomls[1].write_text("[site\nname = ")

    with pytest.raises(ConfigError) as err:
        check_distinct_names(tomls)

    message = err.value.message
    assert message.startswith(f"2 of {len(tomls)} site.toml files have problems")
    assert str(tomls[0]) in message and str(tomls[1]) in message


def test_a_sites_dir_report_says_which_sites_report_coarser_and_how_images_are_used(
    tmp_path,
):
    from wardround.simulations.study.report_setup import _arm_notes

    settings = StudySettings.for_sites_dir(StudySize.SMOKE, _site_folders(tmp_path, 3))
    coarse = replace(settings, site_decimals={"hospital-0": 3, "hospital-1": 1})

    notes = "\n".join(_arm_notes(coarse.describe()))

    assert "hospital-1 reports to 1 decimal(s)" in notes and "hospital-0" not in notes
    assert "task.require-image = false" in notes
    assert "Answer precision" not in "\n".join(_arm_notes(settings.describe()))
