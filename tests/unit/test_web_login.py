"""Signing in, sessions, CSRF on forms, the forced password change, the slowing of failed
logins and HTTP Basic, through real HTTP requests to the web face."""

from __future__ import annotations

import base64
import logging
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import pytest
from argon2 import PasswordHasher
from fastapi import Depends
from sqlalchemy import func, select, update

from pacs_node.actor import Actor
from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.models import Role, User, WebSession, utcnow
from pacs_node.services import accounts
from pacs_node.services.accounts import Principal
from pacs_node.services.login_throttle import LoginThrottle
from pacs_node.web.accounts import local_path
from pacs_node.web.app import create_app
from pacs_node.web.auth import SESSION_COOKIE, require
from pacs_node.web.context import WebContext
from pacs_node.web.pages import page_user
from pacs_node.web.server import WebServer
from tests.conftest import free_port
from tests.web_node import PASSWORD, SETUP, WebNode, start_web_node, web_node

__all__ = ["web_node"]

NEW_PASSWORD = "a much better passphrase"
_HIDDEN = re.compile(r'name="csrf_token" value="([^"]*)"')
_META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


def _who(principal: Principal) -> dict[str, str]:
    return {"name": principal.name, "role": principal.role.value}


@contextmanager
def probe_server(node: WebNode, throttle: LoginThrottle | None = None) -> Iterator[str]:
    """The node's app over its catalog, with three routes the tests own: a page, a change only
    an operator may make, and a DICOMweb read (where HTTP Basic is accepted)."""
    context = WebContext(node.settings, node.catalog, node.spool)
    if throttle is not None:
        context.login_throttle = throttle
    app = create_app(context)

    def page(principal: Annotated[Principal, Depends(page_user())]) -> dict[str, str]:
        return _who(principal)

    def change(principal: Annotated[Principal, Depends(require(Role.OPERATOR))]) -> dict[str, str]:
        return _who(principal)

    def dicomweb(principal: Annotated[Principal, Depends(require(Role.VIEWER))]) -> dict[str, str]:
        return _who(principal)

    app.add_api_route("/probe/page", page, methods=["GET"])
    app.add_api_route("/api/probe/change", change, methods=["POST"])
    app.add_api_route("/dicomweb/probe", dicomweb, methods=["GET"])
    server = WebServer(app, "127.0.0.1", free_port())
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


@contextmanager
def node_with(tmp_path: Path, **options: Any) -> Iterator[WebNode]:
    node = start_web_node(tmp_path / "var", **options)
    try:
        yield node
    finally:
        node.server.stop()
        node.recorder.stop()
        node.catalog.dispose()


def sign_in(client: httpx.Client, name: str, password: str, next_path: str = "/") -> httpx.Response:
    """The login form as a browser fills it: its page first (for the login CSRF cookie)."""
    page = client.get("/login")
    assert page.status_code == 200
    match = _HIDDEN.search(page.text)
    assert match is not None
    form = {"name": name, "password": password, "next": next_path, "csrf_token": match[1]}
    return client.post("/login", data=form)


def page_csrf(client: httpx.Client, path: str) -> str:
    match = _META.search(client.get(path).text)
    assert match is not None
    assert match[1]
    return match[1]


def basic(name: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {value}"}


def message(response: httpx.Response) -> str:
    found = re.search(r'<p class="error" role="alert">([^<]*)</p>', response.text)
    return found[1] if found else ""


def test_login_sets_a_lax_http_only_cookie_and_redirects_only_to_local_paths(
    web_node: WebNode,
) -> None:
    web_node.user("alice", Role.OPERATOR)
    with web_node.client(role=None) as client:
        signed = sign_in(client, "alice", PASSWORD, "/api/me?x=1")
        assert signed.status_code == 303
        assert signed.headers["location"] == "/api/me?x=1"
        cookie = next(
            c for c in signed.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
        )
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "path", "max-age", "expires", "samesite"} <= attributes
        assert "samesite=lax" in cookie.lower()
        assert "path=/;" in cookie.lower() + ";"
        assert f"max-age={8 * 3600}" in cookie.lower()
        assert "secure" not in attributes  # plain http here; https gets Secure
        assert client.get("/api/me").json() == {
            "name": "alice",
            "role": "operator",
            "must_change_password": False,
        }
        first = client.cookies[SESSION_COOKIE]
        elsewhere = sign_in(client, "alice", PASSWORD, "//evil.example/x")
        assert elsewhere.status_code == 303
        assert elsewhere.headers["location"] == "/"
        assert client.cookies[SESSION_COOKIE] != first
    with web_node.client(role=None, cookies={SESSION_COOKIE: first}) as stale:
        assert stale.get("/api/me").status_code == 401  # signing in again closed it


