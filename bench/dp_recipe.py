"""How DP-SGD federations learn under each training recipe.

The measurements behind wardround's DP recipe (docs/privacy.md, "Why this recipe").

Run from the repository root, in the project's venv::

    python bench/dp_recipe.py --patients 1000 --epsilon 8 [--seed 0] [--json PATH]

Every variant is a whole wardround FedAvg run (the sites' real ClientApps on an
in-process grid, DP-SGD planned for the run's schedule, Opacus, patient-level
sampling) on the study's synthetic hospitals (3 sites, the study's
heterogeneity), 5 rounds of 2 local epochs; the reference is pooled (centralised)
training without DP on the same training patients, with the plain recipe. The
score is the mean over sites of the final model's macro AUROC on each site's
validation split. One seed: differences below ~0.02 are within noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS: list[tuple[str, str, dict[str, dict[str, Any]]]] = [
    # (name, what it tests, run-config overrides on top of DP on + the DP recipe)
    ("recipe", "the DP recipe (defaults)", {}),
    (
        "all-adamw",
        "LoRA on the encoders + every fusion layer, AdamW 5e-3, batch 16 (the plain recipe)",
        {
            "model": {"trainable": "all"},
            "train": {"optimizer": "adamw", "learning_rate": 5e-3, "batch_size": 16},
        },
    ),
    (
        "all-sgd",
        "LoRA on the encoders + every fusion layer, the recipe's optimizer and batch",
        {"model": {"trainable": "all"}},
    ),
    (
        "ffa",
        "FFA-LoRA on the fusion layer (A frozen) + head",
        {"model": {"lora_variant": "ffa"}},
    ),
    ("rank-4", "LoRA rank 4", {"model": {"lora_rank": 4, "lora_alpha": 8.0}}),
    ("rank-16", "LoRA rank 16", {"model": {"lora_rank": 16, "lora_alpha": 32.0}}),
    (
        "adamw",
        "AdamW 5e-3 (fresh each round)",
        {"train": {"optimizer": "adamw", "learning_rate": 5e-3}},
    ),
    (
        "sgd-no-momentum",
        "SGD without momentum, lr 0.3",
        {"train": {"momentum": 0.0, "learning_rate": 0.3}},
    ),
    ("lr-0.03", "learning rate 0.03", {"train": {"learning_rate": 0.03}}),
    ("lr-0.3", "learning rate 0.3", {"train": {"learning_rate": 0.3}}),
    ("batch-16", "batch 16", {"train": {"batch_size": 16}}),
    ("batch-64", "batch 64", {"train": {"batch_size": 64}}),
    (
        "batch-256",
        "batch 256, learning rate 0.3",
        {"train": {"batch_size": 256, "learning_rate": 0.3}},
    ),
    (
        "full-batch",
        "full-batch DP (every patient each step), 10 steps a round, lr 0.5",
        {"train": {"batch_size": 65_536, "local_epochs": 10, "learning_rate": 0.5}},
    ),
    ("random-base", "the recipe on the random base", {"model": {"base": "random"}}),
]


def _sites(root: Path, patients: int, seed: int) -> list[Path]:
    from wardround.simulations.study.runner import raise_lifetime_budget
    from wardround.synthetic.hospitals import synthesize_federation
    from wardround.synthetic.shift import STUDY_HETEROGENEITY

    paths = synthesize_federation(
        root,
        3,
        patients_per_site=patients,
        seed=seed,
        heterogeneity=STUDY_HETEROGENEITY,
    )
    raise_lifetime_budget(paths)  # the sweep spends far more than one site's budget
    return paths


def _final(outcome: Any) -> float:
    last = outcome.per_round[-1]
    return sum(last.values()) / len(last)


def main() -> None:
    """Run the variants and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma list of variant names")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from wardround.common.config import RunConfig
    from wardround.models import build_model
    from wardround.models.registry import describe
    from wardround.simulations.study.arms import run_federated, run_pooled

    chosen = set(filter(None, args.only.split(",")))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        tomls = _sites(root / "sites", args.patients, args.seed)
        base = RunConfig().with_overrides(
            federation={"rounds": 5, "min_sites": 3, "seed": args.seed},
            secure_aggregation={"enabled": False},
            train={"local_epochs": 2, "torch_threads": 1},
            model={"init_seed": args.seed},
            data={"sites_dir": str(root / "sites")},
            output={"checkpoint_every": 5},
        )
        plain = base.with_overrides(privacy={"enabled": False})
        start = time.perf_counter()
        pooled = _final(run_pooled(plain, tomls, subgroups=False))
        print(f"pooled, no DP: {pooled:.3f} ({time.perf_counter() - start:.0f} s)")
        for name, what, overrides in VARIANTS:
            if chosen and name not in chosen:
                continue
            sections = {"privacy": {"target_epsilon": args.epsilon}, **overrides}
            config = base.with_overrides(
                **sections,
                output={"dir": str(root / "runs" / name), "checkpoint_every": 5},
            )
            trainable = describe(build_model(config))["trainable_parameters"]
            start = time.perf_counter()
            outcome = run_federated(
                config, tomls, root / "runs" / name, subgroups=False
            )
            auroc = _final(outcome)
            row = {
                "variant": name,
                "what": what,
                "trainable": trainable,
                "auroc": auroc,
                "of_pooled": auroc / pooled,
                "epsilon": max((outcome.epsilon or {}).values(), default=None),
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(
                f"{name:16s} {auroc:.3f} ({row['of_pooled']:.2f}x pooled) "
                f"{trainable} trainable, {row['seconds']:.0f} s",
                flush=True,
            )
    print()
    print(
        f"{args.patients} patients per site, 3 sites, ε = {args.epsilon:g}, seed "
        f"{args.seed}; pooled without DP: {pooled:.3f}\n"
    )
    print("| variant | what | trainable | AUROC | of pooled | ε spent |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "–"
        print(
            f"| {r['variant']} | {r['what']} | {r['trainable']:,} | {r['auroc']:.3f} | "
            f"{r['of_pooled']:.2f}× | {eps} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "pooled": pooled,
                    "rows": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    sys.exit(main())
