"""The study's Markdown report (pure: from ``study.json``'s content to text).

The same text is ``report.md`` in the study's folder and, with ``--write-docs``,
the ``study:quality`` section of ``docs/benchmarks.md``. Its opening (how the
study ran) is :mod:`.report_setup`'s; the goals, findings and tables are here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .report_setup import header_lines, size_text
from .summary import against_best_single, fmt

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
        size = (
            "on the sites' own data"
            if patients == 0
            else f"at {patients:,} patients per site"
        )
        return (
            f"Privacy–utility {size}: AUROC against the "
            "DP budget ε per site, one line per base"
        )
    return PLOT_TITLES.get(name, name)


def _num(value: Any, digits: int = 3, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}{suffix}"


def _met(met: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: "reported"}[met]


def _verdict(goal: Mapping[str, Any]) -> str:
    value = goal.get("value")
    if goal["met"] is None and (value is None or not math.isfinite(value)):
        return "not measured"
    return _met(goal["met"])


def _goals(data: Mapping[str, Any]) -> list[str]:
    lines = [
        "| patients/site | sites | base | goal | measured | |",
        "|---:|---:|---|---|---|---|",
    ]
    for g in data["goals"]:
        lines.append(
            f"| {size_text(g['patients'])} | {g['sites']} | {g['base']} | {g['goal']} | "
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
            f"| {size_text(r['patients'])} | {r['sites']} | {r['base']} | {r['seeds']} | "
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
            eps_text, ratio_text = first.split(" ", 1)
            sentences.append(
                f"- With {size_text(r['patients'])} patients per site ({r['sites']} sites, "
                f"{r['base']} base), {eps_text} keeps {ratio_text} of pooled"
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
    if pooled is not None and local is not None and fedavg is not None:
        lines.append(
            f"- **Federated vs pooled**: FedAvg {fedavg:.3f} = {fedavg / pooled:.3f}× "
            f"pooled ({pooled:.3f}); local-only {local:.3f} = {local / pooled:.3f}×."
        )
    classical = {
        k: _mean(arms, f"classical-{k}") for k in ("pooled", "local", "fedavg")
    }
    if None not in classical.values() and fedavg is not None:
        classical_pooled = classical["pooled"]
        assert classical_pooled is not None  # no value is None (checked above)
        lines.append(
            f"- **Classical reference**: pooled {classical['pooled']:.3f}, local-only "
            f"{classical['local']:.3f}, FedAvg {classical['fedavg']:.3f}; the fusion "
            f"model's FedAvg {fedavg - classical_pooled:+.3f} against the pooled "
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
        e["label"].split(", ")[-1]: e
        for e in arms.values()
        if e.get("seeds") and e["label"].endswith(" only") and e["group"] == "modality"
    }
    if singles and fedavg is not None:
        fusions = [("concat", arms["fedavg"])] + [
            (e["label"].split("(")[-1].rstrip(")"), e)
            for e in arms.values()
            if e.get("seeds") and "fused (" in e["label"]
        ]
        compared = []
        for name, entry in fusions:
            best = against_best_single(entry, singles)
            if best is not None:
                compared.append((name, *best))
        if compared:
            best_name = compared[0][1]
            same_sites = (
                " (each fused model on the sites that single modality scores)"
                if any(e.get("unscored_sites") for e in singles.values())
                else ""
            )
            lines.append(
                f"- **Modalities**: best single {best_name} "
                f"{singles[best_name]['auroc']['mean']:.3f}{same_sites}; fused: "
                + ", ".join(
                    f"{name} {here:.3f} ({here - single:+.3f}"
                    + (f" vs {single_name}" if single_name != best_name else "")
                    + ")"
                    for name, single_name, single, here in compared
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
    lines += header_lines(data)
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
            f"{size_text(cell['patients'])} patients/site, {cell['sites']} sites, "
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
