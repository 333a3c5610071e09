"""What routing decides for a study's series facts: the outcome and the jobs, as pure data.

The router queues these jobs on a stable study; ``pacs-node routes test`` prints them for files
on a disk. Both decide here, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pacs_node.catalog.models import RouteOutcome
from pacs_node.destinations import SOURCE
from pacs_node.outputs import SENT_TO_SOURCE, route_key
from pacs_node.routing.rules import OnChange, RoutesFile, RuleVerdict, SeriesFacts, route

DEFAULT_SEND: dict[str, tuple[str, ...]] = {route_key(kind): (SOURCE,) for kind in SENT_TO_SOURCE}


@dataclass(frozen=True)
class PlannedJob:
    """One job routing queues: a rule's model on the series it selected."""

    rule: str
    model: str
    series_uids: tuple[str, ...]
    send: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Plan:
    outcome: RouteOutcome
    verdicts: tuple[RuleVerdict, ...]
    jobs: tuple[PlannedJob, ...]


def plan_study(
    routes: RoutesFile, facts: Sequence[SeriesFacts], processed_by: frozenset[str] = frozenset()
) -> Plan:
    """Every rule's verdict, and one job per (matched rule, model); ``processed_by``: the rules
    that queued jobs for this study before (a rule with ``on_change: ignore`` queues no more)."""
    verdicts = tuple(route(routes, facts))
    if facts and all(f.produced_by_node for f in facts):
        return Plan(RouteOutcome.OWN_OUTPUT, verdicts, ())
    rules = {rule.name: rule for rule in routes.rules}
    jobs: list[PlannedJob] = []
    for verdict in verdicts:
        rule = rules[verdict.rule]
        if not verdict.matched or (rule.name in processed_by and rule.on_change is OnChange.IGNORE):
            continue
        send = rule.send or DEFAULT_SEND
        jobs.extend(PlannedJob(rule.name, model, verdict.selected, send) for model in rule.models)
    if jobs:
        outcome = RouteOutcome.ROUTED
    elif any(v.matched for v in verdicts):
        outcome = RouteOutcome.IGNORED
    else:
        outcome = RouteOutcome.UNROUTED
    return Plan(outcome, verdicts, tuple(jobs))
