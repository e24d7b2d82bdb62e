"""The study's Markdown report (pure: from ``study.json``'s content to text).

The same text is ``report.md`` in the study's folder and, with ``--write-docs``,
the ``study:quality`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..reporting import describe_machine
from .summary import fmt

DOCS_SECTION = "study:quality"
PLOT_TITLES = {
    "rounds": "Validation AUROC per round, every arm (mean over sites and seeds)",
    "privacy": "Privacy–utility: AUROC against the DP budget ε per site",
    "sites": "Per-site AUROC: local-only, FedAvg and pooled",
}


def plot_title(name: str) -> str:
    """The alt text of a plot (``privacy-P``: the privacy–utility plot at size P)."""
    if name.startswith("privacy-"):
        patients = int(name.split("-", 1)[1])
        return (
            f"Privacy–utility at {patients:,} patients per site: AUROC against the "
            "DP budget ε per site, one line per base"
        )
    return PLOT_TITLES.get(name, name)


def _num(value: Any, digits: int = 3, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}{suffix}"


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


def _met(met: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: "reported"}[met]


def _verdict(goal: Mapping[str, Any]) -> str:
    value = goal.get("value")
    if goal["met"] is None and (value is None or not math.isfinite(value)):
        return "not measured"
    return _met(goal["met"])


_SCOPES = {
    "all": "LoRA on the encoders and every fusion layer",
    "fusion": "the fusion module and head only (the base frozen)",
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


def _size(patients: int) -> str:
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


def _own_data_notes(s: Mapping[str, Any]) -> list[str]:
    if not s.get("sites_dir"):
        return []
    lines = [
        "- **Where this runs**: the pooled arms gather every site's training data "
        "on the one machine that ran the study. That is for a data-sharing sandbox "
        "or a simulation, never a deployment: in a deployment no record leaves a "
        "site."
    ]
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
        "(`simulations/synth_shift.py`, `STUDY_HETEROGENEITY`): label skew "
        f"{h['label_skew']:g} (sd of each site's shift of each finding's "
        f"prevalence log-odds), scanner shift {h['scanner_shift']:g} (sd of the "
        "log intensity scale; offset sd half of it), scanner noise sd "
        + (f"{noise[0]:g}–{noise[1]:g}" if noise else "as preset")
        + f", note dialect {h['note_dialect']:g} (share of each finding's note "
        "phrases a site never uses), on top of the presets' differences in age, "
        "modality mix, note style and EHR schema."
    )


def _header(data: Mapping[str, Any]) -> list[str]:
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
        *_own_data_notes(s),
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
        f"- **Arms**: every arm runs at {_size(s['patients'][0])} patients per site on "
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
        f"and FedAvg + DP at each ε) on {_and(s['ablation_site_counts'])} sites. "
        "Arm runs per size (all seeds): "
        + ", ".join(f"{_size(int(p))} patients {n}" for p, n in _arm_runs(s).items())
        + ".",
        "- **AUROC**: macro over the four findings on each site's validation "
        "split, then the mean over sites (every hospital once); mean ± sd over "
        "seeds. Ratios to pooled are ratios of those means.",
    ]


def _arm_runs(s: Mapping[str, Any]) -> dict[str, int]:
    runs: dict[str, int] = {}
    for cell in s.get("cells", {}).values():
        key = str(cell["patients"])
        runs[key] = runs.get(key, 0) + len(cell["arms"]) * len(cell["seeds"])
    return runs


def _goals(data: Mapping[str, Any]) -> list[str]:
    lines = [
        "| patients/site | sites | base | goal | measured | |",
        "|---:|---:|---|---|---|---|",
    ]
    for g in data["goals"]:
        lines.append(
            f"| {_size(g['patients'])} | {g['sites']} | {g['base']} | {g['goal']} | "
            f"{g['measured']} | {_verdict(g)} |"
        )
    return lines


def _dp_worth(data: Mapping[str, Any]) -> list[str]:
    """The 'with n patients per site, ε keeps X of pooled' table and sentences."""
    rows = data.get("dp_worth") or []
    if not rows:
        return []
    epsilons = sorted({float(e) for r in rows for e in r["dp"]}, reverse=True)
    lines = [
        "X = AUROC of FedAvg + DP at ε over the AUROC of the pooled model without "
        "DP, in the same size, sites and base; in brackets, the sites where the DP "
        "model beats that site's local-only model (trained without DP).",
        "",
        "| patients/site | sites | base | seeds | pooled | local only | "
        "classical, pooled | FedAvg, no DP | "
        + " | ".join(f"ε={e:g}: AUROC (X)" for e in epsilons)
        + " | "
        + " | ".join(f"classical, ε={e:g}" for e in epsilons)
        + " |",
        "|---:|---:|---|---:|---:|---:|---:|---:|" + "---:|" * 2 * len(epsilons),
    ]
    sentences = []
    for r in rows:
        cells = []
        words = []
        for eps in epsilons:
            entry = r["dp"].get(f"{eps:g}")
            if entry is None:
                cells.append("—")
                continue
            above = (
                f", {entry['sites_above_local']}/{entry['sites']} above local-only"
                if entry.get("sites") is not None
                else ""
            )
            cells.append(
                f"{_num(entry['auroc'])} ({_num(entry['ratio_to_pooled'], 2)}×{above})"
            )
            words.append(f"ε={eps:g} {_num(entry['ratio_to_pooled'], 2)}×")
        lines.append(
            f"| {_size(r['patients'])} | {r['sites']} | {r['base']} | {r['seeds']} | "
            f"{_num(r['pooled'])} | {_num(r['local'])} | "
            f"{_num(r.get('classical'))} | {_num(r['fedavg'])} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(
                _num((r.get("classical_dp") or {}).get(f"{e:g}")) for e in epsilons
            )
            + " |"
        )
        if words:
            first, *rest = words
            eps, ratio_text = first.split(" ", 1)
            sentences.append(
                f"- With {_size(r['patients'])} patients per site ({r['sites']} sites, "
                f"{r['base']} base), {eps} keeps {ratio_text} of pooled"
                + (", " + ", ".join(rest) if rest else "")
                + f"; FedAvg without DP {_num(r['fedavg_ratio_to_pooled'], 2)}×."
            )
    return lines + [""] + sentences


def _mean(arms: Mapping[str, Any], name: str) -> float | None:
    entry = arms.get(name, {})
    return entry.get("auroc", {}).get("mean") if entry.get("seeds") else None


def _findings(arms: Mapping[str, Any]) -> list[str]:
    """What the figures of one cell say, in numbers."""
    lines = []
    pooled, local, fedavg = (_mean(arms, k) for k in ("pooled", "local", "fedavg"))
    if None not in (pooled, local, fedavg):
        lines.append(
            f"- **Federated vs pooled**: FedAvg {fedavg:.3f} = {fedavg / pooled:.3f}× "
            f"pooled ({pooled:.3f}); local-only {local:.3f} = {local / pooled:.3f}×."
        )
    classical = {
        k: _mean(arms, f"classical-{k}") for k in ("pooled", "local", "fedavg")
    }
    if None not in classical.values() and fedavg is not None:
        lines.append(
            f"- **Classical reference**: pooled {classical['pooled']:.3f}, local-only "
            f"{classical['local']:.3f}, FedAvg {classical['fedavg']:.3f}; the fusion "
            f"model's FedAvg {fedavg - classical['pooled']:+.3f} against the pooled "
            "classical model."
        )
    prox = sorted(
        (float(e["label"].split("=")[-1]), e["auroc"]["mean"])
        for name, e in arms.items()
        if name.startswith("fedprox-") and e.get("seeds")
    )
    if prox and fedavg is not None:
        lines.append(
            "- **FedProx**: "
            + ", ".join(f"μ={mu:g} {value:.3f}" for mu, value in prox)
            + f" (FedAvg {fedavg:.3f}); the per-round plot shows how fast each learns."
        )
    dp = sorted(
        (e["target_epsilon"], e["auroc"]["mean"])
        for e in arms.values()
        if e.get("seeds")
        and e.get("target_epsilon") is not None
        and not e.get("secure_aggregation")
        and not e.get("classical")
    )
    if dp and local is not None and fedavg is not None:
        untrained = arms["fedavg"]["per_round"][0]["mean"]
        below = all(value < local for _, value in dp)
        lines.append(
            "- **DP-SGD**: "
            + ", ".join(f"ε={eps:g} {value:.3f}" for eps, value in dp)
            + f", against {fedavg:.3f} without DP, {local:.3f} local-only and "
            f"{untrained:.3f} untrained"
            + ("; every ε measured is below local-only." if below else ".")
        )
    secure = _mean(arms, "fedavg-secagg")
    if secure is not None and fedavg is not None:
        lines.append(
            f"- **SecAgg+**: AUROC {secure:.3f} vs {fedavg:.3f} in the clear "
            f"({secure - fedavg:+.3f}; the two arms differ only in SecAgg+'s "
            "quantization of the deltas); bytes in `bench/systems.py`'s section."
        )
    singles = {
        e["label"].split(", ")[-1]: e["auroc"]["mean"]
        for e in arms.values()
        if e.get("seeds") and e["label"].endswith(" only") and e["group"] == "modality"
    }
    if singles and fedavg is not None:
        best = max(singles, key=singles.__getitem__)
        fusions = [
            (e["label"].split("(")[-1].rstrip(")"), e["auroc"]["mean"])
            for e in arms.values()
            if e.get("seeds") and "fused (" in e["label"]
        ]
        lines.append(
            f"- **Modalities**: best single {best} {singles[best]:.3f}; fused: concat "
            f"{fedavg:.3f} ({fedavg - singles[best]:+.3f})"
            + "".join(
                f", {name} {value:.3f} ({value - singles[best]:+.3f})"
                for name, value in fusions
            )
            + "."
        )
    return lines


def _arms_table(arms: Mapping[str, Any]) -> list[str]:
    lines = [
        "| arm | untrained | AUROC | × pooled | − classical pooled | "
        "sites above local-only | worst site | upload B/site/round | ε spent | "
        "s per run (CPU s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in arms.values():
        if not entry.get("seeds"):
            lines.append(f"| {entry['label']} | | failed | | | | | | | |")
            continue
        above = (
            f"{entry['sites_above_local']}/{entry['sites']}"
            if "sites_above_local" in entry
            else "—"
        )
        upload = entry.get("upload_bytes_per_site_per_round", {}).get("mean")
        lines.append(
            f"| {entry['label']} | {_num(entry['per_round'][0]['mean'])} | "
            f"{fmt(entry['auroc'])} | "
            f"{_num(entry.get('ratio_to_pooled'))} | "
            f"{_signed(entry.get('minus_classical'))} | {above} | "
            f"{_num(entry.get('worst_site'))} | "
            f"{'—' if upload is None else f'{upload:,.0f}'} | "
            f"{fmt(entry.get('epsilon'), 2)} | {_num(entry['seconds']['mean'], 0)} "
            f"({_num(entry['cpu_seconds']['mean'], 0)}) |"
        )
    return lines


def _signed(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:+.3f}"


def _best(arms: Mapping[str, Any], prefix: str) -> tuple[str, Mapping[str, Any]] | None:
    found = [
        (name, e)
        for name, e in arms.items()
        if name.startswith(prefix) and e.get("seeds")
    ]
    if not found:
        return None
    return max(found, key=lambda item: item[1]["auroc"]["mean"] or -1.0)


def _sites_table(arms: Mapping[str, Any]) -> list[str]:
    columns = [("local", "local only"), ("fedavg", "FedAvg")]
    best = _best(arms, "fedprox-")
    if best is not None:
        columns.append((best[0], f"best FedProx ({best[1]['label'].split()[-1]})"))
    columns.append(("pooled", "pooled"))
    columns += [
        ("classical-local", "classical, local"),
        ("classical-pooled", "classical, pooled"),
    ]
    columns = [(k, t) for k, t in columns if arms.get(k, {}).get("seeds")]
    reference = arms.get("pooled") or next(iter(arms.values()))
    sites = sorted(reference.get("per_site", {}))
    lines = [
        "| site | training (mean) | validation (mean) | "
        + " | ".join(t for _, t in columns)
        + " |",
        "|---|---:|---:|" + "---:|" * len(columns),
    ]
    for site in sites:
        cells = [fmt(arms[k]["per_site"].get(site)) for k, _ in columns]
        lines.append(
            f"| {site} | {_num(reference['train_examples'].get(site), 0)} | "
            f"{_num(reference['validation_examples'].get(site), 0)} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _subgroup_table(arms: Mapping[str, Any]) -> list[str]:
    fed = arms.get("fedavg", {}).get("subgroups")
    if not fed:
        return []
    pooled = arms.get("pooled", {}).get("subgroups") or {}
    lines = [
        "| by | group | validation examples (mean) | FedAvg | pooled |",
        "|---|---|---:|---:|---:|",
    ]
    for dimension in ("overall", "sex", "age", "site"):
        for group, entry in fed.get(dimension, {}).items():
            other = pooled.get(dimension, {}).get(group, {}).get("auroc")
            lines.append(
                f"| {dimension} | {group} | {entry['n']:.0f} | {fmt(entry['auroc'])} "
                f"| {fmt(other)} |"
            )
    return lines


def render_report(
    data: Mapping[str, Any],
    plots: Mapping[str, Path],
    *,
    relative_to: Path,
    heading: str = "##",
) -> str:
    """The study as Markdown; plot links relative to ``relative_to``."""
    lines = [f"{heading} Learning quality: federated vs pooled vs local-only", ""]
    lines += _header(data)
    lines += ["", f"{heading}# Goals", ""] + _goals(data)
    if data.get("failures"):
        lines += ["", "Arms that failed (not in the figures):", ""]
        lines += [f"- {k}: {why}" for k, why in data["failures"].items()]
    worth = _dp_worth(data)
    if worth:
        lines += ["", f"{heading}# Where DP is worth it", ""] + worth
    cells = data["settings"].get("cells", {})
    for key, arms in data["summary"].items():
        cell = cells.get(key)
        name = (
            f"{_size(cell['patients'])} patients/site, {cell['sites']} sites, "
            f"{cell['base']} base"
            if cell
            else key
        )
        lines += ["", f"{heading}# {name}", ""] + _findings(arms)
        lines += [""] + _arms_table(arms)
        lines += ["", f"Per site ({name}):", ""] + _sites_table(arms)
        table = _subgroup_table(arms)
        if table:
            lines += [
                "",
                f"Subgroups ({name}): AUROC of the final FedAvg model (and of "
                "the pooled model) over every site's validation split, by sex, age "
                "band and site; groups are small, so read differences below about "
                "0.05 as noise:",
                "",
                *table,
            ]
    if plots:
        lines += ["", f"{heading}# Plots", ""]
        for name, path in plots.items():
            link = Path(os.path.relpath(path, relative_to)).as_posix()
            lines += [f"![{plot_title(name)}]({link})", ""]
    return "\n".join(lines).rstrip() + "\n"
