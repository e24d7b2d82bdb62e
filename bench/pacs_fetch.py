"""Benchmark: studies per second fetched from a local PACS vs indexed from disk.

Run from the repository root (needs ``apt-get install orthanc orthanc-dicomweb``)::

    python bench/pacs_fetch.py [--patients 100] [--instances 1] [--dir /tmp/wr-pacs]

One synthetic hospital (``--patients`` studies of ``--instances`` instances each)
is uploaded to a real Orthanc on 127.0.0.1 (the tests' server,
``tests/servers/orthanc_server.py``). Then, each into a fresh cache: indexing the
folder from disk (:func:`index_dicom`, one worker), a DICOMweb sync (QIDO-RS +
WADO-RS), a DIMSE C-GET sync and a C-MOVE sync, each cold (nothing cached) and the
DICOMweb and C-GET ones again warm (everything cached: only the queries). DIMSE is
measured with Orthanc's own setting (Nagle on: its replies wait for our delayed
ACK) and with ``TCP_NODELAY`` (as most PACS are tuned). Loopback only: a hospital
network adds its latency to every request. No timing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def _orthanc_module() -> ModuleType:
    """The tests' Orthanc helpers, loaded from their file (no sys.path change)."""
    path = ROOT / "tests" / "servers" / "orthanc_server.py"
    spec = importlib.util.spec_from_file_location("orthanc_server", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_hospital(folder: Path, patients: int, instances: int) -> Path:
    """Write the synthetic hospital; ``instances`` > 1 adds copies to each series."""
    import pydicom
    from pydicom.uid import generate_uid

    from wardround.synthetic.hospitals import synthesize_federation

    shutil.rmtree(folder, ignore_errors=True)
    (site_toml,) = synthesize_federation(folder, 1, patients_per_site=patients, seed=0)
    dicom = site_toml.parent / "dicom"
    for path in sorted(dicom.rglob("*.dcm")):
        for i in range(1, instances):
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            ds.save_as(path.with_name(f"{i + 1}.dcm"), enforce_file_format=True)
    return dicom


def _timed(step: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = step()
    return result, time.perf_counter() - start


def main() -> None:
    """Start Orthanc, load it, time every read path, print a table, stop Orthanc."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--instances", type=int, default=1, help="per study")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/wardround-bench-pacs"))
    opts = parser.parse_args()

    from wardround.sitedata.dicom_index import index_dicom
    from wardround.sitedata.pacs import sync_pacs
    from wardround.sitedata.pacs_config import PacsSection

    orthanc = _orthanc_module()
    if not orthanc.orthanc_installed():
        raise SystemExit(f"Orthanc is needed: {orthanc.INSTALL_HINT}")
    root = opts.dir
    dicom = make_hospital(root / "hospital", opts.patients, opts.instances)
    files = sorted(dicom.rglob("*.dcm"))
    mb = sum(p.stat().st_size for p in files) / 1e6
    rows: list[tuple[str, int, int, float, float]] = []

    def cache(name: str) -> Path:
        path = root / "caches" / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    table, seconds = _timed(lambda: index_dicom([dicom], cache("disk"), workers=1))
    uids = sorted(set(table.column("study_uid").to_pylist()))
    studies = len(uids)
    rows.append(("index the folder from disk", studies, len(files), seconds, mb))

    shutil.rmtree(root / "orthanc", ignore_errors=True)
    for nodelay in (False, True):
        server = orthanc.start_orthanc(root / "orthanc", nodelay=nodelay)
        try:
            if not nodelay:
                orthanc.upload_folder(server, dicom)
            secret = root / "pacs-password"
            secret.write_text(server.password)
            secret.chmod(0o600)
            dimse = {
                "protocol": "dimse",
                "host": "127.0.0.1",
                "port": server.dicom_port,
                "called-ae": server.aet,
            }
            sections = {
                "C-GET": PacsSection.model_validate(dimse),
                "C-MOVE": PacsSection.model_validate(
                    {**dimse, "retrieve": "c-move", "move-port": server.move_port}
                ),
            }
            pacs_tag = "PACS TCP_NODELAY" if nodelay else "PACS Nagle (Orthanc default)"
            if not nodelay:
                sections = {
                    "DICOMweb": PacsSection.model_validate(
                        {
                            "protocol": "dicomweb",
                            "url": server.dicomweb_url,
                            "username": server.username,
                            "password-file": str(secret),
                        }
                    ),
                    **sections,
                }
            for name, section in sections.items():
                where = cache(f"{name}-{nodelay}")
                for state in ("cold", "warm"):
                    if state == "warm" and name == "C-MOVE":
                        continue  # warm is queries only: the same as C-GET's
                    report, seconds = _timed(
                        lambda s=section, w=where: sync_pacs(s, root, uids, w)
                    )
                    fetched_mb = report.bytes_fetched / 1e6
                    label = f"{name} sync, {state}"
                    if name != "DICOMweb":
                        label += f" ({pacs_tag})"
                    rows.append(
                        (
                            label,
                            report.requested,
                            report.instances_fetched,
                            seconds,
                            fetched_mb,
                        )
                    )
        finally:
            orthanc.stop_orthanc(server)

    print(
        f"{opts.patients} studies x {opts.instances} instance(s), "
        f"{mb:.1f} MB, one Orthanc 1.10 on 127.0.0.1"
    )
    print(
        f"{'step':58s} {'studies':>7s} {'files':>7s} {'seconds':>8s} "
        f"{'studies/s':>9s} {'MB/s':>7s}"
    )
    for label, n_studies, n_instances, secs, size in rows:
        print(
            f"{label:58s} {n_studies:7d} {n_instances:7d} {secs:8.2f} "
            f"{n_studies / secs:9.1f} {size / secs:7.1f}"
        )


if __name__ == "__main__":
    main()
