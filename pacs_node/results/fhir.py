"""The EHR's copy of a result: a FHIR R4 transaction Bundle (fhir.resources.R4B models, whose JSON
an R4 server accepts; R4B changed none of the resources used here).

- DiagnosticReport: status preliminary, category v2-0074 RAD, code LOINC 18748-4, effective
  time = the study's, conclusion text, the PDF as presentedForm, basedOn the order.
- One Observation per measurement: code and method (derivation) from :mod:`.codes`, UCUM
  quantity, SNOMED CT body site, derivedFrom the ImagingStudy, device the model. A paired
  structure's laterality (and only a paired structure's, as in the SR's finding site) rides on
  bodySite as the FHIR Extensions Pack's ``observation-structureLaterality`` (SNOMED CT left /
  right / bilateral, PS3.16 CID 244), which is what that extension is for while the site code is not
  pre-coordinated; a finding's warnings (left/right conflict, several pieces) are each
  Observation's ``note`` and close the report's conclusion. A size the image's pixel spacing
  does not allow (see :mod:`.measurements`) is an Observation without valueQuantity, with
  dataAbsentReason ``unknown`` and a note saying it is not measurable.
- ImagingStudy identified by ``urn:dicom:uid`` / ``urn:oid:<StudyInstanceUID>``; Device for the
  model identified by its Device UID.
- The DiagnosticReport and its Observations are conditional updates (``PUT
  DiagnosticReport?identifier=...``), the rest conditional creates (``ifNoneExist``), each on its
  deterministic identifier, so a re-sent Bundle never duplicates anything. The report's
  identifier is the same for every run of the model on the series
  (:attr:`Provenance.report_uid`): a re-run updates the one report the EHR holds, and brings it
  back to ``preliminary`` after a rejection.
- A rejected result is withdrawn with :func:`withdrawal_bundle`: the Bundle that went out, its
  report and Observations ``entered-in-error``.
- The Patient is referenced by identifier only (a conditional reference, resolved by the
  server): a node never creates patients. If the EHR does not know the patient the transaction
  fails and the delivery is held for a person to look at. ``FhirOptions.create_patient`` (test
  systems only) adds a conditional create of the Patient instead.
- basedOn: a literal ServiceRequest reference when the caller knows one, else a logical reference
  by accession number (identifier type ACSN), which needs no match on the server.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset
from pydicom.multival import MultiValue

from pacs_node.inference.vocabulary import CodedConcept
from pacs_node.outputs import OutputKind
from pacs_node.quality.checks import FailedCheck, Verdict
from pacs_node.results import codes
from pacs_node.results.measurements import Finding, Measurement, Unmeasured
from pacs_node.results.provenance import Provenance

DICOM_UID_SYSTEM = "urn:dicom:uid"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
STRUCTURE_LATERALITY = "http://hl7.org/fhir/StructureDefinition/observation-structureLaterality"


def coding(concept: CodedConcept) -> dict[str, str]:
    return {
        "system": codes.FHIR_SYSTEMS[concept.scheme],
        "code": concept.value,
        "display": concept.meaning,
    }


def patient_identifier(source: Dataset, provenance: Provenance) -> tuple[str, str]:
    """(system, value) of the patient in the EHR: PatientID under its issuer's system."""
    options = provenance.options.fhir
    issuer = str(source.get("IssuerOfPatientID", "") or "")
    system = options.issuer_systems.get(issuer, options.patient_system)
    return system, _single(source.get("PatientID", ""))


def _single(value: object) -> str:
    """A VM 1 text value as sent: a backslash in it made pydicom split it into several values
    (the DICOM value separator), which are joined back, never shown as a Python list."""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value or "")


def search_escape(value: str) -> str:
    r"""A search parameter value as FHIR R4 requires (3.1.1.5.7 Escaping Search Parameters):
    ``\``, ``,``, ``|`` and ``$`` each preceded by a backslash, so ``a,b`` is one value, not
    two, and ``a|b`` is not a system."""
    for char in ("\\", ",", "|", "$"):
        value = value.replace(char, "\\" + char)
    return value


def identifier_token(system: str, value: str) -> str:
    """``system|value`` of a token search, both parts escaped."""
    return f"{search_escape(system)}|{search_escape(value)}"


