"""De-identification of a DICOM dataset by the Basic Application Level Confidentiality Profile
of DICOM PS3.15 Annex E (Table E.1-1, "Basic Prof." column): `DEIDENTIFY_ACTIONS` below is
that table's action for each attribute that can identify a patient, a clinician or an
institution (D: replace with a dummy value, Z: empty, X: remove, U: replace the UID by a
consistent new one). Beyond the table, and stricter than it: every private attribute,
overlay and curve group, every remaining person name (VR PN) and every remaining UID that is
not a UID of the standard is removed or replaced, in nested sequences too. The per-site
pseudonymous patient key (`patient_key`) is here as well, as it is taken from the
identifiers just before they go. :mod:`webapp.dicom` applies all of this to every upload
before anything else reads the file, and re-exports these names.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

#: The value written into PatientName and PatientID (action Z keeps the attribute, empty).
DEIDENTIFICATION_METHOD = "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile (breast-review)"

# ----------------------------------------------------------------------------------------
# PS3.15 Annex E, Table E.1-1: the Basic Profile action for each attribute (keyword ->
# action). D: replace with a non-identifying dummy value; Z: replace with an empty value;
# X: remove; U: replace with a new UID, the same new UID for the same old one. Where the
# table allows several actions (e.g. "X/Z/D"), the most removing one is used.
# ----------------------------------------------------------------------------------------
DEIDENTIFY_ACTIONS: dict[str, str] = {
    # Patient
    "PatientName": "Z",
    "PatientID": "Z",
    "IssuerOfPatientID": "X",
    "IssuerOfPatientIDQualifiersSequence": "X",
    "PatientBirthDate": "Z",
    "PatientBirthTime": "X",
    "PatientBirthName": "X",
    "PatientSex": "Z",
    "PatientAge": "X",
    "PatientSize": "X",
    "PatientWeight": "X",
    "PatientAddress": "X",
    "PatientTelephoneNumbers": "X",
    "PatientTelecomInformation": "X",
    "PatientMotherBirthName": "X",
    "PatientComments": "X",
    "PatientState": "X",
    "PatientReligiousPreference": "X",
    "PatientInsurancePlanCodeSequence": "X",
    "PatientPrimaryLanguageCodeSequence": "X",
    "PatientSexNeutered": "X",
    "OtherPatientIDs": "X",
    "OtherPatientNames": "X",
    "OtherPatientIDsSequence": "X",
    "MedicalRecordLocator": "X",
    "MilitaryRank": "X",
    "BranchOfService": "X",
    "Occupation": "X",
    "EthnicGroup": "X",
    "CountryOfResidence": "X",
    "RegionOfResidence": "X",
    "MedicalAlerts": "X",
    "Allergies": "X",
    "AdditionalPatientHistory": "X",
    "LastMenstrualDate": "X",
    "PregnancyStatus": "X",
    "SmokingStatus": "X",
    "ResponsiblePerson": "X",
    "ResponsibleOrganization": "X",
    "PersonAddress": "X",
    "PersonTelephoneNumbers": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedPatientPhotoSequence": "X",
    # Visit, admission, order
    "AdmissionID": "X",
    "IssuerOfAdmissionIDSequence": "X",
    "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X",
    "AdmittingDate": "X",
    "AdmittingTime": "X",
    "ServiceEpisodeID": "X",
    "ServiceEpisodeDescription": "X",
    "VisitComments": "X",
    "CurrentPatientLocation": "X",
    "PatientInstitutionResidence": "X",
    "AccessionNumber": "Z",
    "IssuerOfAccessionNumberSequence": "X",
    "StudyID": "Z",
    "PlacerOrderNumberImagingServiceRequest": "X",
    "FillerOrderNumberImagingServiceRequest": "X",
    "OrderEnteredBy": "X",
    "OrderEntererLocation": "X",
    "OrderCallbackPhoneNumber": "X",
    "RequestedProcedureID": "X",
    "RequestedProcedureDescription": "X",
    "RequestingService": "X",
    "RequestingPhysician": "X",
    "ReasonForStudy": "X",
    "ReasonForTheRequestedProcedure": "X",
    "RequestAttributesSequence": "X",
    "ScheduledPerformingPhysicianName": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepEndDate": "X",
    "PerformedProcedureStepEndTime": "X",
    "PerformedStationName": "X",
    "PerformedLocation": "X",
    "ReferencedPerformedProcedureStepSequence": "X",
    "ReferencedStudySequence": "X",
    # People and places
    "InstitutionName": "X",
    "InstitutionAddress": "X",
    "InstitutionCodeSequence": "X",
    "InstitutionalDepartmentName": "X",
    "InstitutionalDepartmentTypeCodeSequence": "X",
    "StationName": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "PerformingPhysicianName": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "OperatorsName": "X",
    "OperatorIdentificationSequence": "X",
    "ContentCreatorName": "Z",
    "VerifyingObserverName": "D",
    "PersonName": "D",
    # Dates and times (the basic profile keeps none but study and content date, emptied)
    "StudyDate": "Z",
    "StudyTime": "Z",
    "SeriesDate": "X",
    "SeriesTime": "X",
    "AcquisitionDate": "X",
    "AcquisitionTime": "X",
    "AcquisitionDateTime": "X",
    "ContentDate": "Z",
    "ContentTime": "Z",
    "OverlayDate": "X",
    "OverlayTime": "X",
    "CurveDate": "X",
    "CurveTime": "X",
    "TimezoneOffsetFromUTC": "X",
    "InstanceCoercionDateTime": "X",
    # Free text that may name anyone
    "StudyDescription": "X",
    "SeriesDescription": "X",
    "ImageComments": "X",
    "FrameComments": "X",
    "AcquisitionComments": "X",
    "DerivationDescription": "X",
    "ProtocolName": "X",
    "AcquisitionDeviceProcessingDescription": "X",
    "TextComments": "X",
    "TextString": "X",
    "IdentifyingComments": "X",
    "InterpretationText": "X",
    "Impressions": "X",
    # Devices (identify the site; removed unless a "retain device identity" option)
    "DeviceSerialNumber": "X",
    "DetectorID": "X",
    "PlateID": "X",
    "GantryID": "X",
    "CassetteID": "X",
    "GeneratorID": "X",
    # Linked objects and signatures
    "ReferencedImageSequence": "X",
    "SourceImageSequence": "X",
    "OriginalAttributesSequence": "X",
    "DigitalSignaturesSequence": "X",
    "MACParametersSequence": "X",
    "EncryptedAttributesSequence": "X",
    "ModifiedAttributesSequence": "X",
    # UIDs: replaced consistently (U)
    "StudyInstanceUID": "U",
    "SeriesInstanceUID": "U",
    "SOPInstanceUID": "U",
    "MediaStorageSOPInstanceUID": "U",
    "FrameOfReferenceUID": "U",
    "SynchronizationFrameOfReferenceUID": "U",
    "ReferencedSOPInstanceUID": "U",
    "ReferencedFrameOfReferenceUID": "U",
    "RelatedFrameOfReferenceUID": "U",
    "InstanceCreatorUID": "U",
    "IrradiationEventUID": "U",
    "DeviceUID": "U",
    "DimensionOrganizationUID": "U",
    "ConcatenationUID": "U",
    "StorageMediaFileSetUID": "U",
    "TargetUID": "U",
    "UID": "U",
}

#: Dummy values for action D, by value representation.
_DUMMY = {"PN": "ANONYMOUS", "LO": "ANONYMOUS", "SH": "ANONYMOUS", "DA": "19000101", "TM": "000000"}

# Overlay data and comments (60xx,3000 / 60xx,4000) and curves (50xx,xxxx): X.
_REMOVED_GROUPS = (0x5000, 0x6000)


# ------------------------------------------------------------------ de-identification

def _new_uid(old: str, salt: bytes) -> str:
    """The same old UID gives the same new one (for a given salt): a 2.25 (UUID-derived,
    PS3.5 B.2) UID from an HMAC of the old value, which cannot be reversed."""
    digest = hmac.new(salt, old.encode("ascii", "replace"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _is_standard_uid(value: str) -> bool:
    """A UID the standard itself defines (an SOP class, a transfer syntax, a coding
    scheme...): it names no patient, so it is kept."""
    uid = UID(value)
    return uid.name != value or value.startswith("1.2.840.10008.")


def _deidentify_dataset(ds: Dataset, salt: bytes) -> None:
    for elem in list(ds):
        tag = elem.tag
        if tag.is_private or (tag.group & 0xFF00) in _REMOVED_GROUPS:
            del ds[tag]
            continue
        action = DEIDENTIFY_ACTIONS.get(elem.keyword)
        if action is None:
            if elem.VR == "PN":
                action = "X"  # a person's name the table does not list: stricter than it
            elif elem.VR == "UI" and elem.value and not all(_is_standard_uid(str(v)) for v in _values(elem.value)):
                action = "U"
        if action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = [] if elem.VR == "SQ" else ""
        elif action == "D":
            elem.value = [] if elem.VR == "SQ" else _DUMMY.get(elem.VR, "")
        elif action == "U":
            if elem.value:
                new = [_new_uid(str(v), salt) for v in _values(elem.value)]
                elem.value = new if len(new) > 1 else new[0]
        elif elem.VR == "SQ":
            for item in elem.value:
                _deidentify_dataset(item, salt)


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, MultiValue)) else [value]


def deidentify(ds: Dataset, uid_salt: bytes) -> Dataset:
    """Apply `DEIDENTIFY_ACTIONS` (PS3.15 Annex E basic profile) and the stricter rules
    above to ``ds`` in place, nested sequences and the file meta included, and record it
    (PatientIdentityRemoved YES, DeidentificationMethod, code 113100). Returns ``ds``."""
    _deidentify_dataset(ds, uid_salt)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta and meta.MediaStorageSOPInstanceUID:
        meta.MediaStorageSOPInstanceUID = _new_uid(str(meta.MediaStorageSOPInstanceUID), uid_salt)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD[:64]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]
    return ds


def patient_key(ds: Dataset, secret: str | None) -> str | None:
    """The per-site pseudonymous key of the patient: HMAC-SHA256 of the issuer and the
    Patient ID under ``secret`` (32 hex digits), the same for every image of one patient
    at this site and meaningless without the secret; None when no secret is set or the
    file has no Patient ID."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not secret or not patient_id:
        return None
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    message = f"{issuer}\x00{patient_id}".encode("utf-8", "replace")
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:32]