@pytest.mark.parametrize(
    ("target", "goes_to"),
    [
        ("/studies?page=2", "/studies?page=2"),
        ("/", "/"),
        ("", "/"),
        ("https://evil.example/", "/"),
        ("//evil.example/x", "/"),
        ("/\\evil.example", "/"),
        ("/\tevil", "/"),
        ("javascript:alert(1)", "/"),
        ("studies", "/"),
        ("/login", "/"),
    ],
)
def test_only_local_paths_are_redirect_targets(target: str, goes_to: str) -> None:
    assert local_path(target) == goes_to


def test_the_login_form_needs_its_own_csrf_token_and_origin(web_node: WebNode) -> None:
    web_node.user("alice", Role.VIEWER)
    form = {"name": "alice", "password": PASSWORD, "next": "/"}
    with web_node.client(role=None) as client:
        assert client.post("/login", data={**form, "csrf_token": "x" * 43}).status_code == 403
        token = _HIDDEN.search(client.get("/login").text)
        assert token is not None
        cross = client.post(
            "/login",
            data={**form, "csrf_token": token[1]},
            headers={"Origin": "https://evil.example"},
        )
        assert cross.status_code == 403
        assert SESSION_COOKIE not in client.cookies
        assert client.post("/login", data={**form, "csrf_token": token[1]}).status_code == 303
        page = client.get("/login", params={"next": '/x"><script>alert(1)</script>'})
        assert "<script>alert" not in page.text  # a local path, and escaped where it is echoed
        assert 'value="/x&#34;&gt;&lt;script&gt;' in page.text


def test_failures_get_one_answer_and_lock_names_alike_whether_they_exist(
    tmp_path: Path,
) -> None:
    with node_with(tmp_path, login_failures_per_address=100) as node:
        node.user("bob", Role.VIEWER)
        with node.client(role=None) as client:
            wrong = sign_in(client, "bob", "not the password")
            unknown = sign_in(client, "nobody", "not the password")
            assert (wrong.status_code, unknown.status_code) == (401, 401)
            assert message(wrong) == message(unknown) == "Wrong name or password."
            assert SESSION_COOKIE not in client.cookies
            for _ in range(accounts.LOCK_AFTER_FAILURES - 1):
                wrong = sign_in(client, "bob", "not the password")
                unknown = sign_in(client, "nobody", "not the password")
            for refused in (wrong, unknown, sign_in(client, "bob", PASSWORD)):
                assert refused.status_code == 401
                text = message(refused)
                assert text.startswith("Sign-in as this name is locked until "), text
                until = datetime.strptime(text.split(" until ")[1][:23], "%Y-%m-%d %H:%M:%S UTC")
                assert until.replace(tzinfo=utcnow().tzinfo) > utcnow()
            assert SESSION_COOKIE not in client.cookies


def test_an_address_that_fails_too_often_waits_for_logins_and_basic(tmp_path: Path) -> None:
    with node_with(tmp_path, login_failures_per_address=2) as node:
        node.user("carol", Role.VIEWER)
        with node.client(role=None) as client:
            for name in ("carol", "dave"):  # one password sprayed over names
                assert sign_in(client, name, "Summer2026!").status_code == 401
            waited = sign_in(client, "carol", PASSWORD)  # the right one, left unchecked
            assert waited.status_code == 429
            assert 1 <= int(waited.headers["retry-after"]) <= 30
            assert message(waited).startswith("Too many failed sign-ins from this address.")
            assert SESSION_COOKIE not in client.cookies
        with probe_server(node, LoginThrottle(burst=2)) as url, httpx.Client(base_url=url) as pacs:
            for name in ("dave", "erin"):
                assert pacs.get("/dicomweb/probe", headers=basic(name, "x")).status_code == 401
            slowed = pacs.get("/dicomweb/probe", headers=basic("carol", PASSWORD))
            assert slowed.status_code == 429
            assert 1 <= int(slowed.headers["retry-after"]) <= 30


