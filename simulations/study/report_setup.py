"""The study report's opening: how the study ran (pure: ``study.json`` to text).

Command, machine, versions, time, data, bases, the classical reference, the
training recipes and which arms ran where: everything a reader needs to judge
(or rerun) the figures that :mod:`.report` tabulates below it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..reporting import describe_machine
from .plan import THIN_CLASS
from .summary import SITE_AUROC_DECIMALS


def _and(values: list[Any]) -> str:
    """'3', '3 and 8', '2, 4 and 8'."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _sharing(data: Mapping[str, Any]) -> str:
    """How much of a core the arms had: their CPU time over their wall time."""
    share = data["arm_cpu_seconds_total"] / max(data["arm_seconds_total"], 1e-9)
    text = (
        f"the arms' CPU time was {share * 100:.0f} % of their wall time (100 %: a "
        "core of their own)"
    )
    loads = data.get("arm_load_average_range")
    if loads:
        text += f", load average {loads[0]:.1f}–{loads[1]:.1f} as they started"
    return text


_SCOPES = {
    "all": "LoRA on the encoders and every fusion layer",
    "fusion": "the fusion module, the head and the wide term only (the base frozen)",
}


def _recipe(recipe: Mapping[str, Any], batch: int) -> str:
    scope = _SCOPES.get(recipe["trainable"], recipe["trainable"])
    optimizer = {"adamw": "AdamW", "sgd": "SGD"}.get(
        recipe["optimizer"], recipe["optimizer"]
    )
    momentum = (
        f" (momentum {recipe['momentum']:g})" if recipe["optimizer"] == "sgd" else ""
    )
    size = batch or recipe["batch_size"]
    share = recipe.get("sample_rate", 0.0)
    batch_text = (
        f"batch {size}" if size else f"batch {share:g} of each site's training patients"
    )
    return f"{optimizer} lr {recipe['learning_rate']:g}{momentum}, {batch_text}, training {scope}"


def _training(s: Mapping[str, Any]) -> str:
    recipes = s.get("recipes") or {}
    batch = s["batch_size"]
    if not recipes:
        return f"batch {batch}"
    text = (
        "the recipes of `common/recipe.py`: without DP "
        + _recipe(recipes["no DP"], batch)
        + "; under DP-SGD "
        + _recipe(recipes["DP-SGD"], batch)
    )
    if batch:
        text += f"; the `{s['size']}` preset sets batch {batch} for every arm"
    return text


def _seeds(s: Mapping[str, Any]) -> str:
    seeds = s["seeds"]
    if s.get("sites_dir"):  # one size: the sites' own data
        return "seeds " + ", ".join(str(x) for x in next(iter(seeds.values())))
    parts = [
        f"{int(p):,} patients: {', '.join(str(x) for x in seeds[p])}" for p in seeds
    ]
    text = "seeds " + "; ".join(parts)
    counts = {len(v) for v in seeds.values()}
    if len(counts) > 1:
        text += (
            " (an arm's time grows with the patients per site, so the larger sizes "
            "run fewer seeds: their ± is over fewer seeds, and absent for one)"
        )
    return text


def _base_text(name: str, info: Mapping[str, Any] | None) -> str:
    if info is None:
        return f"`{name}`: randomly initialised encoders (the ablation)"
    corpus = info.get("corpus") or {}
    pretrain = info.get("pretrain") or {}
    if corpus.get("kind") == "public-synthetic":
        source = (
            f"a public synthetic corpus of {corpus['sites']} sites × "
            f"{corpus['patients_per_site']:,} patients (seed {corpus['seed']}, its "
            "own heterogeneity; its labels are never read)"
        )
    else:
        source = f"a corpus ({corpus.get('kind', 'as given')})"
    loss = ""
    if info.get("loss_first") is not None and info.get("loss_last_tenth") is not None:
        loss = f", loss {info['loss_first']:.2f} → {info['loss_last_tenth']:.2f}"
    built = (
        f", pretraining took {info['seconds']:.0f} s"
        if info.get("seconds") is not None
        else ""
    )
    digest = (info.get("layers_sha256") or "")[:12]
    return (
        f"`{name}`: encoders pretrained without labels "
        f"({info.get('objective', 'contrastive')}) on {source}, "
        f"{pretrain.get('steps', '?')} steps of batch {pretrain.get('batch_size', '?')}, "
        f"init seed {info.get('init_seed')}{loss}{built} (cached as "
        f"`{info.get('folder')}`, pretrained layers sha256 {digest}…)"
    )


def size_text(patients: int) -> str:
    """A cell's patients per site as the tables write it (0: the sites' own data)."""
    return "own data" if patients == 0 else f"{patients:,}"


