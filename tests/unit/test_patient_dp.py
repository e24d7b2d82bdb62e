"""The privacy unit is the patient: DP-SGD samples patients, one study each.

A patient may have several studies. Under DP, Opacus Poisson-samples the site's
training patients (rate 1 / ceil(patients / batch size)) and each sampled patient
gives one study, so a step moves by at most one clipped gradient per patient; the
planned sigma, the ledger's rate and the 1/N delta default count patients, and the
train/validation split never divides a patient.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from wardround.client.app import handle_train
from wardround.client.dp import DpTraining, is_empty_batch, private_training
from wardround.client.runtime import get_runtime
from wardround.client.site_check import check_site
from wardround.client.trainer import LocalTrainSpec, evaluate, train_local
from wardround.common import wire
from wardround.common.adapter import (
    adapter_sha256,
    adapter_state,
    load_adapter_state,
    to_record,
    wire_header,
)
from wardround.common.config import GradSampleMode, RunConfig, TaskConfig
from wardround.common.errors import DataError, PrivacyPolicyRefused
from wardround.common.privacy import local_schedule
from wardround.common.text import get_tokenizer
from wardround.sitedata.dataset import TensorDictDataset, load_site_data
from wardround.sitedata.site_config import SiteConfig
from wardround.sitedata.vlm_dataset import VlmDataset

SEEDED = DpTraining(1.0, 1.0, GradSampleMode.HOOKS, secure_mode=False)
GROUP_SIZES = (1, 2, 3, 4)  # studies per patient, cycled


def _grouped(n_studies: int) -> np.ndarray:
    """Patient numbers over ``n_studies`` studies: patients of 1, 2, 3, 4 studies."""
    patients, patient = [], 0
    while len(patients) < n_studies:
        patients += [patient] * GROUP_SIZES[patient % len(GROUP_SIZES)]
        patient += 1
    return np.array(patients[:n_studies], np.int64)


def _merge_patients(site_dir: Path) -> Counter:
    """Rewrite the site's EHR so patients have 1-4 studies; studies per new id."""
    path = site_dir / "ehr.parquet"
    table = pq.read_table(path)
    column = table.schema.get_field_index("patient_id")
    ids = table.column("patient_id").to_pylist()
    first_seen = list(dict.fromkeys(ids))
    groups = _grouped(len(first_seen))
    merged = {old: f"M{groups[k]}" for k, old in enumerate(first_seen)}
    new_ids = [merged[p] for p in ids]
    table = table.set_column(column, "patient_id", pa.array(new_ids, pa.string()))
    pq.write_table(table, path)
    return Counter(new_ids)


@pytest.fixture(scope="module")
def multi_study_site(tmp_path_factory) -> Path:
    """A synthetic site whose patients have 1 to 4 studies each."""
    from wardround.synthetic.hospitals import synthesize_federation

    root = tmp_path_factory.mktemp("multi-study")
    synthesize_federation(root, 1, patients_per_site=120, seed=4)
    site_dir = root / "site-01"
    _merge_patients(site_dir)
    toml = site_dir / "site.toml"
    toml.write_text(
        toml.read_text().replace("budget-epsilon = 100.0", "budget-epsilon = 1e6")
    )
    return site_dir


def _studies(patients: np.ndarray) -> TensorDictDataset:
    n = len(patients)
    return TensorDictDataset(
        {"study": torch.arange(n), "labels": torch.zeros(n, 1)}, patients
    )


def _sampled_batches(studies: TensorDictDataset, batch_size: int, passes: int):
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(studies, batch_size=batch_size)
    batches = []
    with private_training(model, optimizer, loader, SEEDED, seed=5) as parts:
        for _ in range(passes):
            batches += [
                b["study"].tolist() for b in parts.loader if not is_empty_batch(b)
            ]
        rate, steps = parts.loader.sample_rate, len(parts.loader)
        expected_batch = parts.optimizer.expected_batch_size
    return batches, rate, steps, expected_batch