def test_basic_only_on_dicomweb_and_through_the_same_lock(web_node: WebNode) -> None:
    web_node.user("pacs", Role.OPERATOR)
    with probe_server(web_node) as url, httpx.Client(base_url=url) as client:
        good = client.get("/dicomweb/probe", headers=basic("pacs", PASSWORD))
        assert good.status_code == 200
        assert good.json() == {"name": "pacs", "role": "operator"}
        on_api = client.get("/api/me", headers=basic("pacs", PASSWORD))
        assert on_api.status_code == 401
        assert on_api.headers["www-authenticate"] == 'Bearer realm="pacs-node"'
        with web_node.catalog.sessions() as session:  # one failure short of the lock
            failures = accounts.LOCK_AFTER_FAILURES - 1
            session.execute(update(User).where(User.name == "pacs").values(failed_logins=failures))
            session.commit()
        bad = client.get("/dicomweb/probe", headers=basic("pacs", "guess guess guess"))
        assert bad.status_code == 401
        assert "Basic" in bad.headers["www-authenticate"]
        assert client.get("/dicomweb/probe", headers=basic("pacs", PASSWORD)).status_code == 401
    with web_node.client(role=None) as browser:
        assert "locked until" in message(sign_in(browser, "pacs", PASSWORD))


class CountingHasher(PasswordHasher):
    """argon2 as the node uses it, counting the checks."""

    checks = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        CountingHasher.checks += 1
        return super().verify(hash, password)


def test_basic_hashes_a_password_once_until_it_changes(
    web_node: WebNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accounts, "_hasher", CountingHasher())
    CountingHasher.checks = 0
    web_node.user("orthanc", Role.OPERATOR)
    with probe_server(web_node) as url, httpx.Client(base_url=url) as pacs:
        for _ in range(3):  # every DICOMweb request carries the password again
            assert pacs.get("/dicomweb/probe", headers=basic("orthanc", PASSWORD)).is_success
        assert CountingHasher.checks == 1
        accounts.set_password(web_node.catalog, "orthanc", NEW_PASSWORD, SETUP)
        assert pacs.get("/dicomweb/probe", headers=basic("orthanc", PASSWORD)).status_code == 401
        assert pacs.get("/dicomweb/probe", headers=basic("orthanc", NEW_PASSWORD)).is_success


def test_form_posts_need_the_session_csrf_token(web_node: WebNode) -> None:
    web_node.user("frank", Role.OPERATOR)
    with web_node.client(role=None) as client:
        assert sign_in(client, "frank", PASSWORD).status_code == 303
        token = page_csrf(client, "/account/password")
        assert client.post("/logout").status_code == 403
        assert client.post("/logout", data={"csrf_token": "wrong"}).status_code == 403
        files = {"csrf_token": (None, token)}  # multipart is not read for the token: refused
        assert client.post("/logout", files=files).status_code == 403
        assert client.get("/api/me").status_code == 200  # still signed in
        out = client.post("/logout", data={"csrf_token": token})
        assert out.status_code == 303
        assert out.headers["location"] == "/login"
        assert client.get("/api/me").status_code == 401
    with web_node.client(role=None) as script:  # the header, as the pages' scripts send it
        assert sign_in(script, "frank", PASSWORD).status_code == 303
        token = page_csrf(script, "/account/password")
        with probe_server(web_node) as url:
            cookies = {SESSION_COOKIE: script.cookies[SESSION_COOKIE]}
            with httpx.Client(base_url=url, cookies=cookies) as probe:
                assert probe.post("/api/probe/change").status_code == 403
                sent = probe.post("/api/probe/change", headers={"X-CSRF-Token": token})
                assert sent.status_code == 200
                form = probe.post("/api/probe/change", data={"csrf_token": token})
                assert form.status_code == 200


def test_roles_and_credentials_on_the_api(web_node: WebNode) -> None:
    with web_node.client(role=None) as anonymous:
        refused = anonymous.get("/api/me")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="pacs-node"'
        assert anonymous.get("/api/me", headers={"Authorization": "Bearer pn_x"}).status_code == 401
    with web_node.client(Role.VIEWER) as viewer, web_node.client(Role.OPERATOR) as operator:
        assert viewer.get("/api/me").json()["role"] == "viewer"
        with probe_server(web_node) as url:
            assert viewer.post(f"{url}/api/probe/change").status_code == 403
            assert operator.post(f"{url}/api/probe/change").json()["role"] == "operator"
            page = httpx.get(f"{url}/probe/page?a=1")
            assert page.status_code == 303
            assert page.headers["location"] == "/login?next=%2Fprobe%2Fpage%3Fa%3D1"


