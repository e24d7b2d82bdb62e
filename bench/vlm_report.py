"""Validation loss per round of tiny vision-language models on the synthetic report task.

Runs whole federations of the ``vlm`` family on this machine's CPU: synthetic
hospitals (DICOM + EHR + reports written from each patient's findings), tiny
random-init LLaVA and PaliGemma models, the real ServerApp round loop and site
ClientApps in this process (``simulations/in_process.py``: Flower's message
encoding, egress guard, SecAgg+, DP-SGD and ledger as deployed, without Ray's
start-up). For each model it runs without DP and with the default privacy
(DP-SGD at epsilon 8 per site + SecAgg+), and reports the global validation loss
(mean answer-token NLL over every site's validation reports) after each round,
with perplexity, chrF text overlap and label agreement of the last round.

    python bench/vlm_report.py [--rounds 5] [--patients 80] [--write-docs]

``--write-docs`` replaces the section between ``<!-- vlm:cpu:start -->`` and
``<!-- vlm:cpu:end -->`` in ``docs/benchmarks.md`` with the measured table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from wardround.simulations.reporting import describe_machine, write_marked_section

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "vlm:cpu"
"""Marks this command's section: ``<!-- vlm:cpu:start -->`` ... ``:end -->``."""


def _config(sites: Path, arch: str, rounds: int, dp: bool, out: Path):
    from wardround.common.config import RunConfig

    return RunConfig().with_overrides(
        model={
            "family": "vlm",
            "tiny_arch": arch,
            "image_size": 32,
            "max_new_tokens": 48,
        },
        task={"kind": "report"},
        train={
            "batch_size": 8,
            "local_epochs": 2,
            "learning_rate": 0.02,
            "eval_generations": 4,
        },
        data={"sites_dir": str(sites)},
        federation={
            "rounds": rounds,
            "min_sites": len(list(sites.glob("*/site.toml"))),
        },
        privacy={"enabled": dp},
        secure_aggregation={"enabled": dp},
        output={"dir": str(out)},
    )


def run_one(sites: Path, arch: str, rounds: int, dp: bool, out: Path) -> dict:
    """One federation; its per-round global numbers."""
    from wardround.simulations.in_process import run_in_process

    config = _config(sites, arch, rounds, dp, out)
    start = time.perf_counter()
    result = run_in_process(config, out)
    wall = time.perf_counter() - start
    last = result.rounds[-1].extra.get("generative", {})
    return {
        "arch": arch,
        "dp": dp,
        "loss": [r.global_loss for r in result.rounds],
        "perplexity_last": last.get("eval-perplexity"),
        "chrf_last": last.get("text-overlap-chrf"),
        "label_agreement_last": last.get("label-agreement"),
        "epsilon": max(
            (
                t.privacy.epsilon_run
                for r in result.rounds
                for t in r.train
                if t.privacy is not None
            ),
            default=None,
        ),
        "validation_examples": sum(e.num_examples for e in result.rounds[-1].evaluate),
        "train_examples": sum(t.num_examples for t in result.rounds[-1].train),
        "adapter_parameters": result.summary["model"]["trainable_parameters"],
        "base_parameters": result.summary["model"]["base_parameters"],
        "wall_seconds": wall,
    }


def _label_rows(sites: Path) -> list[list[int | None]]:
    """Every study's report findings (0/1), read from the sites' EHR tables.

    A finding a site does not record (``[ehr] not-recorded``) is None there.
    """
    import pyarrow.parquet as pq

    from wardround.common.report_text import REPORT_FINDINGS
    from wardround.sitedata.site_config import SiteConfig

    rows = []
    for site_toml in sorted(sites.glob("*/site.toml")):
        site = SiteConfig.from_toml(site_toml)
        table = pq.read_table(site.ehr_path)
        columns = [
            table.column(site.ehr.label_column(f)).to_pylist()
            if site.ehr.records(f)
            else [None] * table.num_rows
            for f in REPORT_FINDINGS
        ]
        rows += [list(r) for r in zip(*columns, strict=True)]
    return rows


def _absent_share(rows: list[list[int | None]]) -> float:
    """Share of the known (study, finding) pairs whose finding is absent."""
    cells = [v for row in rows for v in row if v is not None]
    return sum(1 for v in cells if not v) / len(cells)