def _data_text(s: Mapping[str, Any]) -> str:
    if s.get("sites_dir"):
        return (
            f"- **Data**: the {_and(s['site_counts'])} sites in `{s['sites_dir']}`"
            + (f", run config `{s['run_config']}`" if s.get("run_config") else "")
            + f", each split per patient as its site.toml says; {_seeds(s)}. Each "
            "seed draws the model's initialisation and the shuffling."
        )
    return (
        f"- **Data**: synthetic hospitals (`wardround synth`'s generator), "
        f"{_and(s['site_counts'])} sites, "
        f"{_and([f'{p:,}' for p in s['patients']])} patients per site, split per "
        f"patient into training and validation (80/20); {_seeds(s)}. Each seed "
        "draws the hospitals, the model's initialisation and the shuffling; every "
        "arm of a size, site count and seed is scored on the same per-site "
        "validation splits, whatever its base."
    )


def _arm_notes(s: Mapping[str, Any]) -> list[str]:
    """What did not run, or is not scored everywhere, and why."""
    lines = _own_data_notes(s)
    unscored = s.get("unscored_sites") or {}
    if unscored:
        lines.append(
            "- **Sites an arm does not score** (the site has none of the arm's "
            "inputs: its AUROC would be the untrained prior's 0.5): "
            + "; ".join(
                f"{arm}: {', '.join(sorted(sites.values()))}"
                for arm, sites in sorted(unscored.items())
            )
            + ". Those sites train in the arm but are left out of its means, "
            "ratios and comparisons; a goal that compares it with another arm "
            "compares the two on the same sites."
        )
    left_out = s.get("arms_left_out") or {}
    for n, names in sorted(left_out.items(), key=lambda item: int(item[0])):
        lines.append(
            f"- **Not run at {n} sites**: {', '.join(names)} (SecAgg+ needs at "
            "least 3 sites; a site refuses it among fewer)."
        )
    return lines


def _own_data_notes(s: Mapping[str, Any]) -> list[str]:
    if not s.get("sites_dir"):
        return []
    lines = [
        "- **Where this runs**: the pooled arms gather every site's training data "
        "on the one machine that ran the study. That is for a data-sharing sandbox "
        "or a simulation, never a deployment: in a deployment no record leaves a "
        "site."
    ]
    if not s.get("require_image_from_run_config"):
        lines.append(
            "- **Studies without an image** train on their EHR and notes at every "
            "site: the study sets `task.require-image = false` (a run config given "
            "with `--config` that sets it decides instead), so an imaged site's "
            "studies without an image, which `site check` leaves out by default, "
            "are in its splits."
        )
    coarse = {
        site: n
        for site, n in sorted((s.get("site_decimals") or {}).items())
        if n != SITE_AUROC_DECIMALS
    }
    if coarse:
        lines.append(
            "- **Answer precision**: "
            + ", ".join(
                f"{site} reports to {n} decimal(s)" for site, n in coarse.items()
            )
            + " (`[answers] decimals`), so its federated arms' AUROCs are rounded "
            "so; the arms trained on this machine (pooled, local only, classical) "
            "are not. A site counts as above its local-only model only if it is above "
            "at that precision; equal values there are a tie."
        )
    not_recorded = s.get("site_not_recorded") or {}
    if not_recorded:
        lines.append(
            "- **Not recorded at a site** (`[ehr] not-recorded`): "
            + "; ".join(
                f"{site}: {', '.join(names)}"
                for site, names in sorted(not_recorded.items())
            )
            + ". A label there is unknown in every row: the site trains no loss on "
            "it and its macro AUROC is over the other findings; a feature there is "
            "missing in every row."
        )
    thin = s.get("site_thin_labels") or {}
    if thin:
        lines.append(
            "- **Few validation examples of a class** (positives/negatives in the "
            "site's validation split): "
            + "; ".join(
                f"{site}: "
                + ", ".join(
                    f"{label} {pos}/{neg}" for label, (pos, neg) in labels.items()
                )
                for site, labels in sorted(thin.items())
            )
            + f". With fewer than {THIN_CLASS} examples of a class a site's AUROC for "
            "that finding moves in large steps between arms; with none it is "
            "undefined and left out of the site's macro AUROC. A larger "
            "`data.validation-fraction` in site.toml gives it more."
        )
    skipped = s.get("skipped_arms") or {}
    if skipped:
        lines.append(
            "- **Skipped arms** (the sites' data cannot support them): "
            + "; ".join(f"{name}: {why}" for name, why in sorted(skipped.items()))
            + "."
        )
    return lines


def _generator_text(h: Mapping[str, Any], noise: Any) -> str:
    return (
        "- **Generator difficulty, fixed before the study ran** "
        "(`synthetic/shift.py`, `STUDY_HETEROGENEITY`): label skew "
        f"{h['label_skew']:g} (sd of each site's shift of each finding's "
        f"prevalence log-odds), scanner shift {h['scanner_shift']:g} (sd of the "
        "log intensity scale; offset sd half of it), scanner noise sd "
        + (f"{noise[0]:g}–{noise[1]:g}" if noise else "as preset")
        + f", note dialect {h['note_dialect']:g} (share of each finding's note "
        "phrases a site never uses), on top of the presets' differences in age, "
        "modality mix, note style and EHR schema."
    )


