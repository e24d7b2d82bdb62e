"""A site's DP-SGD rounds with the frozen encoders' embeddings cached, and without.

Run from the repository root, in the project's venv::

    python bench/frozen_features.py [--patients 60,480] [--rounds 5] [--json PATH]

One synthetic site per size, the default run config (DP recipe: encoders frozen,
Opacus ``hooks``), on a random base (the weights do not change the time). Each
round is what a site does for a round: local training (``train_local``, the DP
recipe's batch and epochs, Poisson sampling) and the evaluation of the adapter on
its validation split. Both variants run in this process, alternating round by
round, so they share the machine's state; *round 1* includes the cache's one pass
of the encoders over the site's studies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _site(root: Path, patients: int, config):
    from wardround.client.runtime import get_runtime
    from wardround.synthetic.hospitals import synthesize_federation

    synthesize_federation(root, 1, patients_per_site=patients, seed=1)
    return get_runtime(next(root.glob("*/site.toml")), 0, config)


def _round(site, config, objective, seed: int) -> tuple[float, float, int]:
    from wardround.client.dp import DpTraining
    from wardround.client.trainer import LocalTrainSpec, evaluate, train_local
    from wardround.common.config import GradSampleMode

    spec = LocalTrainSpec.from_config(
        config, seed=seed, proximal_mu=0.0, patients=site.data.num_privacy_units
    )
    dp = DpTraining(1.0, 1.0, GradSampleMode.HOOKS, secure_mode=False)
    start = time.perf_counter()
    outcome = train_local(site.built.model, site.data.train, spec, dp, objective)
    trained = time.perf_counter()
    evaluate(site.built.model, site.data.validation, 64, objective)
    return trained - start, time.perf_counter() - trained, outcome.steps


def measure(patients: int, rounds: int) -> dict:
    """Both variants' round times at one site of ``patients`` patients."""
    import torch

    from wardround.client.objectives import FusionObjective
    from wardround.common.adapter import adapter_state, load_adapter_state
    from wardround.common.config import RunConfig

    torch.set_num_threads(1)
    config = RunConfig().with_overrides(model={"base": "random"})
    with tempfile.TemporaryDirectory() as tmp:
        site = _site(Path(tmp), patients, config)
        initial = adapter_state(site.built.model)
        times: dict[str, list[tuple[float, float, int]]] = {
            "encoders": [],
            "cached": [],
        }
        for r in range(rounds):
            for name, cached in (("encoders", False), ("cached", True)):
                load_adapter_state(site.built.model, initial)
                objective = FusionObjective(
                    modality_dropout=config.train.modality_dropout,
                    frozen_features=cached,
                )
                times[name].append(_round(site, config, objective, seed=r))
    result: dict = {"patients": patients, "studies": len(site.data.train)}
    for name, rows in times.items():
        result[name] = {
            "round_1_s": rows[0][0] + rows[0][1],
            "later_median_s": statistics.median(t + e for t, e, _ in rows[1:]),
            "later_train_median_s": statistics.median(t for t, _, _ in rows[1:]),
            "later_eval_median_s": statistics.median(e for _, e, _ in rows[1:]),
            "steps": rows[-1][2],
        }
    return result


def main(argv: list[str] | None = None) -> int:
    """Measure every size and print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", default="60,480")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = [measure(int(p), args.rounds) for p in args.patients.split(",")]
    print(
        "| patients | training studies | steps | variant | round 1 (s) | "
        "later rounds (s) | of which training (s) | evaluation (s) |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for res in results:
        for name in ("encoders", "cached"):
            v = res[name]
            print(
                f"| {res['patients']} | {res['studies']} | {v['steps']} | {name} | "
                f"{v['round_1_s']:.3f} | {v['later_median_s']:.3f} | "
                f"{v['later_train_median_s']:.3f} | {v['later_eval_median_s']:.3f} |"
            )
    print()
    for res in results:
        enc, cac = res["encoders"], res["cached"]
        print(
            f"{res['patients']} patients: later rounds "
            f"{enc['later_median_s'] / cac['later_median_s']:.2f}x faster cached, "
            f"round 1 {enc['round_1_s'] / cac['round_1_s']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