def identifier_query(system: str, value: str) -> str:
    r"""``identifier=...`` as it appears in a URL: the token escaped, then percent-encoded
    (``#``, ``&``, ``+``, ``%``, ``\``, ``,`` and ``$`` encoded; ``:``, ``/`` and ``|``
    kept for the reader)."""
    return "identifier=" + quote(identifier_token(system, value), safe=":/|")


def patient_search(provenance: Provenance) -> str:
    """The search that finds the patient (also the conditional reference the Bundle uses),
    escaped and URL-encoded, so PatientID ``12#34`` never names patient ``12``."""
    system, value = patient_identifier(provenance.source, provenance)
    return f"Patient?{identifier_query(system, value)}"


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def _dicom_datetime(date: str, time: str) -> str | None:
    if len(date) != 8 or not date.isdigit():
        return None
    text = f"{date[:4]}-{date[4:6]}-{date[6:8]}"
    digits = time.split(".", maxsplit=1)[0]
    if len(digits) >= 4 and digits.isdigit():
        seconds = digits[4:6] if len(digits) >= 6 else "00"
        return f"{text}T{digits[:2]}:{digits[2:4]}:{seconds}Z"
    return text


def _instant(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


QUALITY_PREFIX = "Quality check failed"


def quality_failures(flagged: Verdict | None, finding: Finding) -> list[FailedCheck]:
    """The failed checks that concern ``finding``'s label (a pair's check: both sides)."""
    if flagged is None:
        return []
    name = finding.segment.name
    return [
        f
        for f in flagged.failures
        if f.label and name in (f.label, f"{f.label}_left", f"{f.label}_right")
    ]


def conclusion(
    findings: Sequence[Finding], provenance: Provenance, flagged: Verdict | None = None
) -> str:
    """One sentence per structure (its label as the PDF and legend show it, and its size), then
    every warning; a result that failed the quality gate (``flagged``) says so first."""
    parts: list[str] = []
    warnings: list[str] = []
    for finding in findings:
        if not finding.present:
            parts.append(f"{finding.segment.structure.display}: not found.")
            continue
        size = finding.size_text()
        parts.append(f"{finding.label}: {size}." if size else f"{finding.label}: found.")
        warnings.extend(f"Warning: {w}." for w in finding.warnings())
    model = f"{provenance.algorithm.name} {provenance.algorithm.version}"
    quality = (
        [f"{QUALITY_PREFIX}: {'; '.join(flagged.sentences())}."]
        if flagged is not None and flagged.failures
        else []
    )
    return f"AI segmentation by {model} (preliminary, verify before use). " + " ".join(
        quality + parts + warnings
    )


def build_bundle(
    findings: Sequence[Finding],
    pdf: bytes,
    provenance: Provenance,
    *,
    sr_uid: str | None,
    flagged: Verdict | None = None,
) -> Bundle:
    """The transaction Bundle; ``sr_uid`` (the SR's SOP Instance UID) identifies the report;
    ``flagged``: the quality checks the result failed, in the conclusion and as a note on
    each Observation of a label they concern."""
    source = provenance.source
    options = provenance.options.fhir
    study_uid = provenance.study_uid
    report_uid = provenance.report_uid
    urls = {
        "report": f"urn:uuid:{_uuid(report_uid)}",
        "study": f"urn:uuid:{_uuid(provenance.uid(OutputKind.FHIR, 'study'))}",
        "device": f"urn:uuid:{_uuid(provenance.device_uid)}",
        "patient": f"urn:uuid:{_uuid(provenance.uid(OutputKind.FHIR, 'patient'))}",
    }
    system, value = patient_identifier(source, provenance)
    subject = (
        {"reference": urls["patient"]}
        if options.create_patient
        else {"reference": patient_search(provenance)}
    )
    entries: list[dict[str, Any]] = []
    if options.create_patient:
        entries.append(
            _entry(
                urls["patient"],
                {
                    "resourceType": "Patient",
                    "identifier": [{"system": system, "value": value}],
                    "name": [{"text": str(source.get("PatientName", "")).replace("^", " ")}],
                },
                identifier_query(system, value),
            )
        )
    device_id = _oid(provenance.device_uid)
    algorithm = provenance.algorithm
    entries.append(
        _entry(
            urls["device"],
            {
                "resourceType": "Device",
                "identifier": [{"system": DICOM_UID_SYSTEM, "value": device_id}],
                "status": "active",
                "manufacturer": algorithm.manufacturer,
                "deviceName": [{"name": algorithm.name, "type": "model-name"}],
                "modelNumber": algorithm.name,
                "version": [{"value": algorithm.version}],
                "type": {"text": "AI segmentation model"},
            },
            identifier_query(DICOM_UID_SYSTEM, device_id),
        )
    )
    volume = provenance.volume
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": _oid(study_uid)}],
        "status": "available",
        "subject": subject,
        "modality": [{"system": codes.FHIR_SYSTEMS["DCM"], "code": volume.modality}],
        "series": [
            {
                "uid": volume.series_instance_uid,
                "modality": {"system": codes.FHIR_SYSTEMS["DCM"], "code": volume.modality},
                "numberOfInstances": len({u for u in volume.sop_instance_uids if u}),
            }
        ],
    }
    started = _dicom_datetime(str(source.get("StudyDate", "")), str(source.get("StudyTime", "")))
    if started and "T" in started:
        study["started"] = started
    description = str(source.get("StudyDescription", "") or "")
    if description:
        study["description"] = description
    based_on = _based_on(source, provenance)
    if based_on:
        study["basedOn"] = [based_on]
    study_query = identifier_query(DICOM_UID_SYSTEM, _oid(study_uid))
    entries.append(_entry(urls["study"], study, study_query))
    observation_urls: list[str] = []
    for finding in findings:
        if not finding.present:
            continue
        given: list[Measurement | Unmeasured] = [*finding.measurements(), *finding.unmeasured()]
        for measurement in given:
            uid = provenance.uid(
                OutputKind.FHIR, f"obs-{finding.segment.structure.name}-{measurement.key}"
            )
            url = f"urn:uuid:{_uuid(uid)}"
            observation_urls.append(url)
            entries.append(
                _update_entry(
                    url,
                    _observation(
                        finding,
                        measurement,
                        uid,
                        subject,
                        urls,
                        started,
                        quality_failures(flagged, finding),
                    ),
                    identifier_query(DICOM_UID_SYSTEM, _oid(uid)),
                )
            )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [
            {"system": DICOM_UID_SYSTEM, "value": _oid(report_uid)},
        ],
        "status": "preliminary",
        "category": [{"coding": [coding(codes.RADIOLOGY)]}],
        "code": {"coding": [coding(codes.DIAGNOSTIC_IMAGING_STUDY)]},
        "subject": subject,
        "issued": _instant(provenance.created),
        "imagingStudy": [{"reference": urls["study"]}],
        "result": [{"reference": url} for url in observation_urls],
        "conclusion": conclusion(findings, provenance, flagged),
        "presentedForm": [
            {
                "contentType": "application/pdf",
                "language": "en",
                "data": base64.b64encode(pdf).decode("ascii"),
                "title": f"AI result {algorithm.name} {algorithm.version}",
                "creation": _instant(provenance.created),
            }
        ],
    }
    if sr_uid:
        report["extension"] = [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/workflow-supportingInfo",
                "valueReference": {
                    "identifier": {"system": DICOM_UID_SYSTEM, "value": _oid(sr_uid)},
                    "display": "DICOM SR (TID 1500) of this result",
                },
            }
        ]
    if started:
        report["effectiveDateTime"] = started
    if based_on:
        report["basedOn"] = [based_on]
    entries.append(
        _update_entry(urls["report"], report, identifier_query(DICOM_UID_SYSTEM, _oid(report_uid)))
    )
    return Bundle.model_validate(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    )


