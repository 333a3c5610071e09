"""The node's exception hierarchy.

::

    PacsNodeError
    ├── ConfigError             a config file or env var is wrong; names file, key and reason
    ├── CatalogError            the catalog database cannot be opened or migrated
    ├── StartError              a part of the node (a door) cannot start; the node stops again
    ├── RequestError            a door's request cannot be done: no such study, nothing fits
    │   ├── NotFound                the study (or job, delivery) it names is not in the catalog
    │   └── MalformedBody           a STOW-RS body is not a readable multipart/related message
    ├── VolumeError             a series cannot become one Volume (tilt, gaps, mixed geometry, ...)
    ├── ResultsError            results cannot be built from this Volume + Labelmap (grid mismatch,
    │                           nothing to encode, a source the standard objects cannot reference)
    ├── ModelError              segmentation cannot run
    │   ├── BundleError             a model bundle is malformed; names file, key and reason
    │   ├── UnknownModel            no bundle of that name under the models folder
    │   ├── UnsuitableInput         the model cannot take this series (modality, too few slices)
    │   └── SeriesChoiceError       the paths given hold no series, or several and none was chosen
    ├── DeliveryError           a result cannot be delivered now (dispatch; the outbox decides)
    │   ├── TransientDelivery       worth retrying: peer down, timeout, busy, 5xx
    │   └── PermanentDelivery       retrying will not help: refused SOP class, 4xx
    └── IngestError             an instance received over the network cannot be stored
        ├── UnreadableDataset       the bytes do not parse as a DICOM data set
        ├── MissingAttribute        a required UID is absent or empty
        ├── InvalidUID              a UID is not a valid DICOM UID
        ├── DataSetMismatch         the data set does not match the presentation context / command
        ├── OutOfResources          the spool cannot hold it (disk full, quota, I/O error)
        │   └── StudyBeingRemoved       retention is removing its study right now: send it later
        ├── IdentityConflict        its UIDs or patient collide with what the catalog holds
        └── ResendRefused           a re-sent SOP Instance brings other bytes (resend_policy)

Errors from pydicom, pynetdicom or SQLAlchemy are translated at the boundary with
``raise ... from exc``; DIMSE statuses are chosen from these classes in one table
(:mod:`pacs_node.ingest.statuses`).
"""

from __future__ import annotations


class PacsNodeWarning(UserWarning):
    """Warnings the node itself emits (tests turn them into errors)."""


class PacsNodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(PacsNodeError):
    """A configuration value is wrong; the node refuses to start."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}")


class CatalogError(PacsNodeError):
    """The catalog cannot be opened, migrated or written."""


class StartError(PacsNodeError):
    """A part of the node cannot start (the web server stopped while starting); what had
    started is stopped again, so the user gets this one line and no process is left behind."""


class RequestError(PacsNodeError):
    """A request through a door (CLI, web) cannot be done as asked; the message says why."""


class NotFound(RequestError):
    """What a request names is not in the catalog (a door answers 404)."""


class MalformedBody(RequestError):
    """A STOW-RS body is not a readable multipart/related message (PS3.18: 400 Bad Request);
    the parts stored before it broke stay stored."""


class VolumeError(PacsNodeError):
    """A series cannot become one Volume; the message says why (the job fails, not the node)."""


class ModelError(PacsNodeError):
    """Segmentation cannot run: the bundle, the input or the runtime is at fault."""


class BundleError(ModelError):
    """A model bundle is malformed; it is refused when the registry loads it, not mid-job."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}")


class UnknownModel(ModelError):
    """No bundle of the requested name exists under the models folder."""


class UnsuitableInput(ModelError):
    """The series is not what the model takes (wrong modality, too few slices, 2D for a 3D model);
    the job fails with this reason, the node goes on."""


class SeriesChoiceError(ModelError):
    """The files given to ``segment`` hold no series, or several and none was chosen."""


class ResultsError(PacsNodeError):
    """A Volume + Labelmap cannot become result objects; the job fails with this reason."""


class DeliveryError(PacsNodeError):
    """Delivering to one destination failed; the subclass says whether to retry."""


class TransientDelivery(DeliveryError):
    """The destination may take it later: backoff and retry, dead letter after the limit."""


class PermanentDelivery(DeliveryError):
    """The destination refuses it for good: dead letter now, kept and listed."""


class IngestError(PacsNodeError):
    """An instance cannot be stored; the association goes on."""


class UnreadableDataset(IngestError):
    """The received bytes are not a parseable DICOM data set."""


class MissingAttribute(IngestError):
    """A required attribute (a UID) is absent or empty."""


class InvalidUID(IngestError):
    """A UID breaks the DICOM UID rules (PS3.5 9.1) and cannot name a file."""


class DataSetMismatch(IngestError):
    """The data set's SOP Class / Instance does not match the request or context."""


class OutOfResources(IngestError):
    """The spool cannot take the instance now (disk full, I/O error)."""


class StudyBeingRemoved(OutOfResources):
    """Retention is removing the study this instance belongs to; it is refused before the answer
    (a sender retries later and the instance then starts a new study)."""


class IdentityConflict(IngestError):
    """The instance's Study, Series or SOP Instance UID, or its patient, collides with what the
    catalog holds (see :mod:`pacs_node.ingest.identity`)."""


class ResendRefused(IngestError):
    """A SOP Instance UID held already came again with other bytes (``resend_policy: reject``)."""