def _versions() -> str:
    import flwr
    import opacus
    import peft
    import torch
    import transformers

    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, opacus {opacus.__version__}, flwr {flwr.__version__}"
    )


def render(results: list[dict], args: argparse.Namespace) -> str:
    """The docs section (between the markers), from measured results only."""
    rounds = len(results[0]["loss"])
    head = "| model | privacy | " + " | ".join(f"r{r}" for r in range(rounds))
    head += " | perplexity | chrF | label agr. | wall |"
    rule = "|---|---|" + "---|" * rounds + "---|---|---|---|"
    rows = []
    for r in results:
        privacy = f"DP-SGD ε≤{r['epsilon']:.2f} + SecAgg+" if r["dp"] else "none"
        losses = " | ".join(f"{v:.3f}" for v in r["loss"])
        rows.append(
            f"| tiny {r['arch']} | {privacy} | {losses} | {r['perplexity_last']:.1f} "
            f"| {r['chrf_last']:.1f} | {r['label_agreement_last']:.2f} "
            f"| {r['wall_seconds']:.0f} s |"
        )
    sizes = ", ".join(
        f"{r['arch']}: {r['adapter_parameters']:,} adapter / {r['base_parameters']:,} "
        "base parameters"
        for r in results
        if not r["dp"]
    )
    first = results[0]
    return "\n".join(
        [
            "### Generative VLMs: federated report writing on CPU (tiny models)",
            "",
            f"Command: `python bench/vlm_report.py --rounds {args.rounds} --patients "
            f"{args.patients} --write-docs` (this section is written by it).",
            f"Machine: {describe_machine(args.machine)}; {_versions()}.",
            "",
            f"{args.sites} synthetic hospitals × {args.patients} patients "
            f"({first['train_examples']} training and {first['validation_examples']} "
            "validation studies in all, split per patient), task `report`: image + "
            "EHR serialised into the prompt → the report. Tiny random-init models "
            "(32 px images, hidden size 32, 2 layers; built from configs, no "
            f"download; {sizes}), LoRA rank 8 on every linear layer of vision "
            "tower, projector and language model. FedAvg, 2 local epochs per round, "
            "batch 8, AdamW lr 0.02, deltas clipped to L2 4. The in-process grid "
            "runs the real ServerApp round loop and site ClientApps one site after "
            "another (wall time is the sum over sites; one run each, on a machine "
            "shared with other work).",
            "",
            "Global validation loss (mean NLL per answer token, example-weighted "
            "over sites) after each round (r0: untrained), and the last round's "
            "perplexity, chrF of 4 greedy generations per site against their "
            "reference reports, and label agreement (findings read from the "
            "generated reports by the rules that wrote the synthetic ones, vs. the "
            "labels):",
            "",
            head,
            rule,
            *rows,
            "",
            "Label agreement for reference: a report that states every finding "
            f"absent would agree on {args.absent_share:.2f} of the (study, finding) "
            "pairs (the share of absent findings over all studies of these sites). "
            "The tiny models start from random weights, so most of the falling loss "
            "is the reports' shared language being learnt; the DP rows show what "
            "DP-SGD's noise costs on sites this small.",
        ]
    )


def main() -> None:
    """Run the benchmark; print JSON lines and the docs section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    # SecAgg+ (with DP) needs at least 3 sites
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--archs", default="llava,paligemma")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    import logging

    import torch

    from wardround.ops.env import apply_machine_hygiene
    from wardround.simulations.reporting import machine_info
    from wardround.synthetic.hospitals import synthesize_federation

    args.machine = machine_info()

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="wr-vlm-bench-") as tmp:
        root = Path(tmp)
        apply_machine_hygiene(root / "state")
        sites = root / "sites"
        synthesize_federation(sites, args.sites, patients_per_site=args.patients)
        sites_for_share = _label_rows(sites)
        for arch in args.archs.split(","):
            for dp in (False, True):
                out = root / f"run-{arch}-{'dp' if dp else 'plain'}"
                result = run_one(sites, arch, args.rounds, dp, out)
                print(json.dumps(result), flush=True)
                results.append(result)
    args.absent_share = _absent_share(sites_for_share)
    section = render(results, args)
    print(section)
    if args.write_docs:
        write_marked_section(DOCS, SECTION, section)


if __name__ == "__main__":
    main()
