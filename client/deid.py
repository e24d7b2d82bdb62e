"""``wardround site deid``: a de-identified copy of a DICOM folder (and its EHR).

Follows the DICOM PS3.15 Annex E *Basic Application Level Confidentiality
Profile*, at every nesting level: the attributes of Table E.1-1 (read from the
table ``dicom-anonymizer`` ships as data, see :data:`PROFILE`) are removed (X),
emptied (Z) or given a dummy (D); where the table offers a choice, wardround
removes or empties (:data:`_CHOSEN`). UIDs are replaced (U) by reproducible
salted pseudonyms under the ``2.25.`` root (an HMAC-SHA256 of the UID, so the
same study gets the same pseudonym in every file and run with the same salt, and
the EHR ``study_uid`` column maps the same way); the PatientID's dummy is a salted
pseudonym too, mapped the same way in the EHR ``patient_id`` column, and a blank
id stays blank on both sides. Private tags, overlays and curves are removed;
every other person name is emptied; ``PatientIdentityRemoved`` and
``DeidentificationMethod(CodeSequence)`` are set. Burned-in annotation (text in
the pixels) cannot be removed here: files that declare it, or that are of a
modality prone to it without declaring, are reported. The folder walk, and the
account of every input file (written, duplicate of another, failed), are in
:mod:`.deid_export`.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from ..common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

METHOD = "DICOM PS3.15 E.1 Basic Application Confidentiality Profile"

#: the PS3.15 release whose Table E.1-1 dicom-anonymizer ships as data (BSD licence)
_TABLE_MODULE = "dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c"
#: dicom-anonymizer's list names -> the Basic Profile action the table writes
_TABLE_LISTS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
#: where the table lets the implementation choose, wardround removes (X) or empties
#: (Z): training needs none of these. Referenced/Source Image Sequences (X/Z/U*)
#: are kept with the profile applied inside, so that a derived image still points
#: at its sources' pseudonymised UIDs.
_CHOSEN = {"Z/D": "Z", "X/Z": "X", "X/D": "X", "X/Z/D": "X", "X/Z/U*": "U*"}
#: free text the table (2026c) does not list but real archives fill with names and
#: findings: a TextValue outside an SR's ContentSequence (protocol context, content
#: item modifiers), frame labels, an issuer's local namespace
_BEYOND_TABLE: dict[int, str] = {
    Tag("TextValue"): "X",
    Tag("ProtocolContextSequence"): "X",
    Tag("ContentItemModifierSequence"): "X",
    Tag("FrameLabel"): "X",
    Tag("IssuerOfAccessionNumberSequence"): "X",
}
#: the file meta keeps only what Part 10 requires (its UIDs replaced): anything else
#: (PrivateInformation, SourceApplicationEntityTitle) names the source
_FILE_META_KEPT = {
    Tag("FileMetaInformationGroupLength"),
    Tag("FileMetaInformationVersion"),
    Tag("MediaStorageSOPClassUID"),
    Tag("MediaStorageSOPInstanceUID"),
    Tag("TransferSyntaxUID"),
    Tag("ImplementationClassUID"),
    Tag("ImplementationVersionName"),
}
#: the EHR join key: pseudonymised (a salted dummy, D) rather than emptied (Z/D)
_PATIENT_ID = Tag("PatientID")

#: a dummy (D) of each VR; text VRs not named get ``_DUMMY_TEXT``
_DUMMY_BY_VR: dict[str, object] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    **dict.fromkeys(("IS", "DS"), "0"),
    **dict.fromkeys(("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"), 0),
    # a multiple of 8 bytes fits every binary VR's word size
    **dict.fromkeys(("OB", "OW", "OF", "OD", "OL", "OV", "UN"), b"\x00" * 8),
}
_DUMMY_TEXT = "ANONYMIZED"


def _load_table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """Table E.1-1's Basic Profile column: exact tags, and masked (``60xx``) ones."""
    try:
        table = importlib.import_module(_TABLE_MODULE)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "the de-identification profile's table (package dicom-anonymizer >= 2.1) "
            "is not installed",
            hint="Install wardround's dependencies: pip install 'dicom-anonymizer>=2.1'.",
        ) from exc
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name, action in _TABLE_LISTS.items():
        for entry in getattr(table, name):
            if len(entry) == 2:
                exact[Tag(*entry)] = action
            else:  # (group, element, group mask, element mask)
                masked.append((*entry, action))
    return exact, masked


