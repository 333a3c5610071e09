"""Accounts and the web face's credentials, through real HTTP requests."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pacs_node.catalog.models import Role, utcnow
from pacs_node.services import accounts
from pacs_node.services.accounts import AccountError, LoginRefused, Principal
from tests.web_node import PASSWORD, SETUP, WebNode, web_node

__all__ = ["web_node"]


def test_health_is_open_and_readiness_checks_the_catalog(web_node: WebNode) -> None:
    with web_node.client(role=None) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"catalog": "ok"}


def test_the_openapi_document_is_served_to_signed_in_users_only(web_node: WebNode) -> None:
    with web_node.client(role=None) as client:
        assert client.get("/api/openapi.json").status_code == 401
        assert client.get("/api/docs").status_code in (401, 404)  # no page loading a CDN
    with web_node.client(Role.VIEWER) as client:
        document = client.get("/api/openapi.json")
    assert document.status_code == 200
    assert document.json()["info"]["title"] == "pacs-node"


def test_password_is_hashed_and_checked(web_node: WebNode) -> None:
    catalog = web_node.catalog
    accounts.create_user(catalog, "alice", Role.OPERATOR, PASSWORD, SETUP)
    found = accounts.authenticate_password(catalog, "alice", PASSWORD)
    assert isinstance(found, Principal)
    assert found.role is Role.OPERATOR
    assert found.may(Role.VIEWER)
    assert found.may(Role.OPERATOR)
    assert not found.may(Role.ADMIN)
    assert isinstance(accounts.authenticate_password(catalog, "alice", "wrong"), LoginRefused)
    assert isinstance(accounts.authenticate_password(catalog, "nobody", PASSWORD), LoginRefused)
    with catalog.sessions() as session:
        from pacs_node.catalog.models import User

        stored = session.query(User).filter_by(name="alice").one().password_hash
    assert stored is not None
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


def test_repeated_failures_lock_the_account_for_a_while(web_node: WebNode) -> None:
    catalog = web_node.catalog
    accounts.create_user(catalog, "bob", Role.VIEWER, PASSWORD, SETUP)
    now = utcnow()
    for _ in range(accounts.LOCK_AFTER_FAILURES):
        refused = accounts.authenticate_password(catalog, "bob", "guess", now)
        assert isinstance(refused, LoginRefused)
    assert refused.locked_until is not None
    assert refused.locked_until > now
    # the right password is refused while the lock lasts, and works after it
    locked = accounts.authenticate_password(catalog, "bob", PASSWORD, now)
    assert isinstance(locked, LoginRefused)
    assert locked.locked_until is not None
    later = now + accounts.LOCK_FIRST + timedelta(seconds=1)
    assert isinstance(accounts.authenticate_password(catalog, "bob", PASSWORD, later), Principal)


def test_short_passwords_and_odd_names_are_refused(web_node: WebNode) -> None:
    with pytest.raises(AccountError, match="at least"):
        accounts.create_user(web_node.catalog, "carol", Role.VIEWER, "short", SETUP)
    with pytest.raises(AccountError, match="invalid user name"):
        accounts.create_user(web_node.catalog, "a b", Role.VIEWER, PASSWORD, SETUP)


def test_tokens_act_as_their_user_until_revoked(web_node: WebNode) -> None:
    catalog = web_node.catalog
    accounts.create_user(catalog, "script", Role.VIEWER, PASSWORD, SETUP)
    token = accounts.create_token(catalog, "script", "nightly", SETUP)
    found = accounts.authenticate_token(catalog, token)
    assert found is not None
    assert found.name == "script"
    assert accounts.authenticate_token(catalog, token + "x") is None
    assert accounts.revoke_token(catalog, "script", "nightly", SETUP) == 1
    assert accounts.authenticate_token(catalog, token) is None


def test_a_password_to_change_opens_no_dicomweb_door_over_basic(web_node: WebNode) -> None:
    accounts.create_user(
        web_node.catalog, "firstadmin", Role.ADMIN, PASSWORD, SETUP, must_change_password=True
    )
    with web_node.client(role=None) as client:
        answer = client.get("/dicomweb/studies", auth=("firstadmin", PASSWORD))
        assert answer.status_code == 403
        accounts.set_password(web_node.catalog, "firstadmin", PASSWORD + "!", SETUP)
        answer = client.get("/dicomweb/studies", auth=("firstadmin", PASSWORD + "!"))
        assert answer.status_code == 200
