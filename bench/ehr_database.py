"""Benchmark: EHR rows per second from PostgreSQL (ADBC) against the same Parquet table.

Run from the repository root (PostgreSQL from Debian's packages)::

    python bench/ehr_database.py [--rows 1000000] [--dir /tmp/wr-bench]

Writes the table once (``bench/data_ingest.py``'s generator), starts a
PostgreSQL on 127.0.0.1 (the tests' fixture code), loads the table, then
measures each path in a fresh subprocess, so that peak memory (``ru_maxrss``)
belongs to that path alone: the declared columns streamed in batches (read), and
streamed and encoded (what ``site check`` and training do). The server is
stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests" / "servers")]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _source(kind: str, target: str, password: str):  # noqa: ANN202
    from wardround.sitedata.ehr_database_config import EhrDatabaseSection
    from wardround.sitedata.ehr_source import ParquetEhr
    from wardround.sitedata.ehr_sql import DatabaseEhr
    from wardround.sitedata.site_config import EhrSchema

    if kind == "parquet":
        return ParquetEhr(Path(target))
    folder = Path(tempfile.mkdtemp())
    secret = folder / "pw"
    secret.write_text(password)
    secret.chmod(0o600)
    section = EhrDatabaseSection(
        url=target, table="bench_ehr", password_file=str(secret)
    )
    return DatabaseEhr(section, folder, EhrSchema(note=None))


def step(kind: str, mode: str, target: str, password: str) -> dict:
    """One measurement in this process."""
    from wardround.common.config import TaskConfig
    from wardround.sitedata.ehr import iter_ehr, read_encoded_ehr
    from wardround.sitedata.site_config import EhrSchema

    source = _source(kind, target, password)
    task, schema = TaskConfig(), EhrSchema(note=None)
    start = time.perf_counter()
    if mode == "read":
        rows = sum(b.num_rows for b in iter_ehr(source, task, schema))
    else:
        rows = len(read_encoded_ehr(source, task, schema).features)
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "peak_mb": _peak_mb()}


def _run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--step", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Write, load, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/wr-bench"))
    parser.add_argument("--step", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(*args.step)))
        return

    import adbc_driver_postgresql.dbapi as postgresql
    import pyarrow.parquet as pq
    from data_ingest import write_ehr
    from postgres_server import READER, start_postgres, stop_postgres

    from wardround.sitedata.secrets import url_with_password

    args.dir.mkdir(parents=True, exist_ok=True)
    parquet = args.dir / f"ehr-{args.rows}.parquet"
    write_ehr(parquet, args.rows)
    root = Path(tempfile.mkdtemp(prefix="wr-postgres-"))
    server, process = start_postgres(root / "server")
    try:
        start = time.perf_counter()
        with (
            postgresql.connect(
                url_with_password(server.url("admin"), server.admin_password)
            ) as connection,
            connection.cursor() as cursor,
        ):
            cursor.adbc_ingest("bench_ehr", pq.read_table(parquet), mode="create")
            cursor.execute(f"GRANT SELECT ON bench_ehr TO {READER}")
            connection.commit()
        load_s = time.perf_counter() - start
        results = {}
        for kind, target in (("parquet", str(parquet)), ("postgres", server.url())):
            for mode in ("read", "encode"):
                results[kind, mode] = _run(kind, mode, target, server.reader_password)
    finally:
        stop_postgres(process)
        import shutil

        shutil.rmtree(root, ignore_errors=True)

    print(
        f"{args.rows:,} rows, {len(TaskColumns)} declared columns; loaded into PostgreSQL in {load_s:.1f} s"
    )
    print("| source | step | rows/s | seconds | peak RSS MiB |")
    print("|---|---|---:|---:|---:|")
    for (kind, mode), r in results.items():
        assert r["rows"] == args.rows, (kind, mode, r)
        print(
            f"| {kind} | {mode} | {r['rows'] / r['seconds']:,.0f} | "
            f"{r['seconds']:.2f} | {r['peak_mb']:.0f} |"
        )
    for mode in ("read", "encode"):
        ratio = (
            results["postgres", mode]["seconds"] / results["parquet", mode]["seconds"]
        )
        print(f"{mode}: PostgreSQL takes {ratio:.2f}x the Parquet time")


TaskColumns = (
    "patient_id", "study_uid", "age", "temperature", "heart_rate", "spo2", "wbc",
    "crp", "bnp", "sex", "nodule", "effusion", "pneumonia", "cardiomegaly",
)  # fmt: skip


if __name__ == "__main__":
    main()