#: PS3.15 Table E.1-1, Basic Profile column, by tag: X remove, Z empty, D dummy,
#: U UID pseudonym, and the table's choices (``X/Z`` ...) resolved by ``_CHOSEN``
PROFILE, _MASKED_PROFILE = _load_table()

#: UIDs never pseudonymised (they name classes and syntaxes, not instances)
_KEEP_UIDS = {
    "SOPClassUID",
    "MediaStorageSOPClassUID",
    "TransferSyntaxUID",
    "ReferencedSOPClassUID",
    "ImplementationClassUID",
    "CodingSchemeUID",
    "ContextGroupExtensionCreatorUID",
    "MappingResource",
}


def load_salt(salt: str | None, salt_file: Path | None) -> bytes:
    """The pseudonym salt from ``--salt`` or ``--salt-file`` (at least 16 bytes)."""
    if (salt is None) == (salt_file is None):
        raise ConfigError(
            "give exactly one of --salt and --salt-file",
            hint="Keep the salt secret and the same for every export.",
        )
    if salt is not None:
        value = salt.encode()
    else:
        assert salt_file is not None  # exactly one of the two was given (checked above)
        value = Path(salt_file).read_bytes().strip()
    if len(value) < 16:
        raise ConfigError(
            "the salt is shorter than 16 bytes",
            hint="Use a long random secret, e.g. `openssl rand -hex 32`.",
        )
    return value


def uid_pseudonym(uid: str, salt: bytes) -> str:
    """Reproducible salted pseudonym of a UID: ``2.25.<128-bit integer>``."""
    digest = hmac.new(salt, b"uid\x1f" + str(uid).strip().encode(), hashlib.sha256)
    return f"2.25.{uuid.UUID(bytes=digest.digest()[:16], version=4).int}"


def id_pseudonym(value: str, salt: bytes) -> str:
    """Reproducible salted pseudonym of a patient id (``P`` + 16 hex digits)."""
    digest = hmac.new(salt, b"id\x1f" + str(value).strip().encode(), hashlib.sha256)
    return "P" + digest.hexdigest()[:16]


def is_blank(value: object) -> bool:
    """No id at all: missing, empty or only spaces (DICOM pads values with spaces)."""
    return value is None or not str(value).strip()


def deidentify(ds: Dataset, salt: bytes) -> Dataset:
    """Apply the profile to ``ds`` (every nesting level) in place and return it."""
    ds.remove_private_tags()  # at every level (pydicom walks the sequences)
    _strip(ds, salt)
    ds.preamble = b"\x00" * 128  # copied as read otherwise: any bytes a tool left
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for tag in [t for t in meta.keys() if t not in _FILE_META_KEPT]:
            del meta[tag]
        if not is_blank(meta.get("MediaStorageSOPInstanceUID")):
            meta.MediaStorageSOPInstanceUID = uid_pseudonym(
                meta.MediaStorageSOPInstanceUID, salt
            )
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]
    return ds


def profile_action(tag: int, vr: str) -> str | None:
    """What wardround does to an attribute: X, Z, D, U, U* or None (not listed)."""
    if tag == _PATIENT_ID:
        return "D"
    group, element = tag >> 16, tag & 0xFFFF
    if group & 0xFF00 in (0x5000, 0x6000):  # curves (retired) and overlays: all of it
        return "X"
    action = PROFILE.get(tag) or _BEYOND_TABLE.get(tag)
    if action is None:
        action = next(
            (
                a
                for g, e, gm, em, a in _MASKED_PROFILE
                if (group & gm, element & em) == (g, e)
            ),
            None,
        )
    if action is None and vr == "PN":  # wardround empties every other person name
        return "Z"
    return _CHOSEN.get(action, action) if action else None


