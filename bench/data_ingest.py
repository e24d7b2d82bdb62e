"""Benchmark: DICOM indexing (files/s, peak memory) and EHR encoding (rows/s).

Run from the repository root::

    python bench/data_ingest.py [--files 20000] [--rows 1000000] [--dir /tmp/wr-bench]

Writes synthetic files once (kept in ``--dir``), then measures each step in a
fresh subprocess so that peak memory (``ru_maxrss`` of the process and of its
worker processes) belongs to that step alone. Indexing is measured at a quarter
and at the full file count, cold (no cache) and warm (cache, nothing changed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def write_dicom(folder: Path, n: int) -> None:
    """Write ``n`` small CT files (64x64, 16 bit) in 100-file folders."""
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file

    done = sum(1 for _ in folder.rglob("*.dcm")) if folder.is_dir() else 0
    if done >= n:
        return
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(0)
    for i in range(done, n):
        ds = template.copy()
        ds.StudyInstanceUID = f"2.25.{10**20 + i // 50}"
        ds.SeriesInstanceUID = f"2.25.{2 * 10**20 + i // 50}"
        ds.SOPInstanceUID = f"2.25.{3 * 10**20 + i}"
        ds.InstanceNumber = i % 50
        ds.PixelData = rng.integers(0, 2000, (64, 64), dtype=np.int16).tobytes()
        ds.Rows = ds.Columns = 64
        sub = folder / f"{i // 100:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        ds.save_as(sub / f"{i:06d}.dcm")


def write_ehr(path: Path, rows: int) -> None:
    """Write a ``rows``-row EHR table with the default task's columns."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_file() and pq.read_metadata(path).num_rows == rows:
        return
    rng = np.random.default_rng(0)

    def num(mean, std):
        values = rng.normal(mean, std, rows)
        values[rng.random(rows) < 0.1] = np.nan
        return pa.array(values, from_pandas=True)

    table = pa.table(
        {
            "patient_id": pa.array([f"p{i}" for i in range(rows)]),
            "study_uid": pa.array([f"2.25.{i}" for i in range(rows)]),
            "age": num(60, 15),
            "temperature": num(37.2, 0.8),
            "heart_rate": num(85, 15),
            "spo2": num(95, 3),
            "wbc": num(9, 3.5),
            "crp": num(30, 40),
            "bnp": num(300, 400),
            "sex": pa.array(rng.choice(["F", "M", "X"], rows)),
            **{
                k: pa.array(rng.integers(0, 2, rows))
                for k in ("nodule", "effusion", "pneumonia", "cardiomegaly")
            },
        }
    )
    pq.write_table(table, path, row_group_size=131_072)


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def step_index(folder: str, cache: str, workers: int) -> dict:
    """One indexing run (in this process); returns timing and peak memory."""
    from wardround.sitedata.dicom_index import index_dicom

    base = _peak_mb()
    start = time.perf_counter()
    table = index_dicom([Path(folder)], Path(cache), workers=workers)
    seconds = time.perf_counter() - start
    return {
        "files": table.num_rows,
        "seconds": seconds,
        "files_per_s": table.num_rows / seconds,
        "peak_mb": _peak_mb(),
        "baseline_mb": base,
    }


def step_ehr(path: str) -> dict:
    """Stream and encode the EHR table (in this process)."""
    from wardround.common.config import TaskConfig
    from wardround.sitedata.ehr import read_encoded_ehr
    from wardround.sitedata.site_config import EhrSchema

    base = _peak_mb()
    start = time.perf_counter()
    enc = read_encoded_ehr(Path(path), TaskConfig(), EhrSchema(note=None))
    seconds = time.perf_counter() - start
    rows = len(enc.features)
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "peak_mb": _peak_mb(),
        "baseline_mb": base,
    }


def _run(step: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--step", step, *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Prepare data, run every measurement in a subprocess, print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/wardround-bench"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--step", default=None)
    parser.add_argument("args", nargs="*")
    opts = parser.parse_args()
    if opts.step == "index":
        print(json.dumps(step_index(opts.args[0], opts.args[1], int(opts.args[2]))))
        return
    if opts.step == "ehr":
        print(json.dumps(step_ehr(opts.args[0])))
        return
    root = opts.dir
    quarter = opts.files // 4
    write_dicom(root / "dicom-small", quarter)
    write_dicom(root / "dicom", opts.files)
    write_ehr(root / "ehr.parquet", opts.rows)
    rows = []
    for label, folder, n in (
        ("quarter", "dicom-small", quarter),
        ("full", "dicom", opts.files),
    ):
        for workers in sorted({1, opts.workers}):
            cache = root / f"cache-{label}-{workers}"
            for stale in cache.glob("*"):
                stale.unlink()
            subprocess.run(["sync"], check=False)
            cold = _run("index", str(root / folder), str(cache), str(workers))
            warm = _run("index", str(root / folder), str(cache), str(workers))
            rows.append((f"index {n} files, {workers} worker(s), cold", cold))
            rows.append((f"index {n} files, {workers} worker(s), warm", warm))
    rows.append(
        (
            f"EHR {opts.rows} rows, stream + encode",
            _run("ehr", str(root / "ehr.parquet")),
        )
    )
    print(f"{'step':48s} {'count':>9s} {'seconds':>8s} {'per s':>10s} {'peak MB':>8s}")
    for name, r in rows:
        count = r.get("files", r.get("rows"))
        rate = r.get("files_per_s", r.get("rows_per_s"))
        print(
            f"{name:48s} {count:9d} {r['seconds']:8.2f} {rate:10.0f} {r['peak_mb']:8.0f}"
        )


if __name__ == "__main__":
    main()