def header_lines(data: Mapping[str, Any]) -> list[str]:
    """The report's opening list: how, where and on what the study ran."""
    s = data["settings"]
    v = data["versions"]
    h = s["heterogeneity"]
    m = data["machine"]
    finished = datetime.fromtimestamp(data["finished"], UTC).strftime("%Y-%m-%d")
    noise = h["scanner_noise"]
    return [
        f"*Written by `{data['command']}` on {finished}; rerun that command to "
        "regenerate this section, do not edit it by hand.*",
        "",
        f"- **Command** (repository root, the project's venv): `{data['command']}`",
        f"- **Machine**: {describe_machine(m)}; shared with other work: "
        + _sharing(data)
        + ".",
        f"- **Versions**: Python {v['python']}, torch {v['torch']}, flwr {v['flwr']}, "
        f"opacus {v['opacus']}, peft {v['peft']}, transformers {v['transformers']}, "
        f"wardround {v['wardround']}.",
        f"- **Time**: {data['arms_span_seconds'] / 60:.1f} min from the first arm's "
        f"start to the last one's end; the arms' own wall times add up to "
        f"{data['arm_seconds_total'] / 60:.1f} min. The command took "
        f"{data['wall_seconds'] / 60:.1f} min; its main process ran "
        f"{data['arms_run']} arms and read {data['arms_cached']} from the output "
        "folder (written by its `--jobs` workers or by an earlier call).",
        _data_text(s),
        "- **Bases**: "
        + "; ".join(
            _base_text(name, info) for name, info in data.get("bases", {}).items()
        )
        + f". The ablations run on the `{s['primary_base']}` base.",
        *_arm_notes(s),
        *([] if s.get("sites_dir") else [_generator_text(h, noise)]),
        "- **Classical reference**: logistic regression on each note's binary bag "
        "of hashed word 1–2-grams (L2-normalised; hashing, so no vocabulary is "
        "learned from any site's text) and the EHR features the run declares, one "
        "model per finding. Pooled and local only: scikit-learn's "
        "`LogisticRegressionCV` (L2 strength by 3-fold cross-validated AUROC on "
        "the training split); FedAvg: the same linear model trained by the sites' "
        "local trainer and averaged like the fusion model's adapter, with DP-SGD "
        "as the DP arms. '− classical pooled' is an arm's AUROC minus the pooled "
        "classical model's.",
        f"- **Training**: the default fusion model (image {s['image_size']}², "
        f"notes ≤ {s['max_note_tokens']} tokens), {s['rounds']} rounds × "
        f"{s['local_epochs']} local epochs, {_training(s)}: every arm sees "
        f"each training example {s['rounds'] * s['local_epochs']} times (under "
        "DP-SGD in expectation: Poisson sampling). Pooled: "
        "the same trainer on the union of the training splits; local only: each "
        "site alone. FedProx μ ∈ {"
        + ", ".join(f"{x:g}" for x in s["fedprox_mus"])
        + "}; DP-SGD at ε ∈ {"
        + ", ".join(f"{x:g}" for x in s["dp_epsilons"])
        + "} per site (δ = 1e-5, clip 1.0, RDP accounting).",
        "- **Arms**: every arm runs "
        + (
            "on the sites' own data"
            if s.get("sites_dir")
            else f"at {size_text(s['patients'][0])} patients per site"
        )
        + " on "
        f"{_and(s['ablation_site_counts'])} sites with the `{s['primary_base']}` "
        "base"
        + (
            f"; {_and(others)} sites run pooled, local-only, FedAvg and FedProx there"
            if (
                others := [
                    c for c in s["site_counts"] if c not in s["ablation_site_counts"]
                ]
            )
            else ""
        )
        + "; every size and base runs the privacy axis (pooled, local-only, FedAvg "
        "and FedAvg + DP at each ε) and the personalised arms on "
        f"{_and(s['ablation_site_counts'])} sites. "
        + (
            f"Arm runs (all seeds): {sum(_arm_runs(s).values())}."
            if s.get("sites_dir")
            else "Arm runs per size (all seeds): "
            + ", ".join(
                f"{size_text(int(p))} patients {n}" for p, n in _arm_runs(s).items()
            )
            + "."
        ),
        "- **AUROC**: macro over the run's findings on each site's validation "
        "split (a finding without both positive and negative studies there, or "
        "unknown at that site, is left out of that site's mean), then the mean "
        "over sites (every hospital once); mean ± sd over seeds. Ratios to pooled "
        "are ratios of those means.",
    ]


def _arm_runs(s: Mapping[str, Any]) -> dict[str, int]:
    runs: dict[str, int] = {}
    for cell in s.get("cells", {}).values():
        key = str(cell["patients"])
        runs[key] = runs.get(key, 0) + len(cell["arms"]) * len(cell["seeds"])
    return runs