def _strip(ds: Dataset, salt: bytes) -> None:
    """The profile on one dataset and, recursively, on its sequences' items."""
    for elem in list(ds):
        action = profile_action(elem.tag, elem.VR)
        if action == "X":
            del ds[elem.tag]
        elif action == "Z" or (action == "D" and _is_empty(elem)):
            # a blank D stays empty: a dummy (a pseudonym) of nothing looks real
            elem.value = [] if elem.VR == "SQ" else ""
        elif action == "D":
            elem.value = _dummy(elem.tag, elem.VR, elem.value, salt)
        elif elem.VR == "SQ":  # U* and unlisted sequences: the profile inside
            for item in elem.value:
                _strip(item, salt)
        elif elem.VR == "UI" and elem.keyword not in _KEEP_UIDS:
            elem.value = _map_uids(elem.value, salt)


def _is_empty(elem: DataElement) -> bool:
    if elem.VR == "SQ" or isinstance(elem.value, bytes):
        return not elem.value
    return all(is_blank(v) for v in _values(elem.value))


def _dummy(tag: int, vr: str, value: object, salt: bytes) -> object:
    """A D action's value: salted pseudonyms for the patient id and UIDs."""
    if tag == _PATIENT_ID:
        return id_pseudonym(str(value), salt)
    if vr == "UI":
        return _map_uids(value, salt)
    if vr == "SQ":
        return [Dataset()]  # one empty item: the sequence stays, its content goes
    return _DUMMY_BY_VR.get(vr, _DUMMY_TEXT)


def _map_uids(value: object, salt: bytes) -> object:
    """Instance UIDs to pseudonyms; well-known UIDs (classes, syntaxes) kept."""
    mapped = [
        v
        if is_blank(v) or UID(str(v)).is_transfer_syntax or UID(str(v)).name != str(v)
        else uid_pseudonym(str(v), salt)
        for v in _values(value)
    ]
    return mapped[0] if len(mapped) == 1 else mapped


def _values(value: object) -> list[object]:
    """An element's values as a list (pydicom gives one value bare, several as a list)."""
    if (
        value is None
        or isinstance(value, (str, bytes))
        or not hasattr(value, "__iter__")
    ):
        return [value]
    return list(value)


@dataclass
class EhrResult:
    """What :func:`deid_ehr` wrote."""

    rows: int
    #: per id column, rows without an id (null, empty or spaces): left null
    missing_ids: dict[str, int]


def deid_ehr(
    src: Path,
    dst: Path,
    salt: bytes,
    *,
    study_column: str = "study_uid",
    patient_column: str | None = "patient_id",
) -> EhrResult:
    """Copy an EHR Parquet table with study UIDs and patient ids pseudonymised.

    A blank id (empty or spaces, as :func:`is_blank` judges the DICOM side's) is
    null in the copy: a pseudonym of nothing would look like a real patient.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    missing: dict[str, int] = {}
    for column, fn in ((study_column, uid_pseudonym), (patient_column, id_pseudonym)):
        if column is None:
            continue
        if column not in table.column_names:
            raise DataError(
                f"EHR table {src} has no column {column!r}",
                hint="Name it with --study-col / --patient-col.",
            )
        values = [
            None if is_blank(v) else fn(str(v), salt)
            for v in table.column(column).cast(pa.string()).to_pylist()
        ]
        missing[column] = sum(v is None for v in values)
        table = table.set_column(
            table.schema.get_field_index(column), column, pa.array(values, pa.string())
        )
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dst)
    return EhrResult(rows=table.num_rows, missing_ids=missing)
