"""Benchmark: one DP-SGD step (Opacus) against a plain step on the default model.

Run from the repository root::

    python bench/dp_step.py [--batch-size 32] [--steps 20] [--warmup 3] [--threads 1]
                            [--modes hooks,ew,functorch,ghost] [--repeats 1]
                            [--json PATH]

(or ``python -m wardround.bench.dp_step`` where ``bench`` is installed as
``wardround.bench``).

The model is ``build_model(RunConfig())``: the LoRA-wrapped fusion model (tiny ViT
and tiny BERT with LoRA on their attention projections, EHR MLP, concat fusion,
multi-label head). Every variant (``plain`` and each Opacus ``grad_sample_mode``)
runs in a fresh subprocess with a fresh model, so hooks never stack and peak memory
belongs to that variant alone:

* time: wall-clock (and process CPU time, less sensitive to other load on a shared
  host) of ``--steps`` optimizer steps (after ``--warmup``) on one fixed synthetic
  batch -- zero_grad, forward, ``BCEWithLogitsLoss``, backward, ``AdamW`` step
  (for DP: Opacus's clip + noise + AdamW). Every DP variant is privatised by the
  sites' own set-up, ``client/dp.py``'s ``private_training`` (a mode it cannot run
  is reported as failing); its patient-sampling loader is only needed by Opacus
  for the sample rate and is not iterated.
* memory: the goal is judged on *step memory*, what the steps add over a baseline
  taken once the model, the batch, the libraries (opacus included, for every
  variant) and the optimizer are set up: about 450 MB of libraries would otherwise
  hide any difference between the variants. Privatising (Opacus's wrappers and the
  patient-sampling loader, once a round) happens before the baseline and is
  reported apart as *set-up MB*. CPU: the resident set before the steps (*baseline*) and its
  high-water mark during warm-up and timed steps (*peak*; Linux's
  ``/proc/self/clear_refs`` resets the mark at the baseline; where it cannot,
  ``ru_maxrss`` stands in and the result says so). CUDA:
  ``torch.cuda.max_memory_allocated`` after a reset (baseline: ``memory_allocated``
  before the steps).
* exactness (DP modes): on a batch of 4, with LoRA B factors set to non-zero values
  (at init they are zero, which makes every LoRA A gradient zero and the check
  vacuous), Opacus's per-sample gradients are compared with a loop of single-example
  backward passes on a plain copy of the model, and their sum with the gradient of
  the summed per-example loss (relative L2 error per tensor, tolerance 1e-5), in
  float64 and with dropout off (see ``check_exact``).
  ``ghost`` keeps no per-sample gradients: its per-sample norms and its clipped sum
  (``max_grad_norm`` 1.0) are compared with the ones computed from the loop instead.

``--config PATH`` measures the model of a run config TOML instead of the default
one (e.g. a large adapter on large encoders).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

GOAL_TIME = 1.1  # issue 16: at most 1.1x a plain step
GOAL_MEMORY = 1.15  # and at most 1.15x its step memory
TOLERANCE = 1e-5
CHECK_BATCH = 4
ALL_MODES = ("hooks", "ew", "functorch", "ghost")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the resident set's high-water mark (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _proc_status_mb("VmHWM") is not None


def _memory_now(device) -> float:
    """MB in use now: the CUDA allocator's, else the resident set."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    return _proc_status_mb("VmRSS") or _maxrss_mb()


def _cpu_memory_start() -> tuple[float, str]:
    """Baseline MB and how the peak will be read (after gc, before the steps)."""
    current = _proc_status_mb("VmRSS")
    if current is not None and _reset_peak_rss():
        return current, "rss-high-water-mark"
    return _maxrss_mb(), "ru_maxrss"


def _cpu_memory_peak(how: str) -> float:
    if how == "rss-high-water-mark":
        return _proc_status_mb("VmHWM") or _maxrss_mb()
    return _maxrss_mb()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


_CONFIG_PATH: Path | None = None
"""``--config``: a run config TOML whose model is measured (default: RunConfig())."""


def _config():
    from wardround.common.config import RunConfig
    from wardround.ops.config_file import load_run_config

    return RunConfig() if _CONFIG_PATH is None else load_run_config(_CONFIG_PATH)


def _fresh_model(device):
    """A fresh (deterministic) default model on ``device``."""
    from wardround.models import build_model

    return build_model(_config()).model.to(device)


