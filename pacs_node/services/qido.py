"""QIDO-RS searches (PS3.18 10.6) over what the node holds: studies, series and instances,
received and produced (see :mod:`pacs_node.services.archive`), answered as DICOM JSON.

Matching (PS3.4 C.2.2.2, PS3.18 8.3.4): single values, lists of UIDs (``,`` or ``\\``), ``*``
and ``?`` wildcards, date and time ranges; an empty value asks for the attribute without
matching. Wildcard and Person Name matching ignore case (PS3.4 allows it for PN; here all
wildcard matching does); a PN pattern matches the whole value or any one of its component
groups (alphabetic, ideographic, phonetic). Fuzzy matching is not offered.

Received instances are matched in SQL; the node's results (a handful per study) are matched in
Python on their stored headers, with the same rules. A page lists received entities first, then
results, each in the order the catalog recorded them.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from pacs_node.catalog.models import Instance, Job, Result, Series, Study
from pacs_node.errors import RequestError
from pacs_node.services.archive import (
    Archive,
    StoredObject,
    header_or_none,
    not_received,
    received_visible,
    result_visible,
)
from pacs_node.uids import is_valid_uid

# The most results one response holds; a search that matches more says so in a Warning.
MAX_RESULTS = 1000
# The largest limit or offset a search takes (the catalog's integers are 64-bit).
MAX_OFFSET = 10**9
CHARSET = "ISO_IR 192"  # every string this module returns is Unicode (UTF-8 on the wire)
MORE_RESULTS = '299 pacs-node "There are additional results that can be requested"'
NO_FUZZY = (
    '299 pacs-node "The fuzzymatching parameter is not supported. '
    'Only literal matching has been performed."'
)


class QueryError(RequestError):
    """A search the node cannot answer as asked (unknown or unsupported key, bad value)."""


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


class _Kind(StrEnum):
    UID = "uid"
    TEXT = "text"
    PN = "pn"
    DATE = "date"
    TIME = "time"
    NUMBER = "number"
    CODES = "codes"  # a list of code strings, any of which matches (ModalitiesInStudy)


# keyword -> how it matches; the attributes each level may be searched on
STUDY_KEYS: dict[str, _Kind] = {
    "StudyInstanceUID": _Kind.UID,
    "PatientID": _Kind.TEXT,
    "IssuerOfPatientID": _Kind.TEXT,
    "PatientName": _Kind.PN,
    "StudyDate": _Kind.DATE,
    "StudyTime": _Kind.TIME,
    "AccessionNumber": _Kind.TEXT,
    "StudyDescription": _Kind.TEXT,
    "ModalitiesInStudy": _Kind.CODES,
}
SERIES_KEYS: dict[str, _Kind] = {
    "SeriesInstanceUID": _Kind.UID,
    "Modality": _Kind.TEXT,
    "SeriesNumber": _Kind.NUMBER,
    "SeriesDescription": _Kind.TEXT,
}
INSTANCE_KEYS: dict[str, _Kind] = {
    "SOPInstanceUID": _Kind.UID,
    "SOPClassUID": _Kind.UID,
    "InstanceNumber": _Kind.NUMBER,
}
KEYS = {
    Level.STUDY: STUDY_KEYS,
    Level.SERIES: {**STUDY_KEYS, **SERIES_KEYS},
    Level.INSTANCE: {**STUDY_KEYS, **SERIES_KEYS, **INSTANCE_KEYS},
}
_STUDY_COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "StudyInstanceUID": Study.study_uid,
    "PatientID": Study.patient_id,
    "IssuerOfPatientID": Study.issuer_of_patient_id,
    "PatientName": Study.patient_name,
    "StudyDate": Study.study_date,
    "StudyTime": Study.study_time,
    "AccessionNumber": Study.accession_number,
    "StudyDescription": Study.study_description,
}
_SERIES_COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "SeriesInstanceUID": Series.series_uid,
    "Modality": Series.modality,
    "SeriesNumber": Series.series_number,
    "SeriesDescription": Series.series_description,
}
_INSTANCE_COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "SOPInstanceUID": Instance.sop_instance_uid,
    "SOPClassUID": Instance.sop_class_uid,
    "InstanceNumber": Instance.instance_number,
}
_RESULT_COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "SeriesInstanceUID": Result.series_uid,
    "SOPInstanceUID": Result.sop_instance_uid,
    "SOPClassUID": Result.sop_class_uid,
}

# What each level returns without being asked (PS3.18 Table 10.6.3-3 to -5, as far as known)
STUDY_DEFAULT = (
    "SpecificCharacterSet",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "RetrieveURL",
)
SERIES_DEFAULT = (
    "SpecificCharacterSet",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "NumberOfSeriesRelatedInstances",
    "RetrieveURL",
)
INSTANCE_DEFAULT = (
    "SpecificCharacterSet",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "InstanceAvailability",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "RetrieveURL",
)
# ``includefield=all`` adds these, read from a stored header of the study or series
STUDY_ALL = (
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyID",
    "ReferringPhysicianName",
)
SERIES_ALL = (
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "ProtocolName",
    "Laterality",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "Manufacturer",
)
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


@dataclass(frozen=True, slots=True)
class Condition:
    """One matching key with its value, able to match a catalog column and a Python value."""

    keyword: str
    kind: _Kind
    value: str

    def values(self) -> list[str]:
        return [v for v in re.split(r"[\\,]", self.value) if v]

    def sql(self, column: InstrumentedAttribute[Any]) -> ColumnElement[bool]:
        if self.kind in (_Kind.UID, _Kind.CODES):
            return column.in_(self.values())
        if self.kind is _Kind.NUMBER:
            return column == int(self.value)
        if self.kind in (_Kind.DATE, _Kind.TIME):
            low, high = _range(self.value, self.kind)
            parts = []
            if low is not None:
                parts.append(column >= low)
            if high is not None:
                parts.append(column <= high if self.kind is _Kind.DATE else column < _after(high))
            return and_(*parts)
        if self.kind is _Kind.PN:
            return or_(*(column.ilike(p, escape="\\") for p in _pn_likes(self)))
        if not _has_wildcard(self.value):
            return column == self.value
        return column.ilike(_like(self.value), escape="\\")

    def test(self, value: object) -> bool:
        """The same match as :meth:`sql`, on a value read from a stored header."""
        if self.kind in (_Kind.UID, _Kind.CODES):
            present = [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
            return any(v in self.values() for v in present)
        if value is None or value == "":
            return False
        text = str(value)
        if self.kind is _Kind.NUMBER:
            try:
                return int(text) == int(self.value)
            except ValueError:
                return False
        if self.kind in (_Kind.DATE, _Kind.TIME):
            low, high = _range(self.value, self.kind)
            if self.kind is _Kind.TIME:
                text = text.replace(":", "")
            after_low = low is None or text >= low
            if high is None:
                return after_low
            return after_low and (text <= high if self.kind is _Kind.DATE else text < _after(high))
        if self.kind is _Kind.TEXT and not _has_wildcard(self.value):
            return text == self.value
        regex = _regex(self.value)
        if self.kind is _Kind.PN:
            return any(regex.fullmatch(g) for g in (text, *text.split("=")))
        return regex.fullmatch(text) is not None


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _pn_likes(condition: Condition) -> list[str]:
    """LIKE patterns (lower case) matching the whole value or one of its component groups."""
    pattern = _like(condition.value).lower()
    return [pattern, f"{pattern}=%", f"%={pattern}", f"%={pattern}=%"]


def _regex(value: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def _range(value: str, kind: _Kind) -> tuple[str | None, str | None]:
    low, sep, high = value.partition("-")
    if not sep:
        high = low
    bounds = tuple((b.replace(":", "") or None) for b in (low, high))
    pattern = _DATE if kind is _Kind.DATE else _TIME
    for bound in bounds:
        if bound is not None and not pattern.fullmatch(bound):
            raise QueryError(f"not a {kind.value} or {kind.value} range: {value!r}")
    if bounds == (None, None):
        raise QueryError(f"an empty {kind.value} range: {value!r}")
    return bounds[0], bounds[1]


def _after(time: str) -> str:
    """The first time string past every time that ``time`` covers ("1200" covers 1200xx)."""
    return time[:-1] + chr(ord(time[-1]) + 1)


@dataclass(frozen=True)
class Query:
    """A parsed QIDO-RS request."""

    level: Level
    conditions: tuple[Condition, ...] = ()
    include: frozenset[str] = frozenset()  # keywords asked for beyond the defaults
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    study_uid: str | None = None  # the study (and series) the resource path names
    series_uid: str | None = None

    def of(self, keys: Iterable[str]) -> list[Condition]:
        wanted = set(keys)
        return [c for c in self.conditions if c.keyword in wanted]


def attribute_keyword(key: str) -> str:
    """The keyword a query key names by keyword or by tag (``PatientName``, ``00100010``)."""
    if _TAG.fullmatch(key):
        keyword = keyword_for_tag(int(key, 16))
        if not keyword:
            raise QueryError(f"unknown attribute tag {key}")
        return keyword
    if tag_for_keyword(key) is None:
        raise QueryError(f"unknown attribute {key!r}")
    return key


def parse_query(
    level: Level,
    params: Sequence[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Query:
    """A :class:`Query` from the request's query parameters; :class:`QueryError` on a key the
    node does not match on, an unknown attribute or a malformed value."""
    conditions: list[Condition] = []
    include: set[str] = set()
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    keys = KEYS[level]
    for key, value in params:
        if key == "includefield":
            for name in (n.strip() for n in value.split(",")):
                if name == "all":
                    include_all = True
                elif name:
                    include.add(attribute_keyword(name))
        elif key in ("limit", "offset"):
            number = _natural(key, value)
            if key == "limit":
                limit = number
            else:
                offset = number
        elif key == "fuzzymatching":
            if value not in ("true", "false"):
                raise QueryError("fuzzymatching must be true or false")
            fuzzy = value == "true"
        elif "." in key:
            raise QueryError(f"sequence matching ({key}) is not supported")
        else:
            keyword = attribute_keyword(key)
            if keyword not in keys:
                raise QueryError(
                    f"{keyword} is not a matching key at the {level.value} level; "
                    f"supported: {', '.join(keys)}"
                )
            include.add(keyword)
            if value != "":
                condition = Condition(keyword, keys[keyword], value)
                _check(condition)
                conditions.append(condition)
    return Query(
        level,
        tuple(conditions),
        frozenset(include),
        include_all,
        limit,
        offset,
        fuzzy,
        study_uid,
        series_uid,
    )


def _natural(key: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) > MAX_OFFSET:
        raise QueryError(f"{key} must be an integer from 0 to {MAX_OFFSET}")
    return int(value)


def _check(condition: Condition) -> None:
    if condition.kind is _Kind.UID:
        bad = [v for v in condition.values() if not is_valid_uid(v)]
        if bad or not condition.values():
            raise QueryError(f"{condition.keyword}: not a UID list")
    elif condition.kind is _Kind.NUMBER:
        if not re.fullmatch(r"[+-]?\d{1,10}", condition.value):
            raise QueryError(f"{condition.keyword} must be an integer")
    elif condition.kind in (_Kind.DATE, _Kind.TIME):
        _range(condition.value, condition.kind)


@dataclass
class Page:
    """One response: DICOM JSON objects, and whether the node's maximum cut the answer."""

    items: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False

    def warnings(self, query: Query) -> list[str]:
        found = [MORE_RESULTS] if self.truncated else []
        return [*found, NO_FUZZY] if query.fuzzy else found


