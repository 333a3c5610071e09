"""Searches with filters and paging, newest first: studies, jobs and deliveries as a door lists
them one page at a time, with the total the filters match (so a client can page)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, func, select

from pacs_node.catalog import deliveries as delivery_rows
from pacs_node.catalog import jobs as job_rows
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.deliveries import DeliverySummary
from pacs_node.catalog.jobs import JobSummary
from pacs_node.catalog.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Series,
    Study,
    StudyState,
)
from pacs_node.catalog.studies import StudySummary
from pacs_node.catalog.studies import list_studies as study_summaries

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a search: its items, and how many the filters match in all."""

    items: list[T]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True, slots=True)
class StudyQuery:
    """What a study search may filter on; None (or empty) leaves a filter out. Text filters
    match case-insensitively: ``patient_name`` anywhere in the name, the others whole.
    Study dates are DICOM DA (YYYYMMDD), the range inclusive."""

    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date_from: str | None = None
    study_date_to: str | None = None
    modality: str | None = None
    states: Collection[str] = ()


def _page_ids(catalog: Catalog, ids: Select[int], limit: int, offset: int) -> tuple[list[int], int]:
    """The ids of one page of ``ids`` (ordered already) and the count of all."""
    with catalog.sessions() as session:
        total = session.scalar(select(func.count()).select_from(ids.order_by(None).subquery()))
        page = list(session.scalars(ids.limit(limit).offset(offset)))
    return page, int(total or 0)


def _in_order(found: Sequence[Any], keys: Sequence[Any], key: str) -> list[Any]:
    """``found`` in the order of ``keys`` (the page's order), by the attribute ``key``."""
    by_key = {getattr(item, key): item for item in found}
    return [by_key[k] for k in keys if k in by_key]


def search_studies(
    catalog: Catalog, query: StudyQuery, limit: int, offset: int
) -> Page[StudySummary]:
    """Studies matching ``query``, the most recently received first."""
    ids = select(Study.id).order_by(Study.first_received_at.desc(), Study.id.desc())
    if query.patient_id:
        ids = ids.where(func.lower(Study.patient_id) == query.patient_id.lower())
    if query.patient_name:
        ids = ids.where(Study.patient_name.icontains(query.patient_name, autoescape=True))
    if query.accession_number:
        ids = ids.where(func.lower(Study.accession_number) == query.accession_number.lower())
    if query.study_date_from:
        ids = ids.where(Study.study_date >= query.study_date_from)
    if query.study_date_to:
        ids = ids.where(Study.study_date <= query.study_date_to)
    if query.modality:
        with_modality = select(Series.study_id).where(
            func.upper(Series.modality) == query.modality.upper()
        )
        ids = ids.where(Study.id.in_(with_modality))
    if query.states:
        ids = ids.where(Study.state.in_([StudyState(s) for s in query.states]))
    page, total = _page_ids(catalog, ids, limit, offset)
    with catalog.sessions() as session:
        uids = dict(
            session.execute(select(Study.id, Study.study_uid).where(Study.id.in_(page))).all()
        )
        found = study_summaries(session, list(uids.values())) if page else []
    ordered = _in_order(found, [uids[i] for i in page if i in uids], "study_uid")
    return Page(ordered, total, limit, offset)


def study_exists(catalog: Catalog, study_uid: str) -> bool:
    with catalog.sessions() as session:
        found = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
    return found is not None


def search_jobs(
    catalog: Catalog,
    limit: int,
    offset: int,
    *,
    states: Collection[str] = (),
    study_uid: str | None = None,
    model: str | None = None,
) -> Page[JobSummary]:
    """Jobs in ``states`` (all when empty), of one study or model when given, newest first."""
    ids = select(Job.id).order_by(Job.id.desc())
    if states:
        ids = ids.where(Job.state.in_([JobState(s) for s in states]))
    if study_uid:
        ids = ids.where(Job.study_id.in_(select(Study.id).where(Study.study_uid == study_uid)))
    if model:
        ids = ids.where(Job.model == model)
    page, total = _page_ids(catalog, ids, limit, offset)
    with catalog.sessions() as session:
        found = job_rows.list_jobs(session, page) if page else []
    return Page(_in_order(found, page, "id"), total, limit, offset)


def find_job(catalog: Catalog, job_id: int) -> JobSummary | None:
    with catalog.sessions() as session:
        found = job_rows.list_jobs(session, [job_id])
    return found[0] if found else None


def search_deliveries(
    catalog: Catalog,
    limit: int,
    offset: int,
    *,
    states: Collection[str] = (),
    destination: str | None = None,
) -> Page[DeliverySummary]:
    """Deliveries in ``states`` (all when empty), to one destination when given, newest first."""
    ids = select(Delivery.id).order_by(Delivery.id.desc())
    if states:
        ids = ids.where(Delivery.state.in_([DeliveryState(s) for s in states]))
    if destination:
        ids = ids.where(Delivery.destination == destination)
    page, total = _page_ids(catalog, ids, limit, offset)
    with catalog.sessions() as session:
        found = delivery_rows.list_deliveries(session, ids=page) if page else []
    return Page(_in_order(found, page, "id"), total, limit, offset)


def find_delivery(catalog: Catalog, delivery_id: int) -> DeliverySummary | None:
    with catalog.sessions() as session:
        found = delivery_rows.list_deliveries(session, ids=[delivery_id])
    return found[0] if found else None