def _batch(size: int, seed: int, device) -> tuple[dict, object]:
    """Synthetic inputs of the shapes and dtypes the site dataset produces."""
    import torch

    cfg = _config()
    task, mc = cfg.task, cfg.model
    from wardround.common.text import get_tokenizer

    vocab = len(get_tokenizer(mc.tokenizer))
    gen = torch.Generator().manual_seed(seed)
    length = mc.max_note_tokens
    # Notes of varying length (padded with mask 0), some modalities absent.
    lengths = torch.randint(length // 4, length + 1, (size,), generator=gen)
    note_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    present = (torch.rand(size, 3, generator=gen) > 0.15).float()
    present[:, 1] = 1.0
    batch = {
        "image": torch.rand(
            size, task.image_channels, mc.image_size, mc.image_size, generator=gen
        ),
        "ehr": torch.randn(size, task.ehr_width, generator=gen),
        "note_ids": torch.randint(1, vocab, (size, length), generator=gen) * note_mask,
        "note_mask": note_mask,
        "present": present,
        # about 60 distinct word n-grams per note (0 pads)
        "note_ngrams": torch.randint(
            1, mc.note_ngram_buckets, (size, mc.max_note_ngrams), generator=gen
        )
        * (torch.arange(mc.max_note_ngrams)[None, :] < 60).long(),
    }
    labels = torch.randint(0, 2, (size, len(task.labels)), generator=gen).float()
    return {k: v.to(device) for k, v in batch.items()}, labels.to(device)


def _inputs(batch: dict) -> tuple:
    """Model inputs, positional in the trainer's INPUT_KEYS order.

    Positional, as the trainer calls the model (``client/objectives.forward``):
    Opacus's ``ew`` wrapper has ``forward(self, x, *args, **kwargs)`` and reads the
    batch size from ``x``, so a keyword-only call fails.
    """
    from wardround.client.trainer import INPUT_KEYS

    return tuple(batch.get(k) for k in INPUT_KEYS)


def _loader(size: int, batch_size: int):
    """A DataLoader over a synthetic dict dataset, one study per patient.

    ``private_training`` reads whose each study is (``patients``) to sample patients
    at the site's rate; the timed steps use the fixed batch, not this loader.
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Synthetic(Dataset):
        def __init__(self) -> None:
            self.batch, self.labels = _batch(size, 1, "cpu")
            self.patients = np.arange(size, dtype=np.int64)

        def __len__(self) -> int:
            return size

        def __getitem__(self, i: int) -> dict:
            item = {k: v[i] for k, v in self.batch.items()}
            item["labels"] = self.labels[i]
            return item

    return DataLoader(Synthetic(), batch_size=batch_size, generator=torch.Generator())


def _plain_backward(logits, labels):
    """The batch's mean BCE (the trainer's loss), backpropagated; returns it."""
    from wardround.client.objectives import example_bce

    loss = example_bce(logits, {"labels": labels}).mean()
    loss.backward()
    return loss


@contextmanager
def _make_private(model, mode: str, batch_size: int, max_grad_norm: float):
    """``model`` privatised as a site's round does it; yields (model, optimizer, backward).

    ``backward(logits, labels)`` backpropagates the batch's loss as the trainer does
    in that mode and returns the mean loss.

    Through the product's own set-up (:func:`wardround.client.dp.private_training`:
    the patient-sampling loader, Opacus's ``make_private`` with the site's options,
    the seeded noise generator), so the benchmark measures the DP path sites run,
    and a mode that path cannot run fails here too. Unwrapped on exit.
    """
    import torch

    from wardround.client.dp import DpTraining, clipped_backward, private_training
    from wardround.client.objectives import example_bce
    from wardround.common.config import GradSampleMode

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    dp = DpTraining(
        noise_multiplier=1.0,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=GradSampleMode(mode),
        secure_mode=False,
    )
    loader = _loader(4 * batch_size, batch_size)
    with private_training(model, optimizer, loader, dp, seed=0) as parts:
        if not parts.ghost:
            yield parts.model, parts.optimizer, _plain_backward
            return

        def ghost_backward(logits, labels):
            # the trainer's ghost path: per-example losses, Opacus's two passes
            losses = example_bce(logits, {"labels": labels})
            clipped_backward(parts.model, parts.optimizer, losses)
            return losses.detach().mean()

        yield parts.model, parts.optimizer, ghost_backward


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(mode: str, batch_size: int, steps: int, warmup: int) -> dict:
    """Time and peak memory of ``mode`` ('plain' or a grad_sample_mode), here."""
    import opacus  # noqa: F401  (loaded for every variant: same baseline)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"mode": mode, "device": device.type}
    model = _fresh_model(device)
    model.train()
    batch, labels = _batch(batch_size, 0, device)
    inputs = _inputs(batch)
    gc.collect()
    loaded = _memory_now(device)
    private = ExitStack()  # unwraps the DP model after the timed steps
    try:
        if mode == "plain":
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
            backward = _plain_backward
        else:
            model, optimizer, backward = private.enter_context(
                _make_private(model, mode, batch_size, 1.0)
            )
        # the set-up (Opacus's wrappers and loader, once a round) is reported apart
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            memory_how = "cuda-allocator"
        else:
            base, memory_how = _cpu_memory_start()
        times, cpu_times = [], []
        for i in range(warmup + steps):
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            optimizer.zero_grad(set_to_none=True)
            loss = backward(model(*inputs), labels)
            optimizer.step()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    except Exception as exc:  # noqa: BLE001  (a failing mode is a result)
        result["error"] = _first_line(exc)
        return result
    finally:
        private.close()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _cpu_memory_peak(memory_how)
    result.update(
        median_s=statistics.median(times),
        mean_s=statistics.fmean(times),
        min_s=min(times),
        cpu_median_s=statistics.median(cpu_times),
        setup_mb=base - loaded,
        baseline_mb=base,
        peak_mb=peak,
        increment_mb=peak - base,
        memory_measure=memory_how,
        loss=float(loss.detach()) if hasattr(loss, "detach") else float("nan"),
    )
    if mode != "plain":
        del model, optimizer
        gc.collect()
        try:
            result.update(check_exact(mode, device))
        except Exception as exc:  # noqa: BLE001
            result["exact"] = False
            result["exact_error"] = _first_line(exc)
    return result


def _perturb_lora_b(model) -> None:
    import torch

    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen).to(p))


def _without_dropout(model) -> None:
    """Dropout off, Opacus's hooks on.

    Training mode for the modules with trainable tensors of their own (Opacus hooks
    only those in training mode), evaluation mode elsewhere: a real encoder's config
    has dropout, and the per-example loop and the batched pass must compute the same
    function.
    """
    model.train()
    for module in model.modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            module.training = False


def _rel(a, b) -> float:
    scale = float(b.norm())
    diff = float((a - b).norm())
    return diff / scale if scale > 0 else diff


def _dense_sample(grad_sample):
    """Per-example gradients as one tensor [B, *shape], also where kept as rows."""
    from wardround.client.dp_rows import RowGrads

    return grad_sample.dense() if isinstance(grad_sample, RowGrads) else grad_sample


def _float64(batch: dict, labels) -> tuple[dict, object]:
    return {
        k: v.double() if v.is_floating_point() else v for k, v in batch.items()
    }, labels.double()


def check_exact(mode: str, device) -> dict:
    """Compare Opacus's per-sample gradients of ``mode`` with a per-example loop.

    In float64: the loop's single-example passes and the batched pass round
    differently, and a deep encoder's near-zero gradients (late attention layers of
    a random BERT-Large) turn float32's rounding into relative errors of 0.5, which
    float64 brings to 1e-8. What is checked is Opacus's arithmetic, not rounding.
    """
    import torch

    from wardround.client.dp import GHOST_CLIP_MARGIN

    batch, labels = _float64(*_batch(CHECK_BATCH, 7, device))
    inputs = _inputs(batch)
    bce = torch.nn.BCEWithLogitsLoss(reduction="none")

    ref = _fresh_model(device).double()
    _perturb_lora_b(ref)
    _without_dropout(ref)
    trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    names, tensors = list(trainable), list(trainable.values())
    per_sample = {n: [] for n in names}
    for i in range(CHECK_BATCH):
        one = tuple(None if x is None else x[i : i + 1] for x in inputs)
        loss = bce(ref(*one), labels[i : i + 1]).mean()
        for n, g in zip(names, torch.autograd.grad(loss, tensors), strict=True):
            per_sample[n].append(g)
    per_sample = {n: torch.stack(g) for n, g in per_sample.items()}
    summed = bce(ref(*inputs), labels).mean(1).sum()
    ref_sum = dict(zip(names, torch.autograd.grad(summed, tensors), strict=True))
    norms = torch.sqrt(
        sum(g.flatten(1).pow(2).sum(1) for g in per_sample.values())
    )  # [B]
    max_norm = 1.0
    # ghost clips a margin below max_norm (client/dp.py's GHOST_CLIP_MARGIN)
    clip = max_norm * (1 - GHOST_CLIP_MARGIN) if mode == "ghost" else max_norm
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    ref_clipped = {
        n: (g * coef.view(-1, *[1] * (g.dim() - 1))).sum(0)
        for n, g in per_sample.items()
    }

    model = _fresh_model(device).double()
    _perturb_lora_b(model)
    model.train()  # Opacus refuses to privatise a model in evaluation mode
    with _make_private(model, mode, CHECK_BATCH, max_norm) as private:
        model, optimizer, backward = private
        _without_dropout(model)
        optimizer.zero_grad(set_to_none=True)
        backward(model(*inputs), labels)
        dp_params = {
            n.removeprefix("_module."): p
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        out: dict = {"ref_sample_norms": [round(float(x), 4) for x in norms]}
        if mode == "ghost":
            dp_norms = model.get_norm_sample().detach()
            out["norm_err"] = _rel(dp_norms, norms)
            # p.grad after the second backward pass is the clipped sum (no noise yet).
            out["clipped_sum_err"] = max(
                _rel(dp_params[n].grad, ref_clipped[n]) for n in names
            )
            out["exact"] = max(out["norm_err"], out["clipped_sum_err"]) <= TOLERANCE
            return out
        # the n-gram table's per-example gradients are kept as rows (client/dp_rows)
        dp_samples = {n: _dense_sample(dp_params[n].grad_sample) for n in names}
        out["per_sample_err"] = max(_rel(dp_samples[n], per_sample[n]) for n in names)
        out["sum_err"] = max(_rel(dp_samples[n].sum(0), ref_sum[n]) for n in names)
        optimizer.clip_and_accumulate()
        out["clipped_sum_err"] = max(
            _rel(dp_params[n].summed_grad, ref_clipped[n]) for n in names
        )
        out["exact"] = (
            max(out["per_sample_err"], out["sum_err"], out["clipped_sum_err"])
            <= TOLERANCE
        )
        return out


def keyword_call_error(mode: str) -> str | None:
    """Whether ``mode`` accepts the trainer's keyword-argument forward call."""
    import torch

    model = _fresh_model(torch.device("cpu"))
    batch, _ = _batch(CHECK_BATCH, 0, "cpu")
    from wardround.client.trainer import INPUT_KEYS

    with _make_private(model, mode, CHECK_BATCH, 1.0) as (private, _, _):
        try:
            private(**{k: batch[k] for k in INPUT_KEYS if k in batch})
        except Exception as exc:  # noqa: BLE001
            return _first_line(exc)
    return None


