"""``pacs-node results release|reject|accept``: an operator's decision on a result, held by the
quality gate or already sent (see :mod:`pacs_node.services.corrections`)."""

from __future__ import annotations

from typing import Annotated

import typer

from pacs_node.cli.common import ConfigOption, change, opened_catalog, settings_for, user
from pacs_node.cli.console import FAILED, err, fail
from pacs_node.errors import RequestError

results_app = typer.Typer(
    help="Results held by the quality gate: release (send) or reject them. ID is the job id "
    "(see `pacs-node jobs`): the gate judges a job's whole result, so all its objects go or "
    "none. Reject and accept also take a result that has gone out (IOCM rejection note, FHIR "
    "entered-in-error).",
    no_args_is_help=True,
)
ActorOption = Annotated[
    str,
    typer.Option("--actor", help="Who decides, for the job's events (default: the login name)."),
]
HeldJobArgument = Annotated[int, typer.Argument(help="Job ID whose result is held.")]


@results_app.command("release")
def results_release(
    job_id: HeldJobArgument, actor: ActorOption = "", config: ConfigOption = None
) -> None:
    """Send a result the quality gate held: its deliveries become due now."""
    from pacs_node.services.deliveries import release_result

    try:
        count = change(config, lambda catalog: release_result(catalog, job_id, user(actor)))
    except RequestError as exc:  # the job is not done; a newer result has gone out
        fail(str(exc), FAILED)
    _decided(job_id, count, "released")


@results_app.command("reject")
def results_reject(
    job_id: Annotated[int, typer.Argument(help="Job ID whose result is rejected.")],
    actor: ActorOption = "",
    reason: Annotated[str, typer.Option("--reason", help="Why, for the job's events.")] = "",
    patient_safety: Annotated[
        bool,
        typer.Option(
            "--patient-safety",
            help="The result belongs to another patient: 'Rejected for Patient Safety "
            "Reasons' (113037, DCM) instead of 'Rejected for Quality Reasons' (113001, DCM).",
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Reject a job's result, held or already sent.

    What is not sent never will be; a PACS that got its objects gets an IOCM rejection note,
    an EHR that got its report sees it entered-in-error.
    """
    from pacs_node.review import RejectionKind
    from pacs_node.services.corrections import reject_results

    kind = RejectionKind.PATIENT_SAFETY if patient_safety else RejectionKind.QUALITY
    settings = settings_for(config)
    with opened_catalog(settings, migrate=True) as catalog:
        try:
            done = reject_results(catalog, settings, job_id, user(actor), reason, kind)
        except RequestError as exc:  # unknown, not done, rejected already
            fail(str(exc), FAILED)
    err.print(f"job {job_id}: {done.stopped} deliveries rejected", highlight=False)
    if done.dicom_destinations:
        names = ", ".join(done.dicom_destinations)
        err.print(f"rejection note ({kind.meaning}) queued to {names}", highlight=False)
    if done.fhir_destinations:
        names = ", ".join(done.fhir_destinations)
        err.print(f"report entered-in-error queued to {names}", highlight=False)
    if done.fhir_kept:
        names = ", ".join(done.fhir_kept)
        err.print(f"the report at {names} holds a newer result: left as it is", highlight=False)
    if done.not_withdrawn:
        names = ", ".join(done.not_withdrawn)
        err.print(
            f"nothing could be withdrawn from {names}: a stored result cannot be read (see the "
            "log); withdraw it there by hand",
            highlight=False,
        )


@results_app.command("accept")
def results_accept(
    job_id: Annotated[int, typer.Argument(help="Job ID whose result is judged right.")],
    actor: ActorOption = "",
    config: ConfigOption = None,
) -> None:
    """Accept a job's result (a held one is sent now).

    Recorded as a job event; the model's review counts count it.
    """
    from pacs_node.services.corrections import accept_results

    try:
        done = change(config, lambda catalog: accept_results(catalog, job_id, user(actor)).released)
    except RequestError as exc:
        fail(str(exc), FAILED)
    suffix = f"; {done} held deliveries released" if done else ""
    err.print(f"job {job_id}: accepted{suffix}", highlight=False)


def _decided(job_id: int, count: int, verb: str) -> None:
    if not count:
        fail(f"job {job_id}: no result held by the quality gate", FAILED)
    err.print(f"job {job_id}: {count} deliveries {verb}", highlight=False)
