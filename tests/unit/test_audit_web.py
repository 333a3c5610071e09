"""The audit trail at the web face: searches and reads of patient data, refused credentials,
operator changes and account changes are audited; ``/api/audit`` is for admins and its own read
is audited; every stored message is a valid PS3.15 AuditMessage."""

from __future__ import annotations

from pacs_node.audit.message import validate
from pacs_node.catalog.audit import list_events
from pacs_node.catalog.models import Role
from tests.api_node import Populated, api_node

__all__ = ["api_node"]


def test_web_reads_searches_and_changes_are_audited(api_node: Populated) -> None:
    a = api_node.studies["a"]
    with api_node.web.client(Role.OPERATOR) as operator:
        assert operator.get("/api/studies", params={"patient_id": "PID-A"}).status_code == 200
        assert operator.get(f"/api/studies/{a}").status_code == 200
        assert operator.get(f"/api/studies/{a}/explain").status_code == 200  # folded: same read
        assert operator.get("/dicomweb/studies", params={"PatientID": "PID-A"}).status_code == 200
        assert operator.get(f"/dicomweb/studies/{a}/metadata").status_code == 200
        answer = operator.post(f"/api/jobs/{api_node.queued_job}/cancel")
        assert answer.status_code == 200, answer.text
        assert operator.get("/api/audit").status_code == 403  # the admin's only
    with api_node.web.client(None) as anonymous:
        refused = anonymous.get("/api/studies", headers={"Authorization": "Bearer nonsense"})
        assert refused.status_code == 401
        # a password typed into the name field is never kept; an account's name is
        for name in ("s3cret-typed-as-name", "test-operator"):
            basic = anonymous.get("/dicomweb/studies", auth=(name, "wrong"))
            assert basic.status_code == 401
    with api_node.web.client(Role.ADMIN) as admin:
        assert admin.get("/api/audit", params={"since": "yesterday"}).status_code == 422
        listed = admin.get("/api/audit", params={"since": "1h"})
        assert listed.status_code == 200, listed.text
        page = listed.json()
        assert page["truncated"] is False
        events = page["events"]
        first = admin.get("/api/audit", params={"after_id": 0, "limit": 2}).json()
        assert first["truncated"] is True
        assert [e["id"] for e in first["events"]] == [1, 2]
    seen = [(e["event_id"], e["event_type"], e["actor"], e["outcome"]) for e in events]
    operator_name = "user:test-operator"
    assert ("110112", None, operator_name, 0) in seen  # API search and QIDO-RS
    assert sum(1 for s in seen if s[:3] == ("110112", None, operator_name)) == 2
    reads = [e for e in events if e["event_id"] == "110103" and e["actor"] == operator_name]
    assert {e["description"] for e in reads} >= {
        "api",
        "wado",
        f"cancel (job {api_node.queued_job})",
    }
    assert sum(1 for e in reads if e["description"] == "api") == 1
    assert f"study:{a}" in reads[0]["participants"]
    assert "patient:PID-A" in reads[0]["participants"]
    assert ("110114", "110122", "unknown user", 4) in seen  # the refused token
    assert ("110114", "110122", "test-operator", 4) in seen
    assert not any("s3cret" in str(e) for e in events)
    assert ("110113", "110136", "user:test-setup", 0) in seen  # the test's users were made
    assert ("110113", "110137", "user:test-setup", 0) in seen  # ... with tokens
    assert seen[-1][:3] == ("110101", None, "user:test-admin")
    with api_node.web.catalog.sessions() as session:
        for row in list_events(session).rows:
            validate(row.message.encode())
