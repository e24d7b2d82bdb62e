"""Benchmark: a site's sigma planning, searched against remembered (the sigma cache).

Run from the repository root::

    python bench/sigma_plan.py [--sites 16] [--json PATH]

Each schedule is the one a site of the default simulation plans (its sample rate
and steps over the whole run; 240 training patients), for the default 5 rounds at
epsilon 8 and for 20 rounds at epsilon 8 and 1, with RDP and with PRV. Every measurement runs in a
fresh subprocess, so no in-process answer (``functools.lru_cache``) helps:

Opacus is imported before the clock starts, as it is in a site that trains with
DP-SGD.

* *search*: ``plan_noise_multiplier`` alone, what every site paid before;
* *cold*: the first site with an empty cache (search + writing the answer);
* *warm*: a later site, which reads the answer and has the accountant check it.

``--sites N`` reports what N sites with the same schedule spend in all: N searches
before, one cold and N-1 warm now.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [(5, 8.0), (20, 8.0), (20, 1.0)]
"""(federation.rounds, privacy.target-epsilon): the default run, then longer ones."""


def schedules(num_train: int) -> list[tuple[float, float, float, int]]:
    """(epsilon, delta, sample rate, total steps) a site with ``num_train`` plans."""
    from wardround.common.config import RunConfig
    from wardround.common.privacy import local_schedule
    from wardround.common.recipe import training_recipe

    config = RunConfig()
    schedule = local_schedule(
        num_train,
        training_recipe(config).batch_for(num_train),
        config.train.local_epochs,
        config.train.max_steps,
    )
    return [
        (
            eps,
            config.privacy.target_delta,
            schedule.sample_rate,
            schedule.steps_per_round * rounds,
        )
        for rounds, eps in RUNS
    ]


ACCOUNTANTS = ("rdp", "prv")

_CHILD = """
import json, sys, time
from pathlib import Path
from wardround.common.config import Accountant
from wardround.common.privacy import plan_noise_multiplier
from wardround.client.sigma_cache import planned_sigma
import opacus.accountants, opacus.accountants.utils  # a DP site has them loaded
eps, delta, q, steps, acc, mode, cache = json.loads(sys.argv[1])
start = time.perf_counter()
if mode == "search":
    sigma = plan_noise_multiplier(eps, delta, q, steps, Accountant(acc))
else:
    sigma = planned_sigma(eps, delta, q, steps, Accountant(acc), Path(cache))
print(json.dumps({"seconds": time.perf_counter() - start, "sigma": sigma}))
"""


def _measure(args: list) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure every schedule and accountant; print a table and the totals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=16)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    rows = []
    for eps, delta, q, steps in schedules(240):
        for acc in ACCOUNTANTS:
            with tempfile.TemporaryDirectory() as cache:
                question = [eps, delta, q, steps, acc]
                search = _measure([*question, "search", cache])
                cold = _measure([*question, "cached", cache])
                warm = _measure([*question, "cached", cache])
            assert search["sigma"] == cold["sigma"] == warm["sigma"]
            n = options.sites
            before = n * search["seconds"]
            after = cold["seconds"] + (n - 1) * warm["seconds"]
            rows.append(
                {
                    "epsilon": eps,
                    "sample_rate": round(q, 5),
                    "steps": steps,
                    "accountant": acc,
                    "sigma": round(search["sigma"], 4),
                    "search_s": round(search["seconds"], 3),
                    "cold_s": round(cold["seconds"], 3),
                    "warm_s": round(warm["seconds"], 3),
                    f"{n}_sites_before_s": round(before, 2),
                    f"{n}_sites_after_s": round(after, 2),
                    "ratio": round(after / before, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    if options.json:
        options.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
