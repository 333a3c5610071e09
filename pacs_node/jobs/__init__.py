"""What runs the node's jobs, behind one seam (:class:`JobQueue`)."""

from __future__ import annotations

from pacs_node.catalog.db import Catalog
from pacs_node.config import Settings
from pacs_node.jobs.local import LocalJobQueue
from pacs_node.jobs.queue import JobQueue, QueueHealth

__all__ = ["JobQueue", "LocalJobQueue", "QueueHealth", "open_job_queue"]


def open_job_queue(catalog: Catalog, settings: Settings) -> JobQueue:
    """The node's runner of jobs: worker processes of its own, or Celery workers (``job_queue:
    celery``; Celery is imported only then)."""
    if settings.node.job_queue == "celery":
        from pacs_node.jobs.celery_queue import CeleryJobQueue

        return CeleryJobQueue(catalog, settings)
    return LocalJobQueue(catalog, settings)