def _run(mode: str, opts: argparse.Namespace) -> dict:
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--single",
        mode,
        "--batch-size",
        str(opts.batch_size),
        "--steps",
        str(opts.steps),
        "--warmup",
        str(opts.warmup),
        "--threads",
        str(opts.threads),
        *(["--config", str(opts.config)] if opts.config else []),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"mode": mode, "error": f"subprocess exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _best(runs: list[dict]) -> dict:
    """The run with the lowest median wall time (others' load only adds time)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    best = dict(min(ok, key=lambda r: r["median_s"]))
    best["medians_s"] = [r["median_s"] for r in ok]
    best["peaks_mb"] = [r["peak_mb"] for r in ok]
    return best


def _machine() -> dict:
    import opacus
    import peft
    import torch
    import transformers

    info = {
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg()[0],
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def main() -> None:
    """Measure every variant in its own subprocess and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default=",".join(ALL_MODES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a run config TOML: measure its model (default: the default model)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every variant this many times (round robin); report the run "
        "with the lowest median",
    )
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()

    import torch

    global _CONFIG_PATH
    _CONFIG_PATH = opts.config
    torch.set_num_threads(opts.threads)
    if opts.single:
        result = measure(opts.single, opts.batch_size, opts.steps, opts.warmup)
        if opts.single == "ew" and "error" not in result:
            result["keyword_call_error"] = keyword_call_error("ew")
        print(json.dumps(result))
        return

    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    machine = _machine()
    print(
        f"machine: {machine['cpus']} CPU(s) ({machine['cpu']}), "
        f"torch threads {machine['threads']}, "
        f"GPU {machine['cuda'] or 'none'}, load average "
        f"{machine['load_average']:.2f}; Python {machine['python']}, "
        f"torch {machine['torch']}, opacus {machine['opacus']}, "
        f"peft {machine['peft']}, transformers {machine['transformers']}"
    )
    print(
        f"batch {opts.batch_size}, {opts.steps} timed steps after {opts.warmup} "
        f"warm-up, each variant in a fresh subprocess, best of {opts.repeats} "
        f"repeat(s)"
    )
    runs: dict[str, list[dict]] = {m: [] for m in ["plain", *modes]}
    for _ in range(opts.repeats):
        for mode in runs:  # round robin: a slow spell on a shared host hits all
            runs[mode].append(_run(mode, opts))
    results = {m: _best(r) for m, r in runs.items()}
    plain = results["plain"]
    if "error" in plain:
        raise SystemExit(f"plain step failed: {plain['error']}")
    mem = "GPU MB" if plain.get("device") == "cuda" else "RSS MB"
    print()
    print(
        f"{'mode':10s} {'median s':>9s} {'mean s':>8s} {'x time':>7s} "
        f"{'cpu s':>7s} {'x cpu':>6s} {'peak ' + mem:>13s} {'x mem':>6s} "
        f"{'step MB':>7s} {'x step':>6s} {'set-up MB':>9s} "
        f"{'exact':>6s}  goal"
    )
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:10s} FAILED: {r['error']}")
            r["goal"] = "MISS"
            continue
        r["time_ratio"] = r["median_s"] / plain["median_s"]
        r["cpu_ratio"] = r["cpu_median_s"] / plain["cpu_median_s"]
        r["memory_ratio"] = r["peak_mb"] / plain["peak_mb"]
        r["increment_ratio"] = (
            r["increment_mb"] / plain["increment_mb"]
            if plain["increment_mb"] > 0
            else float("inf")
        )
        exact = "-" if mode == "plain" else ("yes" if r.get("exact") else "no")
        if mode != "plain":
            # step memory, not the process's (its libraries are the same for all)
            ok = r["time_ratio"] <= GOAL_TIME and r["increment_ratio"] <= GOAL_MEMORY
            r["goal"] = "PASS" if ok else "MISS"
        print(
            f"{mode:10s} {r['median_s']:9.4f} {r['mean_s']:8.4f} "
            f"{r['time_ratio']:7.2f} {r['cpu_median_s']:7.4f} {r['cpu_ratio']:6.2f} "
            f"{r['peak_mb']:13.1f} {r['memory_ratio']:6.2f} "
            f"{r['increment_mb']:7.1f} {r['increment_ratio']:6.2f} "
            f"{r.get('setup_mb', float('nan')):9.1f} {exact:>6s}  "
            f"{r.get('goal', '')}"
        )
    print()
    print(
        f"goal: <= {GOAL_TIME}x time, <= {GOAL_MEMORY}x step memory at batch "
        f"{opts.batch_size} (ratios of the median step time and of the step "
        f"memory, step MB: peak over the baseline once set up, to plain's; set-up "
        f"MB: what building the optimizer (and privatising) added; memory read by "
        f"{plain.get('memory_measure', '?')})"
    )
    for mode in modes:
        r = results[mode]
        if "error" in r:
            print(f"  {mode}: MISS (failed)")
            continue
        detail = ", ".join(
            f"{k} {r[k]:.1e}"
            for k in ("per_sample_err", "sum_err", "norm_err", "clipped_sum_err")
            if k in r
        )
        if "exact_error" in r:
            detail = r["exact_error"]
        print(
            f"  {mode}: {r['goal']} ({r['time_ratio']:.2f}x time, "
            f"{r['increment_ratio']:.2f}x step memory); per-sample grads exact: "
            f"{'yes' if r.get('exact') else 'no'} ({detail})"
        )
        if r.get("keyword_call_error"):
            print(
                "    note: a keyword-argument call fails (the trainer calls "
                f"positionally): {r['keyword_call_error']}"
            )
    candidates = [
        m
        for m in modes
        if "error" not in results[m]
        and results[m].get("exact")
        and results[m]["increment_ratio"] <= GOAL_MEMORY
    ]
    best = min(candidates, key=lambda m: results[m]["median_s"], default=None)
    print(f"recommended grad_sample_mode: {best or 'none (no exact mode within goal)'}")
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "options": {
                        k: v for k, v in vars(opts).items() if k not in ("json",)
                    },
                    "results": results,
                    "recommended": best,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
