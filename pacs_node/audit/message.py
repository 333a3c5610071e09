"""The DICOM PS3.15 A.5 ``AuditMessage`` XML of an :class:`~pacs_node.audit.events.AuditEvent`,
and its validation against the standard's schema (A.5.1, shipped in ``schema/``).

Element order follows the schema (it is a RELAX NG group); times are ``xsd:dateTime`` with the
UTC offset; the AuditSourceID is the host the node runs on (``socket.gethostname()``), with
source type 4 (Application Server process or thread: a value of the schema's own list, so it
carries no coding scheme). Each participant object carries the schema's mandatory choice of a
name (the patient's name for the patient: the audit trail holds PHI by design) or a query,
and a study's accession number and SOP classes in a ParticipantObjectDescription.
"""

from __future__ import annotations

import base64
import functools
import re
import socket
from pathlib import Path

from lxml import etree

from pacs_node.audit.events import AuditEvent, Code

SCHEMA_FILE = Path(__file__).parent / "schema" / "audit-message.rng"
SOURCE_TYPE = "4"  # Application Server process or thread (A.5.1.2.1)


class InvalidAuditMessage(ValueError):
    """A message the PS3.15 schema refuses (a defect of the builder, never of the input)."""


# what XML 1.0 cannot carry (C0 controls but tab, CR, LF; surrogates; U+FFFE, U+FFFF)
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_safe(text: str) -> str:
    """``text`` with each character XML cannot hold replaced by U+FFFD: a PatientID or an AE
    title is peer input, and a control character in one must not cost the event."""
    return _NOT_XML.sub("\ufffd", text)


def _set(element: etree._Element, name: str, value: str) -> None:
    element.set(name, xml_safe(value))


def _text(parent: etree._Element, tag: str, value: str) -> etree._Element:
    element = etree.SubElement(parent, tag)
    element.text = xml_safe(value)
    return element


def _coded(parent: etree._Element, tag: str, code: Code) -> etree._Element:
    element = etree.SubElement(parent, tag)
    _set(element, "csd-code", code.code)
    _set(element, "codeSystemName", code.scheme)
    _set(element, "originalText", code.meaning)
    return element


def _token(text: str) -> str:
    """xsd:token has no leading, trailing or repeated white space."""
    return " ".join(xml_safe(text).split()) or "-"


def build(event: AuditEvent, source_id: str | None = None) -> bytes:
    """The AuditMessage of ``event`` as UTF-8 XML bytes (no declaration)."""
    root = etree.Element("AuditMessage")
    ident = etree.SubElement(root, "EventIdentification")
    ident.set("EventActionCode", event.action)
    ident.set("EventDateTime", event.at.isoformat(timespec="milliseconds"))
    ident.set("EventOutcomeIndicator", str(int(event.outcome)))
    _coded(ident, "EventID", event.event_id)
    for code in event.types:
        _coded(ident, "EventTypeCode", code)
    if event.description:
        _text(ident, "EventOutcomeDescription", event.description)
    for p in event.participants:
        active = etree.SubElement(root, "ActiveParticipant")
        if p.role is not None:
            _coded(active, "RoleIDCode", p.role)
        if p.media_type is not None:
            _coded(etree.SubElement(active, "MediaIdentifier"), "MediaType", p.media_type)
        _set(active, "UserID", p.user_id)
        if p.alternative_id:
            _set(active, "AlternativeUserID", p.alternative_id)
        if p.name:
            _set(active, "UserName", p.name)
        active.set("UserIsRequestor", "true" if p.requestor else "false")
        if p.address:
            active.set("NetworkAccessPointID", _token(p.address))
            active.set("NetworkAccessPointTypeCode", p.address_type)
    source = etree.SubElement(root, "AuditSourceIdentification")
    source.set("AuditSourceID", _token(source_id or socket.gethostname()))
    etree.SubElement(source, "AuditSourceTypeCode").set("csd-code", SOURCE_TYPE)
    for o in event.objects:
        obj = etree.SubElement(root, "ParticipantObjectIdentification")
        _coded(obj, "ParticipantObjectIDTypeCode", o.id_type)
        if o.query is not None:
            query = base64.b64encode(o.query).decode("ascii")
            etree.SubElement(obj, "ParticipantObjectQuery").text = query
        else:  # the schema's mandatory choice: a name when there is no query
            etree.SubElement(obj, "ParticipantObjectName").text = _token(o.name or o.object_id)
        for kind, value in o.details:
            detail = etree.SubElement(obj, "ParticipantObjectDetail")
            detail.set("type", _token(kind))
            _set(detail, "value", base64.b64encode(xml_safe(value).encode("utf-8")).decode("ascii"))
        if o.accession or o.sop_classes:
            description = etree.SubElement(obj, "ParticipantObjectDescription")
            if o.accession:
                etree.SubElement(description, "Accession").set("Number", _token(o.accession))
            for uid, count in o.sop_classes:
                sop = etree.SubElement(description, "SOPClass")
                _set(sop, "UID", _token(uid))
                sop.set("NumberOfInstances", str(count))
        obj.set("ParticipantObjectID", _token(o.object_id))
        _set(obj, "ParticipantObjectTypeCode", o.type_code)
        _set(obj, "ParticipantObjectTypeCodeRole", o.role)
    return etree.tostring(root, encoding="utf-8")


@functools.cache
def schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA_FILE)))


def validate(xml: bytes) -> None:
    """Raise :class:`InvalidAuditMessage` unless ``xml`` is a valid PS3.15 AuditMessage."""
    try:
        document = etree.fromstring(xml)
    except etree.XMLSyntaxError as exc:
        raise InvalidAuditMessage(f"not XML: {exc}") from exc
    checker = schema()
    if not checker.validate(document):
        raise InvalidAuditMessage(str(checker.error_log.last_error))


def violation(xml: bytes) -> str | None:
    """Where ``xml`` departs from the schema (an element path, never a value: values hold
    patient IDs), None when it is valid."""
    try:
        document = etree.fromstring(xml)
    except etree.XMLSyntaxError:
        return "not XML"
    checker = schema()
    if checker.validate(document):
        return None
    error = checker.error_log.last_error
    return error.path if error is not None and error.path else "AuditMessage"
