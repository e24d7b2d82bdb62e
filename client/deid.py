"""``wardround site deid``: a de-identified copy of a DICOM folder (and its EHR).

Follows the DICOM PS3.15 Annex E *Basic Application Level Confidentiality
Profile*: attributes of the profile's list are removed (X), emptied (Z) or given
a dummy (D); UIDs are replaced (U) by reproducible salted pseudonyms under the
``2.25.`` root (an HMAC-SHA256 of the UID, so the same study gets the same
pseudonym in every file and run with the same salt, and the EHR ``study_uid``
column maps the same way); private tags, overlays and curves are removed; every
other person name is emptied; ``PatientIdentityRemoved`` and
``DeidentificationMethod(CodeSequence)`` are set. Burned-in annotation (text in
the pixels) cannot be removed here: files that declare it, or that are of a
modality prone to it without declaring, are reported. The folder walk, and the
account of every input file (written, duplicate of another, failed), are in
:mod:`.deid_export`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from ..common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

METHOD = "DICOM PS3.15 E.1 Basic Application Confidentiality Profile"

#: PS3.15 Table E.1-1, Basic Profile column, by keyword: X remove, Z empty, D dummy
PROFILE: dict[str, str] = {
    **dict.fromkeys(
        (
            "AccessionNumber",
            "ContentDate",
            "ContentTime",
            "PatientBirthDate",
            "PatientName",
            "PatientSex",
            "ReferringPhysicianName",
            "StudyDate",
            "StudyTime",
            "StudyID",
            "ContentCreatorName",
            "FillerOrderNumberImagingServiceRequest",
            "PlacerOrderNumberImagingServiceRequest",
            "VerifyingObserverName",
            "ContrastBolusAgent",
            "RequestedProcedureID",
        ),
        "Z",
    ),
    "PatientID": "D",
    **dict.fromkeys(
        (
            "AcquisitionComments",
            "AcquisitionDate",
            "AcquisitionDateTime",
            "AcquisitionTime",
            "ActualHumanPerformersSequence",
            "AdditionalPatientHistory",
            "AdmissionID",
            "AdmittingDate",
            "AdmittingDiagnosesCodeSequence",
            "AdmittingDiagnosesDescription",
            "AdmittingTime",
            "Allergies",
            "Arbitrary",
            "AuthorObserverSequence",
            "BranchOfService",
            "ConsultingPhysicianName",
            "CountryOfResidence",
            "CurrentPatientLocation",
            "CustodialOrganizationSequence",
            "DerivationDescription",
            "DeviceSerialNumber",
            "DigitalSignaturesSequence",
            "EthnicGroup",
            "FrameComments",
            "ImageComments",
            "InstanceCreationDate",
            "InstanceCreationTime",
            "InstitutionAddress",
            "InstitutionName",
            "InstitutionalDepartmentName",
            "IssuerOfPatientID",
            "MedicalAlerts",
            "MedicalRecordLocator",
            "MilitaryRank",
            "ModifiedAttributesSequence",
            "NameOfPhysiciansReadingStudy",
            "Occupation",
            "OperatorsName",
            "OrderCallbackPhoneNumber",
            "OriginalAttributesSequence",
            "OtherPatientIDs",
            "OtherPatientIDsSequence",
            "OtherPatientNames",
            "PatientAddress",
            "PatientAge",
            "PatientBirthName",
            "PatientBirthTime",
            "PatientComments",
            "PatientInsurancePlanCodeSequence",
            "PatientMotherBirthName",
            "PatientPrimaryLanguageCodeSequence",
            "PatientReligiousPreference",
            "PatientSize",
            "PatientState",
            "PatientTelephoneNumbers",
            "PatientWeight",
            "PerformedProcedureStepDescription",
            "PerformedProcedureStepEndDate",
            "PerformedProcedureStepEndTime",
            "PerformedProcedureStepID",
            "PerformedProcedureStepStartDate",
            "PerformedProcedureStepStartTime",
            "PerformingPhysicianName",
            "PerformingPhysicianIdentificationSequence",
            "PhysiciansOfRecord",
            "PhysiciansReadingStudyIdentificationSequence",
            "PregnancyStatus",
            "ProtocolName",
            "ReasonForStudy",
            "ReferencedPatientSequence",
            "ReferencedStudySequence",
            "ReferringPhysicianAddress",
            "ReferringPhysicianTelephoneNumbers",
            "RequestAttributesSequence",
            "RequestedProcedureDescription",
            "RequestingPhysician",
            "RequestingService",
            "ResponsibleOrganization",
            "ResponsiblePerson",
            "ScheduledProcedureStepDescription",
            "ScheduledProcedureStepID",
            "SeriesDate",
            "SeriesDescription",
            "SeriesTime",
            "SmokingStatus",
            "SpecialNeeds",
            "StationName",
            "StudyDescription",
            "TextComments",
            "TextString",
            "VisitComments",
            "PersonName",
            "PersonAddress",
            "PersonTelephoneNumbers",
            "InterpretationRecorder",
            "InterpretationTranscriber",
            "InterpretationAuthor",
            "ResultsComments",
            "CommentsOnThePerformedProcedureStep",
            "ScheduledPerformingPhysicianName",
            "IssuerOfAdmissionID",
            "ServiceEpisodeID",
            "ServiceEpisodeDescription",
            "PatientTransportArrangements",
            "RequestedContrastAgent",
            "PreMedication",
            "ImagePresentationComments",
            "DetectorID",
            "GantryID",
            "PlateID",
            "CassetteID",
            "GeneratorID",
        ),
        "X",
    ),
}

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


def deidentify(ds: Dataset, salt: bytes) -> Dataset:
    """Apply the profile to ``ds`` in place and return it."""
    patient_id = str(ds.get("PatientID", "") or "")
    ds.remove_private_tags()
    _strip(ds, salt)
    if "PatientID" in ds or patient_id:
        ds.PatientID = id_pseudonym(patient_id, salt) if patient_id else ""
    for group in range(0x5000, 0x5020, 2):  # curves (retired) and overlays
        for elem in [e.tag for e in ds if e.tag.group in (group, group + 0x1000)]:
            del ds[elem]
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
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


def _strip(ds: Dataset, salt: bytes) -> None:
    for elem in list(ds):
        keyword = elem.keyword
        action = PROFILE.get(keyword)
        if action == "X":
            del ds[elem.tag]
        elif action == "Z" or (action is None and elem.VR == "PN"):
            elem.value = [] if elem.VR == "SQ" else ""
        elif elem.VR == "SQ":
            for item in elem.value:
                _strip(item, salt)
        elif elem.VR == "UI" and keyword not in _KEEP_UIDS and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            mapped = [
                v
                if UID(str(v)).is_transfer_syntax or UID(str(v)).name != str(v)
                else uid_pseudonym(str(v), salt)
                for v in values
            ]
            elem.value = mapped if elem.VM > 1 else mapped[0]


def deid_ehr(
    src: Path,
    dst: Path,
    salt: bytes,
    *,
    study_column: str = "study_uid",
    patient_column: str | None = "patient_id",
) -> int:
    """Copy an EHR Parquet table with study UIDs and patient ids pseudonymised."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    for column, fn in ((study_column, uid_pseudonym), (patient_column, id_pseudonym)):
        if column is None:
            continue
        if column not in table.column_names:
            raise DataError(
                f"EHR table {src} has no column {column!r}",
                hint="Name it with --study-col / --patient-col.",
            )
        values = [
            None if v is None else fn(str(v), salt)
            for v in table.column(column).cast(pa.string()).to_pylist()
        ]
        table = table.set_column(
            table.schema.get_field_index(column), column, pa.array(values, pa.string())
        )
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dst)
    return table.num_rows