@dataclass(frozen=True)
class _Window:
    offset: int
    size: int
    cut_by_node: bool

    @classmethod
    def of(cls, query: Query) -> _Window:
        cap = MAX_RESULTS
        size = cap if query.limit is None else min(query.limit, cap)
        return cls(query.offset, size, query.limit is None or query.limit > cap)


def search(archive: Archive, query: Query, base_url: str) -> Page:
    """Run ``query``; ``base_url`` is the DICOMweb root the Retrieve URLs start with."""
    with archive.catalog.sessions() as session:
        if query.level is Level.STUDY:
            return _Studies(archive, session, query, base_url).page()
        return _Lower(archive, session, query, base_url).page()


def _study_filters(query: Query) -> list[ColumnElement[bool]]:
    clauses = [
        c.sql(_STUDY_COLUMNS[c.keyword])
        for c in query.of(STUDY_KEYS)
        if c.keyword in _STUDY_COLUMNS
    ]
    if query.study_uid is not None:
        clauses.append(Study.study_uid == query.study_uid)
    return clauses


def _results_stmt(query: Query) -> Select[Result, str]:
    """Visible DICOM results of the studies ``query`` matches, with their study's UID."""
    stmt = (
        select(Result, Study.study_uid)
        .join(Job, Result.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(result_visible(), Result.sop_instance_uid.is_not(None), *_study_filters(query))
        .order_by(Result.id)
    )
    for condition in query.conditions:
        if condition.keyword in _RESULT_COLUMNS:
            stmt = stmt.where(condition.sql(_RESULT_COLUMNS[condition.keyword]))
    if query.series_uid is not None:
        stmt = stmt.where(Result.series_uid == query.series_uid)
    return stmt


def _produced(archive: Archive, session: Session, query: Query) -> list[StoredObject]:
    """The results ``query`` matches in the catalog, echoed ones left out; their header-borne
    keys are not checked yet (see :func:`_matching`): no file is read here."""
    found = (
        archive.produced(r, study_uid) for r, study_uid in session.execute(_results_stmt(query))
    )
    return not_received(session, [o for o in found if o is not None])


def _header_checks(query: Query) -> list[Condition]:
    """The series and instance conditions a result is matched on by its stored header."""
    return [
        c
        for c in query.conditions
        if c.keyword in (SERIES_KEYS | INSTANCE_KEYS) and c.keyword not in _RESULT_COLUMNS
    ]


def _matching(
    objects: Iterable[StoredObject], checks: Sequence[Condition]
) -> Iterator[StoredObject]:
    """``objects`` whose stored file is there and matches ``checks``, each file looked at only
    when the caller reaches it (a page stops early), its header read only when there are
    checks."""
    for obj in objects:
        if not checks:
            if obj.path.is_file():
                yield obj
            continue
        header = header_or_none(obj.path)
        if header is not None and all(c.test(header.get(c.keyword)) for c in checks):
            yield obj


def _units(
    objects: list[StoredObject], by_series: bool, checks: Sequence[Condition]
) -> Iterator[list[StoredObject]]:
    """The matching results as the page's units, in catalog order: one per object, or one
    per series (in the order its first result was recorded) with all its matching objects."""
    if not by_series:
        yield from ([obj] for obj in _matching(objects, checks))
        return
    grouped: dict[str, list[StoredObject]] = {}
    for obj in objects:
        grouped.setdefault(obj.series_uid, []).append(obj)
    for group in grouped.values():
        kept = list(_matching(group, checks))
        if kept:
            yield kept


def _element(ds: Dataset, keyword: str, value: Any) -> None:
    if value is None or value in ("", []):
        tag = tag_for_keyword(keyword)
        if tag is not None:
            ds.add_new(tag, dictionary_VR(tag), None)
        return
    setattr(ds, keyword, value)


def _copy(target: Dataset, source: Dataset | None, keywords: Iterable[str]) -> None:
    for keyword in keywords:
        if keyword in target:
            continue
        element = source.data_element(keyword) if source is not None and keyword in source else None
        if element is not None:
            target.add(element)
        else:
            _element(target, keyword, None)


def _header_all(source: Dataset | None) -> list[str]:
    """Every top-level keyword of a header, less file meta and bulk binary values."""
    if source is None:
        return []
    return [
        e.keyword for e in source if e.keyword and e.tag.group != 0x0002 and e.VR not in _BULK_VRS
    ]


class _Studies:
    def __init__(self, archive: Archive, session: Session, query: Query, base_url: str) -> None:
        self.archive, self.session, self.query, self.base = archive, session, query, base_url

    def page(self) -> Page:
        window = _Window.of(self.query)
        stmt = select(Study).where(*_study_filters(self.query)).order_by(Study.id)
        for condition in self.query.of(["ModalitiesInStudy"]):
            stmt = stmt.where(self._modalities_match(condition))
        rows = list(self.session.scalars(stmt.offset(window.offset).limit(window.size + 1)))
        more = len(rows) > window.size
        rows = rows[: window.size]
        produced = self._produced(Study.id.in_([s.id for s in rows]))
        counts = self._received_counts([s.id for s in rows])
        items = [self._item(study, counts, produced.get(study.id, [])) for study in rows]
        return Page(items, more and window.cut_by_node)

    def _modalities_match(self, condition: Condition) -> ColumnElement[bool]:
        received = (
            select(Series.study_id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.modality.in_(condition.values()), received_visible())
        )
        # only the results of studies the other keys match: their headers are read
        studies = {
            study_id
            for study_id, objects in self._produced(*_study_filters(self.query)).items()
            if any(condition.test(_modality(o)) for o in objects)
        }
        return or_(Study.id.in_(received), Study.id.in_(studies))

    def _produced(self, *where: ColumnElement[bool]) -> dict[int, list[StoredObject]]:
        """The visible results of the studies ``where`` selects, by study row."""
        stmt = (
            select(Result, Study.study_uid, Study.id)
            .join(Job, Result.job_id == Job.id)
            .join(Study, Job.study_id == Study.id)
            .where(result_visible(), Result.sop_instance_uid.is_not(None), *where)
            .order_by(Result.id)
        )
        rows = list(self.session.execute(stmt))
        found = [self.archive.produced(result, study_uid) for result, study_uid, _ in rows]
        served = {id(o) for o in not_received(self.session, [o for o in found if o is not None])}
        out: dict[int, list[StoredObject]] = {}
        for obj, (_, _, study_id) in zip(found, rows, strict=True):
            if obj is not None and id(obj) in served:
                out.setdefault(study_id, []).append(obj)
        return out

    def _received_counts(self, study_ids: list[int]) -> dict[int, tuple[int, int, set[str]]]:
        out: dict[int, tuple[int, int, set[str]]] = {}
        stmt = (
            select(Series.study_id, Series.modality, func.count(Instance.id))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(study_ids), received_visible())
            .group_by(Series.study_id, Series.id, Series.modality)
        )
        for study_id, modality, instances in self.session.execute(stmt):
            series, total, modalities = out.get(study_id, (0, 0, set()))
            out[study_id] = (
                series + 1,
                total + instances,
                modalities | ({modality} if modality else set()),
            )
        return out

    def _item(
        self,
        study: Study,
        counts: dict[int, tuple[int, int, set[str]]],
        produced: list[StoredObject],
    ) -> dict[str, Any]:
        series, instances, modalities = counts.get(study.id, (0, 0, set()))
        produced_series = {o.series_uid for o in produced}
        modalities |= {m for m in map(_modality, produced) if m}
        ds = Dataset()
        _element(ds, "SpecificCharacterSet", CHARSET)
        _element(ds, "StudyInstanceUID", study.study_uid)
        _element(ds, "StudyDate", study.study_date)
        _element(ds, "StudyTime", study.study_time)
        _element(ds, "AccessionNumber", study.accession_number)
        _element(ds, "PatientName", study.patient_name)
        _element(ds, "PatientID", study.patient_id)
        _element(ds, "IssuerOfPatientID", study.issuer_of_patient_id)
        _element(ds, "StudyDescription", study.study_description)
        _element(ds, "ModalitiesInStudy", sorted(modalities))
        _element(ds, "NumberOfStudyRelatedSeries", series + len(produced_series))
        _element(ds, "NumberOfStudyRelatedInstances", instances + len(produced))
        _element(ds, "RetrieveURL", f"{self.base}/studies/{study.study_uid}")
        extra = set(self.query.include) - set(STUDY_DEFAULT)
        if self.query.include_all:
            extra |= set(STUDY_ALL)
        if extra:
            _copy(ds, self._first_header(study.id, produced), sorted(extra))
        return ds.to_json_dict()

    def _first_header(self, study_id: int, produced: list[StoredObject]) -> Dataset | None:
        path = self.session.scalar(
            select(Instance.path)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study_id, received_visible())
            .order_by(Instance.id)
            .limit(1)
        )
        if path is not None:
            return header_or_none(self.archive.spool.path(path))
        return header_or_none(produced[0].path) if produced else None