def test_a_dp_batch_never_holds_a_patient_twice():
    patients = _grouped(150)  # 60 patients, 150 studies
    batches, _, steps, _ = _sampled_batches(_studies(patients), 10, passes=100)
    for batch in batches:
        owners = patients[batch]
        assert len(set(owners.tolist())) == len(owners), owners
    sizes = [len(b) for b in batches]
    assert steps == 6 and len(batches) >= 590  # empty batches are left out above
    # about batch-size patients per step, not batch-size x studies per patient
    assert 9.0 < np.mean(sizes) < 11.0
    # a patient's every study can be the one drawn, and a patient of 4 studies
    # is in a batch as often as a patient of 1
    drawn = Counter(s for b in batches for s in b)
    assert set(drawn) == set(range(150))
    per_patient = Counter(int(patients[s]) for b in batches for s in b)
    by_size = {
        size: np.mean([per_patient[p] for p in set(patients.tolist())
                       if (patients == p).sum() == size])
        for size in GROUP_SIZES
    }  # fmt: skip
    assert max(by_size.values()) / min(by_size.values()) < 1.15, by_size


def test_the_sample_rate_is_batch_size_over_training_patients():
    patients = _grouped(120)  # 48 patients
    assert len(np.unique(patients)) == 48
    _, rate, steps, expected_batch = _sampled_batches(_studies(patients), 8, 1)
    assert rate == pytest.approx(8 / 48)
    assert rate == local_schedule(48, 8, 1, 0).sample_rate
    assert steps == local_schedule(48, 8, 1, 0).steps_per_round == 6
    assert expected_batch == 8  # Opacus averages over patients, not studies


def test_dp_refuses_studies_that_do_not_name_their_patient():
    n = 12
    studies = TensorDictDataset({"study": torch.arange(n), "labels": torch.zeros(n)})
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(studies, batch_size=4)
    with pytest.raises(DataError, match="which patient"):
        with private_training(model, optimizer, loader, SEEDED, seed=0):
            pass
    vlm = VlmDataset([{"index": torch.tensor(0)}], ["q"], ["a"])
    loader = torch.utils.data.DataLoader(vlm, batch_size=1)
    with pytest.raises(DataError, match="which patient"):
        with private_training(model, optimizer, loader, SEEDED, seed=0):
            pass


def test_a_vlm_subset_keeps_each_examples_patient():
    items = [{"index": torch.tensor(k)} for k in range(6)]
    data = VlmDataset(items, ["q"] * 6, ["a"] * 6, np.array([0, 0, 1, 2, 2, 2]))
    part = data.subset(np.array([1, 3, 5]))
    assert part.patients.tolist() == [0, 2, 2]
    assert [int(i["index"]) for i in part.items] == [0, 1, 2]


def test_the_split_is_by_patient_and_counts_training_patients(multi_study_site):
    site = SiteConfig.from_toml(multi_study_site / "site.toml")
    data = load_site_data(
        site, TaskConfig(), image_size=16, max_note_tokens=16,
        tokenizer=get_tokenizer("byte"),
    )  # fmt: skip
    train, validation = data.train.patients, data.validation.patients
    assert len(train) == len(data.train) and len(validation) == len(data.validation)
    assert not set(train.tolist()) & set(validation.tolist())
    assert data.num_privacy_units == len(set(train.tolist())) < len(data.train)
    # the items' patients are the EHR's: 1 to 4 studies each
    counts = np.bincount(np.concatenate([train, validation]))
    assert counts.max() == 4 and counts.min() >= 1
    assert len(counts) == len(set(train.tolist()) | set(validation.tolist()))


def test_site_check_reports_patients_and_the_most_studies_of_one(multi_study_site):
    report = check_site(multi_study_site / "site.toml", TaskConfig(), image_size=16)
    join = report["join"]
    assert join["max_studies_per_patient"] == 4
    assert join["patients"] < join["items"]


def _train_message(config: RunConfig, site_toml: Path) -> tuple[Message, Context]:
    from wardround.models import build_model

    # A plain train message, which a run under SecAgg+ would refuse.
    config = config.with_overrides(secure_aggregation={"enabled": False})
    built = build_model(config)
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"site-config": str(site_toml)},
        state=RecordDict(),
        run_config=config.to_flower(),
    )
    content = RecordDict(
        {
            wire.GLOBAL_ADAPTER: to_record(adapter_state(built.model)),
            wire.CONFIG: ConfigRecord(
                {
                    wire.SERVER_ROUND: 1,
                    wire.BASE_FINGERPRINT: built.base_fingerprint,
                    **wire_header(adapter_state(built.model)),
                    wire.RUN_ID: "run-1",
                }
            ),
        }
    )
    message = Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN)
    return message, context