def bundle_json(bundle: Bundle) -> bytes:
    """Stored bytes of the Bundle (the dispatcher posts these, never a rebuild)."""
    data = json.loads(bundle.model_dump_json(exclude_none=True))
    return json.dumps(data, ensure_ascii=False, sort_keys=True, indent=1).encode("utf-8")


def _based_on(source: Dataset, provenance: Provenance) -> dict[str, Any] | None:
    options = provenance.options.fhir
    if options.service_request:
        return {"reference": options.service_request, "type": "ServiceRequest"}
    accession = str(source.get("AccessionNumber", "") or "")
    if not accession:
        return None
    return {
        "type": "ServiceRequest",
        "identifier": {
            "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
            "system": options.accession_system,
            "value": accession,
        },
    }


def _observation(
    finding: Finding,
    measurement: Measurement | Unmeasured,
    uid: str,
    subject: dict[str, str],
    urls: dict[str, str],
    effective: str | None,
    failed: Sequence[FailedCheck] = (),
) -> dict[str, Any]:
    structure = finding.segment.structure
    body_site: dict[str, Any] = {"coding": [coding(structure.type)], "text": finding.label}
    if finding.laterality is not None:
        body_site["extension"] = [
            {
                "url": STRUCTURE_LATERALITY,
                "valueCodeableConcept": {"coding": [coding(finding.laterality.concept)]},
            }
        ]
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": _oid(uid)}],
        "status": "preliminary",
        "category": [
            {"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}
        ],
        "code": {
            "coding": [coding(measurement.name)],
            "text": f"{finding.label}: {measurement.label}",
        },
        "subject": subject,
        "bodySite": body_site,
        "derivedFrom": [{"reference": urls["study"]}],
        "device": {"reference": urls["device"]},
    }
    notes = [f"{QUALITY_PREFIX} ({f.check}): {f.message}." for f in failed]
    notes += [f"Warning: {w}." for w in finding.warnings()]
    if isinstance(measurement, Unmeasured):
        # R4: no value, and why (obs-6: dataAbsentReason only where value[x] is absent)
        observation["dataAbsentReason"] = {
            "coding": [{"system": DATA_ABSENT_REASON, "code": "unknown", "display": "Unknown"}],
            "text": measurement.reason,
        }
        notes.insert(0, f"{measurement.label} {measurement.reason}.")
    else:
        observation["valueQuantity"] = {
            "value": _decimal(measurement.value),
            "unit": measurement.unit.meaning,
            "system": codes.FHIR_SYSTEMS["UCUM"],
            "code": measurement.unit.value,
        }
        if measurement.derivation is not None:
            observation["method"] = {"coding": [coding(measurement.derivation)]}
    if notes:
        observation["note"] = [{"text": text} for text in notes]
    if effective:
        observation["effectiveDateTime"] = effective
    return observation