def _same(header: Dataset | None) -> Dataset | None:
    return header


def _modality(obj: StoredObject) -> str | None:
    header = header_or_none(obj.path)
    value = header.get("Modality") if header is not None else None
    return str(value) if value else None


class _Lower:
    """Series and instance searches: received rows from SQL, then the matching results."""

    def __init__(self, archive: Archive, session: Session, query: Query, base_url: str) -> None:
        self.archive, self.session, self.query, self.base = archive, session, query, base_url
        self.series_level = query.level is Level.SERIES
        if query.of(["ModalitiesInStudy"]):
            raise QueryError("ModalitiesInStudy is a matching key of study searches only")

    def _received_stmt(self) -> Select[Any]:
        query = self.query
        entity: Any = Series if self.series_level else Instance
        stmt = select(entity, Series.series_uid, Study).join(Study, Series.study_id == Study.id)
        if not self.series_level:
            stmt = (
                select(Instance, Series.series_uid, Study)
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
            )
        stmt = stmt.where(*_study_filters(query))
        if self.series_level:
            # a series the node holds only rejected results' received copies of is not listed
            served = select(Instance.series_id).where(received_visible())
            withdrawn = select(Instance.series_id).where(~received_visible())
            stmt = stmt.where(or_(Series.id.in_(served), Series.id.not_in(withdrawn)))
        else:
            stmt = stmt.where(received_visible())
        for condition in query.of(SERIES_KEYS):
            stmt = stmt.where(condition.sql(_SERIES_COLUMNS[condition.keyword]))
        for condition in query.of(INSTANCE_KEYS):
            stmt = stmt.where(condition.sql(_INSTANCE_COLUMNS[condition.keyword]))
        if query.series_uid is not None:
            stmt = stmt.where(Series.series_uid == query.series_uid)
        order = [Series.id] if self.series_level else [Series.id, Instance.id]
        return stmt.order_by(*order)

    def page(self) -> Page:
        window = _Window.of(self.query)
        stmt = self._received_stmt()
        total = int(self.session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
        rows = list(self.session.execute(stmt.offset(window.offset).limit(window.size)))
        produced = _produced(self.archive, self.session, self.query)
        start = max(0, window.offset - total)
        room = window.size - len(rows)
        # the results' files are looked at up to the end of the page (one more: is there more?)
        wanted = start + room + (1 if window.cut_by_node else 0)
        units = _units(produced, self.series_level, _header_checks(self.query))
        produced_units = list(itertools.islice(units, wanted))
        extra = produced_units[start : start + room]
        more = total + len(produced_units) > window.offset + window.size
        if self.series_level:
            items = self._series_items(rows, extra)
        else:
            items = self._instance_items(rows, extra)
        return Page(items, more and window.cut_by_node)

    def _study_part(self, ds: Dataset, study: Study) -> None:
        _element(ds, "SpecificCharacterSet", CHARSET)
        _element(ds, "StudyInstanceUID", study.study_uid)
        wanted = set(self.query.include) & set(_STUDY_COLUMNS)
        for keyword in sorted(wanted):
            _element(ds, keyword, getattr(study, _STUDY_COLUMNS[keyword].key))

    def _extras(
        self, ds: Dataset, header: Callable[[], Dataset | None], level_all: Sequence[str]
    ) -> None:
        extra = set(self.query.include) - set(ds.dir()) - {"SpecificCharacterSet"}
        if self.query.include_all:
            source = header()
            extra |= set(level_all) if self.series_level else set(_header_all(source))
            _copy(ds, source, sorted(extra - set(ds.dir())))
        elif extra - set(ds.dir()):
            _copy(ds, header(), sorted(extra - set(ds.dir())))

    def _series_items(
        self, rows: list[Any], produced: list[list[StoredObject]]
    ) -> list[dict[str, Any]]:
        counts = dict(
            self.session.execute(
                select(Instance.series_id, func.count(Instance.id))
                .where(Instance.series_id.in_([r[0].id for r in rows]), received_visible())
                .group_by(Instance.series_id)
            ).all()
        )
        studies = self._studies_of(produced)
        items = []
        for series, series_uid, study in rows:
            ds = Dataset()
            self._study_part(ds, study)
            _element(ds, "SeriesInstanceUID", series_uid)
            _element(ds, "Modality", series.modality)
            _element(ds, "SeriesNumber", series.series_number)
            _element(ds, "SeriesDescription", series.series_description)
            _element(ds, "NumberOfSeriesRelatedInstances", counts.get(series.id, 0))
            _element(ds, "RetrieveURL", self._url(study.study_uid, series_uid))
            self._extras(ds, functools.partial(self._first_of_series, series.id), SERIES_ALL)
            items.append(ds.to_json_dict())
        for objects in produced:
            first = objects[0]
            header = header_or_none(first.path)
            ds = Dataset()
            self._study_part(ds, studies[first.study_uid])
            _element(ds, "SeriesInstanceUID", first.series_uid)
            _copy(ds, header, ["Modality", "SeriesNumber", "SeriesDescription"])
            _element(ds, "NumberOfSeriesRelatedInstances", len(objects))
            _element(ds, "RetrieveURL", self._url(first.study_uid, first.series_uid))
            self._extras(ds, functools.partial(_same, header), SERIES_ALL)
            items.append(ds.to_json_dict())
        return items

    def _instance_items(
        self, rows: list[Any], produced: list[list[StoredObject]]
    ) -> list[dict[str, Any]]:
        studies = self._studies_of(produced)
        objects = [self.archive.received(i, s, study.study_uid) for i, s, study in rows]
        pairs = [(o, study) for o, (_, _, study) in zip(objects, rows, strict=True)]
        pairs += [(unit[0], studies[unit[0].study_uid]) for unit in produced]
        items = []
        for obj, study in pairs:
            header = header_or_none(obj.path)
            ds = Dataset()
            self._study_part(ds, study)
            _element(ds, "SeriesInstanceUID", obj.series_uid)
            _element(ds, "SOPClassUID", obj.sop_class_uid)
            _element(ds, "SOPInstanceUID", obj.sop_instance_uid)
            if obj.produced:
                _copy(ds, header, ["InstanceNumber"])
            else:
                _element(ds, "InstanceNumber", obj.instance_number)
            _element(ds, "InstanceAvailability", "ONLINE")
            _copy(ds, header, ["Rows", "Columns", "BitsAllocated", "NumberOfFrames"])
            for keyword in set(self.query.include) & set(SERIES_KEYS):
                _copy(ds, header, [keyword])
            url = self._url(obj.study_uid, obj.series_uid, obj.sop_instance_uid)
            _element(ds, "RetrieveURL", url)
            self._extras(ds, functools.partial(_same, header), ())
            items.append(ds.to_json_dict())
        return items

    def _studies_of(self, produced: list[list[StoredObject]]) -> dict[str, Study]:
        uids = {unit[0].study_uid for unit in produced}
        found = self.session.scalars(select(Study).where(Study.study_uid.in_(uids)))
        return {s.study_uid: s for s in found}

    def _first_of_series(self, series_id: int) -> Dataset | None:
        path = self.session.scalar(
            select(Instance.path)
            .where(Instance.series_id == series_id, received_visible())
            .order_by(Instance.id)
            .limit(1)
        )
        return header_or_none(self.archive.spool.path(path)) if path is not None else None

    def _url(self, study_uid: str, series_uid: str, sop_instance_uid: str | None = None) -> str:
        url = f"{self.base}/studies/{study_uid}/series/{series_uid}"
        return url if sop_instance_uid is None else f"{url}/instances/{sop_instance_uid}"