@pytest.mark.usefixtures("task_identity")
def test_a_dp_round_plans_and_ledgers_the_patient_sample_rate(
    multi_study_site, tiny_config, tmp_path
):
    site_dir = tmp_path / "site"
    shutil.copytree(multi_study_site, site_dir)
    shutil.rmtree(site_dir / "privacy-ledger", ignore_errors=True)
    config = tiny_config.with_overrides(train={"max_steps": 2})
    message, context = _train_message(config, site_dir / "site.toml")
    reply = handle_train(message, context)
    assert not reply.has_error()
    runtime = get_runtime(site_dir / "site.toml", 0, config)
    patients = runtime.data.num_privacy_units
    assert patients < len(runtime.data.train)
    batch, epochs = config.train.batch_size, config.train.local_epochs
    per_patient = local_schedule(patients, batch, epochs, 2).sample_rate
    per_study = local_schedule(len(runtime.data.train), batch, epochs, 2).sample_rate
    assert per_patient > per_study
    assert [m.sample_rate for m in runtime.ledger.history()] == [per_patient]


@pytest.mark.usefixtures("task_identity")
def test_the_default_delta_limit_is_one_over_the_training_patients(
    multi_study_site, tiny_config
):
    runtime = get_runtime(multi_study_site / "site.toml", 0, tiny_config)
    patients = runtime.data.num_privacy_units
    assert runtime.site.privacy.max_delta is None  # the 1/N default applies
    config = tiny_config.with_overrides(
        privacy={"target_delta": 1.2 / patients}, train={"max_steps": 1}
    )
    message, context = _train_message(config, multi_study_site / "site.toml")
    with pytest.raises(
        PrivacyPolicyRefused, match="1 / its number of training pat"
    ) as err:
        handle_train(message, context)
    # the refusal reaches the coordinator: it does not quote the patient count
    assert str(patients) not in err.value.message.split("limit", 1)[1]
    from wardround.client.privacy_policy import plan_site_privacy

    within = tiny_config.with_overrides(privacy={"target_delta": 0.9 / patients})
    plan = plan_site_privacy(within, runtime.site.privacy, patients, simulation=True)
    # the lifetime account is never at a looser delta than 1e-5 (or 1 / patients)
    assert plan is not None
    assert plan.lifetime_delta == pytest.approx(min(1e-5, 1 / patients))


def test_vlm_site_data_is_split_and_counted_by_patient(multi_study_site):
    from wardround.models.vlm_tiny import build_tiny_vlm
    from wardround.sitedata.vlm_dataset import load_vlm_site_data

    _, processor = build_tiny_vlm("llava")
    site = SiteConfig.from_toml(multi_study_site / "site.toml")
    data = load_vlm_site_data(
        site, TaskConfig(kind="vqa"), processor, image_size=16, max_tokens=256
    )
    train, validation = data.train.patients, data.validation.patients
    assert len(train) == len(data.train) and len(validation) == len(data.validation)
    assert not set(train.tolist()) & set(validation.tolist())
    assert data.num_privacy_units == len(set(train.tolist())) < len(data.train)
    assert np.bincount(np.concatenate([train, validation])).max() == 4


@pytest.fixture(scope="module")
def runtime(multi_study_site):
    return get_runtime(multi_study_site / "site.toml", 0, RunConfig())


# Every mode the config accepts trains: 'ew' needs the model's inputs positionally.
@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_a_dp_round_over_multi_study_patients_trains_the_adapter(runtime, mode):
    model = runtime.built.model
    initial = adapter_state(model)
    spec = LocalTrainSpec(
        epochs=2, max_steps=0, batch_size=8, learning_rate=5e-3, weight_decay=0.0,
        proximal_mu=0.0, seed=0, modality_dropout=0.1,
    )  # fmt: skip
    dp = DpTraining(0.2, 1.0, GradSampleMode(mode), secure_mode=False)
    try:
        before = evaluate(model, runtime.data.train, 64).loss
        outcome = train_local(model, runtime.data.train, spec, dp)
        after = evaluate(model, runtime.data.train, 64).loss
        trained = adapter_state(model)
    finally:
        load_adapter_state(model, initial)
    patients = runtime.data.num_privacy_units
    assert outcome.steps == local_schedule(patients, 8, 2, 0).steps_per_round
    assert outcome.num_examples == len(runtime.data.train)  # studies, as reported
    assert adapter_sha256(trained) != adapter_sha256(initial)
    assert after < before