def _decimal(value: float) -> float:
    return float(f"{value:.6g}")


def _entry(full_url: str, resource: dict[str, Any], if_none_exist: str) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": if_none_exist,
        },
    }


def _update_entry(full_url: str, resource: dict[str, Any], query: str) -> dict[str, Any]:
    """A conditional update: the one resource with this identifier is replaced (created when
    there is none), so a later Bundle's status and content win."""
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "PUT", "url": f"{resource['resourceType']}?{query}"},
    }


WITHDRAWN = ("DiagnosticReport", "Observation")
ENTERED_IN_ERROR = "entered-in-error"


def withdrawal_bundle(sent: bytes, why: str) -> Bundle:
    """The transaction that withdraws a result from the EHR: the Bundle ``sent`` there, with its
    DiagnosticReport and each Observation ``entered-in-error`` as conditional updates on their
    identifiers (the other entries, conditional creates, resolve the references again and
    change nothing). ``why`` (no patient data) closes the report's conclusion."""
    bundle = json.loads(sent)
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        kind = resource.get("resourceType")
        if kind not in WITHDRAWN:
            continue
        identifier = (resource.get("identifier") or [{}])[0]
        if not identifier.get("system") or not identifier.get("value"):
            raise ValueError(f"a {kind} without an identifier cannot be withdrawn")
        resource["status"] = ENTERED_IN_ERROR
        if kind == "DiagnosticReport":
            resource["conclusion"] = f"Entered in error: {why}. " + resource.get("conclusion", "")
        query = identifier_query(identifier["system"], identifier["value"])
        entry["request"] = {"method": "PUT", "url": f"{kind}?{query}"}
    return Bundle.model_validate(bundle)


def _uuid(uid: str) -> str:
    """A UUID for ``urn:uuid:`` full URLs, taken from one of our 2.25 UIDs (itself a UUID)."""
    return str(uuid.UUID(int=int(uid.removeprefix("2.25."))))