def test_a_password_set_for_the_user_must_be_changed_first(web_node: WebNode) -> None:
    accounts.create_user(
        web_node.catalog, "gina", Role.VIEWER, PASSWORD, SETUP, must_change_password=True
    )
    with web_node.client(role=None) as client, probe_server(web_node) as url:
        signed = sign_in(client, "gina", PASSWORD, "/probe/page")
        assert signed.status_code == 303
        assert signed.headers["location"] == "/account/password?next=%2Fprobe%2Fpage"
        first_cookie = client.cookies[SESSION_COOKIE]
        cookies = {SESSION_COOKIE: first_cookie}
        sent_back = httpx.get(f"{url}/probe/page", cookies=cookies)
        assert sent_back.status_code == 303
        assert sent_back.headers["location"].startswith("/account/password?next=")
        assert client.get("/api/me").status_code == 403
        form = client.get("/account/password?next=/probe/page")
        assert "choose your own" in form.text
        token = page_csrf(client, "/account/password")
        change = {"current": PASSWORD, "new": NEW_PASSWORD, "next": "/probe/page"}
        differ = client.post(
            "/account/password", data={**change, "confirm": "other", "csrf_token": token}
        )
        assert differ.status_code == 400
        wrong = client.post(
            "/account/password",
            data={**change, "current": "nope", "confirm": NEW_PASSWORD, "csrf_token": token},
        )
        assert wrong.status_code == 401
        done = client.post(
            "/account/password", data={**change, "confirm": NEW_PASSWORD, "csrf_token": token}
        )
        assert done.status_code == 303
        assert done.headers["location"] == "/probe/page"
        assert client.cookies[SESSION_COOKIE] != first_cookie  # every old session closed
        assert httpx.get(f"{url}/probe/page", cookies=cookies).status_code == 303
        fresh = {SESSION_COOKIE: client.cookies[SESSION_COOKIE]}
        assert httpx.get(f"{url}/probe/page", cookies=fresh).json()["name"] == "gina"
    assert isinstance(
        accounts.authenticate_password(web_node.catalog, "gina", NEW_PASSWORD), Principal
    )


def test_sessions_expire_and_expired_ones_are_removed_at_login(web_node: WebNode) -> None:
    web_node.user("hank", Role.VIEWER)
    with web_node.client(role=None) as client:
        assert sign_in(client, "hank", PASSWORD).status_code == 303
        assert client.get("/api/me").status_code == 200
        with web_node.catalog.sessions() as session:
            session.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
            session.commit()
        assert client.get("/api/me").status_code == 401
        page = client.get("/account/password")
        assert page.status_code == 303
        assert page.headers["location"].startswith("/login?next=")
        assert sign_in(client, "hank", PASSWORD).status_code == 303
    with web_node.catalog.sessions() as session:
        assert session.scalar(select(func.count()).select_from(WebSession)) == 1


def test_first_start_makes_admin_once_with_its_password_in_a_private_file(
    web_node: WebNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = web_node.settings.node.data_dir / accounts.FIRST_ADMIN_PASSWORD_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    password = path.read_text().strip()
    with web_node.client(role=None) as client:
        signed = sign_in(client, "admin", password)
        assert signed.headers["location"] == "/account/password?next=%2F"
    with web_node.catalog.sessions() as session:
        admin = session.scalars(select(User).where(User.name == "admin")).one()
        assert (admin.role, admin.must_change_password) == (Role.ADMIN, True)
    # a second start finds the account: nothing is made or written
    assert accounts.ensure_first_admin(web_node.catalog, path.parent, SETUP) is None
    assert path.read_text().strip() == password
    # on a catalog of its own, the log names the file and never the password
    catalog = open_catalog(f"sqlite:///{tmp_path / 'other.sqlite'}")
    try:
        with caplog.at_level(logging.INFO, logger="pacs_node.services.accounts"):
            made = accounts.ensure_first_admin(catalog, tmp_path / "other", Actor.node("web"))
        assert made is not None
        (record,) = [r for r in caplog.records if "password is in" in r.getMessage()]
        assert record.__dict__["path"] == str(made)
        secret = made.read_text().strip()
        assert all(secret not in f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    finally:
        catalog.dispose()


def test_the_throttle_refills_one_failure_per_interval() -> None:
    throttle = LoginThrottle(burst=2, refill=timedelta(seconds=30))
    now = utcnow()
    assert throttle.wait("10.0.0.1", now) is None
    throttle.failed("10.0.0.1", now)
    throttle.failed("10.0.0.1", now)
    assert throttle.wait("10.0.0.1", now) == timedelta(seconds=30)
    assert throttle.wait("10.0.0.2", now) is None  # another address is not slowed
    assert throttle.wait("10.0.0.1", now + timedelta(seconds=15)) == timedelta(seconds=15)
    assert throttle.wait("10.0.0.1", now + timedelta(seconds=30)) is None
    throttle.failed("2001:db8::1", now)
    throttle.failed("2001:db8::2", now)  # one host's /64 counts as one address
    assert throttle.wait("2001:db8::3", now) == timedelta(seconds=30)
