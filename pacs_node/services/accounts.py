"""Accounts: users with a role, their passwords, API tokens and browser sessions.

Passwords are kept as argon2id hashes; tokens and session cookies are random and only their
SHA-256 is kept (they carry 256 bits, so a slow hash adds nothing). Repeated failed logins lock
an account for a while, so a password cannot be guessed at network speed; a door facing the
network also passes a :class:`~pacs_node.services.login_throttle.LoginThrottle`, which slows
each source address and locks names that are no account just as it locks accounts. Every door
checks credentials here and gets a :class:`Principal`, whose :attr:`~Principal.actor` its
commands record.

A node with no account yet makes one, ``admin``, whose random password it writes once to a
0600 file in the data folder (:func:`ensure_first_admin`); it must be changed at first login.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs_node.actor import Actor
from pacs_node.audit import events as audit_events
from pacs_node.audit.trail import record_now
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import ApiToken, Role, User, WebSession, utcnow
from pacs_node.datadir import FILE_MODE, fsync_dir
from pacs_node.errors import RequestError
from pacs_node.services.login_throttle import LoginThrottle, VerifiedPasswords

log = logging.getLogger(__name__)

ROLE_ORDER = (Role.VIEWER, Role.OPERATOR, Role.ADMIN)
TOKEN_PREFIX = "pn_"
MIN_PASSWORD_LENGTH = 12
# Failed logins in a row before the account locks, and how long the first lock lasts; each
# further failure while the count stays high doubles it, up to the maximum.
LOCK_AFTER_FAILURES = 5
LOCK_FIRST = timedelta(minutes=1)
LOCK_MAX = timedelta(hours=1)
NAME_PATTERN_HELP = "1-64 letters, digits, '.', '_', '-' or '@'"
DEFAULT_TOKEN_LABEL = "default"
FIRST_ADMIN = "admin"
FIRST_ADMIN_PASSWORD_FILE = "initial-admin-password"

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against when the user does not exist, so both answers take as long;
    made at first need, not at import (every CLI command imports this module)."""
    return _hasher.hash(secrets.token_hex(16))


class AccountError(RequestError):
    """A request about accounts the catalog cannot grant (unknown user, duplicate name...)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from, once its credentials were checked."""

    user_id: int
    name: str
    role: Role
    must_change_password: bool = False

    @property
    def actor(self) -> Actor:
        return Actor.user(self.name)

    def may(self, role: Role) -> bool:
        """Whether this principal has ``role`` or one above it."""
        return ROLE_ORDER.index(self.role) >= ROLE_ORDER.index(role)


@dataclass(frozen=True, slots=True)
class LoginRefused:
    """Why a login failed: wrong credentials (one answer for unknown user and bad password),
    the name is locked until ``locked_until`` (answered alike for names that are no account),
    or the source address failed too often and must wait ``retry_after`` (nothing was checked).
    ``user``: the account the name is, when it is one (what an audit event may name: a name
    that is no account may be a password typed in the wrong field, and is never kept).
    """

    locked_until: datetime | None = None
    retry_after: timedelta | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class UserSummary:
    name: str
    role: Role
    created_at: datetime
    locked_until: datetime | None
    disabled: bool
    tokens: int
    must_change_password: bool


@dataclass(frozen=True, slots=True)
class TokenSummary:
    """A token as listed: never its text, which only its creator saw."""

    user: str
    label: str
    created_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewSession:
    cookie: str
    csrf_token: str
    expires_at: datetime


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", name):
        raise AccountError(f"invalid user name {name[:70]!r}: {NAME_PATTERN_HELP}")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return password


def _principal(user: User) -> Principal:
    return Principal(user.id, user.name, user.role, user.must_change_password)


def _user(session: Session, name: str) -> User:
    user = session.scalars(select(User).where(User.name == name)).one_or_none()
    if user is None:
        raise AccountError(f"no user {name!r}")
    return user


def count_users(catalog: Catalog) -> int:
    with catalog.sessions() as session:
        return len(session.scalars(select(User.id)).all())


def lock_after(failures: int, now: datetime) -> datetime | None:
    """Until when ``failures`` failed logins in a row lock a name: from
    :data:`LOCK_AFTER_FAILURES` on, :data:`LOCK_FIRST`, doubled per further failure, at most
    :data:`LOCK_MAX`; None below it."""
    over = failures - LOCK_AFTER_FAILURES
    if over < 0:
        return None
    lock: timedelta = min(LOCK_FIRST * (2 ** min(over, 32)), LOCK_MAX)
    return now + lock


def create_user(
    catalog: Catalog,
    name: str,
    role: Role,
    password: str,
    actor: Actor,
    *,
    must_change_password: bool = False,
) -> Principal:
    check_name(name)
    check_password(password)
    with catalog.sessions() as session:
        if session.scalars(select(User).where(User.name == name)).one_or_none() is not None:
            raise AccountError(f"user {name!r} exists already")
        user = User(
            name=name,
            role=role,
            password_hash=_hasher.hash(password),
            must_change_password=must_change_password,
            failed_logins=0,
            created_at=utcnow(),
        )
        session.add(user)
        try:
            session.commit()
        except IntegrityError as exc:  # made by another process meanwhile
            raise AccountError(f"user {name!r} exists already") from exc
        log.info("user created", extra={"user": name, "role": role.value, "actor": str(actor)})
        principal = _principal(user)
    record_now(
        catalog,
        audit_events.user_changed(
            str(actor), name, f"user created, role {role.value}", role_changed=True
        ),
    )
    return principal


def list_users(catalog: Catalog) -> list[UserSummary]:
    with catalog.sessions() as session:
        users = session.scalars(select(User).order_by(User.name)).all()
        summaries = []
        for user in users:
            tokens = session.scalars(
                select(ApiToken.id).where(
                    ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None)
                )
            ).all()
            summaries.append(
                UserSummary(
                    user.name,
                    user.role,
                    user.created_at,
                    user.locked_until,
                    user.disabled_at is not None,
                    len(tokens),
                    user.must_change_password,
                )
            )
        return summaries


def set_password(catalog: Catalog, name: str, password: str, actor: Actor) -> None:
    """A new password; it is no longer one to change at the next login, and a lock is lifted."""
    check_password(password)
    with catalog.sessions() as session:
        user = _user(session, name)
        user.password_hash = _hasher.hash(password)
        user.must_change_password = False
        user.failed_logins = 0
        user.locked_until = None
        # Every browser signed in with the old password signs in again.
        for stale in session.scalars(select(WebSession).where(WebSession.user_id == user.id)):
            session.delete(stale)
        session.commit()
    log.info("password changed", extra={"user": name, "actor": str(actor)})
    record_now(catalog, audit_events.user_changed(str(actor), name, "password changed"))


def authenticate_password(
    catalog: Catalog,
    name: str,
    password: str,
    now: datetime | None = None,
    *,
    throttle: LoginThrottle | None = None,
    address: str | None = None,
    verified: VerifiedPasswords | None = None,
) -> Principal | LoginRefused:
    """Check a name and password; count a failure against the account, lock it after
    :data:`LOCK_AFTER_FAILURES` in a row. A locked account refuses even the right password.

    With a ``throttle`` (the doors facing the network), an ``address`` that failed too often
    is refused unchecked, and a name that is no account is counted and locked like one.
    With ``verified`` (HTTP Basic), a pair that matched the same stored hash lately is not
    hashed again."""
    now = now or utcnow()
    if throttle is not None and address is not None:
        wait = throttle.wait(address, now)
        if wait is not None:
            return LoginRefused(retry_after=wait)
    found, known = _check_password(catalog, name, password, now, verified)
    if isinstance(found, LoginRefused) and throttle is not None:
        if address is not None:
            throttle.failed(address, now)
        if not known:
            found = LoginRefused(throttle.strike(name, now, lock_after))
    return found


def _check_password(
    catalog: Catalog, name: str, password: str, now: datetime, verified: VerifiedPasswords | None
) -> tuple[Principal | LoginRefused, bool]:
    """The answer, and whether ``name`` is an account that may log in."""
    with catalog.sessions() as session:
        user = session.scalars(select(User).where(User.name == name)).one_or_none()
        stored = user.password_hash if user is not None and user.disabled_at is None else None
        if (
            stored is not None
            and verified is not None
            and verified.matches(name, password, stored, now)
        ):
            matches = True
        else:
            try:
                # Hashed even for an unknown name, so both answers take as long.
                matches = _hasher.verify(stored or _dummy_hash(), password) and stored is not None
            except (VerificationError, InvalidHashError):
                matches = False
        if user is None or stored is None:
            return LoginRefused(), False
        if user.locked_until is not None and user.locked_until > now:
            return LoginRefused(user.locked_until, user=user.name), True
        if not matches:
            user.failed_logins += 1
            user.locked_until = lock_after(user.failed_logins, now)
            if user.locked_until is not None:
                log.warning(
                    "account locked after failed logins",
                    extra={"user": user.name, "failures": user.failed_logins},
                )
            session.commit()
            return LoginRefused(user.locked_until, user=user.name), True
        changed = user.failed_logins != 0 or user.locked_until is not None
        user.failed_logins = 0
        user.locked_until = None
        if _hasher.check_needs_rehash(stored):
            user.password_hash = _hasher.hash(password)
            changed = True
        if changed:  # HTTP Basic checks on every request: most of them write nothing
            session.commit()
        if verified is not None and user.password_hash is not None:
            verified.remember(name, password, user.password_hash, now)
        return _principal(user), True


def create_token(
    catalog: Catalog, user_name: str, label: str, actor: Actor, *, unique: bool = False
) -> str:
    """A new API token acting as ``user_name``, named ``label``; the only time its text is
    seen. ``unique``: refuse a label the user's live tokens already carry (so that revoking
    by label revokes this one alone)."""
    check_label(label)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with catalog.sessions() as session:
        user = _user(session, user_name)
        if unique and _live_tokens(session, user.id, label):
            raise AccountError(
                f"{user_name!r} has a live token labelled {label!r} already: "
                "revoke it first, or give another label"
            )
        session.add(
            ApiToken(user_id=user.id, name=label, digest=_digest(token), created_at=utcnow())
        )
        session.commit()
    log.info("token created", extra={"user": user_name, "token": label, "actor": str(actor)})
    record_now(
        catalog, audit_events.user_changed(str(actor), user_name, f"token {label!r} created")
    )
    return token


def check_label(label: str) -> str:
    if not 1 <= len(label) <= 64 or not label.isprintable():
        raise AccountError("a token label is 1-64 printable characters")
    return label


def _live_tokens(session: Session, user_id: int, label: str) -> list[ApiToken]:
    return list(
        session.scalars(
            select(ApiToken).where(
                ApiToken.user_id == user_id,
                ApiToken.name == label,
                ApiToken.revoked_at.is_(None),
            )
        )
    )


def revoke_token(catalog: Catalog, user_name: str, label: str, actor: Actor) -> int:
    """Revoke every live token of ``user_name`` labelled ``label``; how many were."""
    with catalog.sessions() as session:
        user = _user(session, user_name)
        tokens = _live_tokens(session, user.id, label)
        for token in tokens:
            token.revoked_at = utcnow()
        session.commit()
    log.info(
        "token revoked",
        extra={"user": user_name, "token": label, "count": len(tokens), "actor": str(actor)},
    )
    if tokens:
        record_now(
            catalog,
            audit_events.user_changed(str(actor), user_name, f"token {label!r} revoked"),
        )
    return len(tokens)


def audit_sign_in(
    catalog: Catalog, name: str, address: str | None, *, ok: bool, reason: str | None = None
) -> None:
    """A login attempt on a door (110114 Login, success or failure)."""
    record_now(
        catalog,
        audit_events.user_authentication(name, address, login=True, ok=ok, reason=reason),
    )


def audit_sign_out(catalog: Catalog, name: str, address: str | None) -> None:
    """A logout (110114 Logout)."""
    record_now(catalog, audit_events.user_authentication(name, address, login=False, ok=True))


def list_tokens(catalog: Catalog, user_name: str | None = None) -> list[TokenSummary]:
    """The live tokens, of one user or of all, by user and label."""
    with catalog.sessions() as session:
        query = (
            select(ApiToken, User.name)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.revoked_at.is_(None))
            .order_by(User.name, ApiToken.name, ApiToken.id)
        )
        if user_name is not None:
            query = query.where(User.id == _user(session, user_name).id)
        return [
            TokenSummary(name, token.name, token.created_at, token.last_used_at)
            for token, name in session.execute(query).tuples()
        ]


def authenticate_token(catalog: Catalog, token: str) -> Principal | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    with catalog.sessions() as session:
        row = session.scalars(
            select(ApiToken).where(ApiToken.digest == _digest(token), ApiToken.revoked_at.is_(None))
        ).one_or_none()
        if row is None:
            return None
        user = session.get(User, row.user_id)
        if user is None or user.disabled_at is not None:
            return None
        now = utcnow()
        # Written at most once a minute: a busy script must not turn reads into writes.
        if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
            row.last_used_at = now
            session.commit()
        return _principal(user)


def open_session(catalog: Catalog, principal: Principal, lifetime: timedelta) -> NewSession:
    """A new browser session; the expired ones of every user are removed on the way."""
    cookie = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow()
    with catalog.sessions() as session:
        session.execute(delete(WebSession).where(WebSession.expires_at <= now))
        session.add(
            WebSession(
                digest=_digest(cookie),
                user_id=principal.user_id,
                csrf_token=csrf,
                created_at=now,
                expires_at=now + lifetime,
            )
        )
        session.commit()
    return NewSession(cookie, csrf, now + lifetime)


def session_principal(catalog: Catalog, cookie: str) -> tuple[Principal, str] | None:
    """The principal and CSRF token of a live session cookie."""
    with catalog.sessions() as session:
        row = session.scalars(
            select(WebSession).where(WebSession.digest == _digest(cookie))
        ).one_or_none()
        if row is None or row.expires_at <= utcnow():
            return None
        user = session.get(User, row.user_id)
        if user is None or user.disabled_at is not None:
            return None
        return _principal(user), row.csrf_token


def close_session(catalog: Catalog, cookie: str) -> None:
    with catalog.sessions() as session:
        session.execute(delete(WebSession).where(WebSession.digest == _digest(cookie)))
        session.commit()


def ensure_first_admin(catalog: Catalog, data_dir: Path, actor: Actor) -> Path | None:
    """On a catalog with no account: create ``admin`` (role admin, to change its password at
    first login) and write its random password to :data:`FIRST_ADMIN_PASSWORD_FILE` in
    ``data_dir`` (mode 0600); the file's path, None when accounts exist already (then nothing
    is written, whatever the file holds). A file left from an earlier catalog is replaced."""
    if count_users(catalog):
        return None
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / FIRST_ADMIN_PASSWORD_FILE
    password = secrets.token_urlsafe(18)
    # a name of this process's own: two nodes starting on one data folder never share it
    fd, name = tempfile.mkstemp(dir=data_dir, prefix=f".{FIRST_ADMIN_PASSWORD_FILE}.")
    partial = Path(name)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, f"{password}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        create_user(catalog, FIRST_ADMIN, Role.ADMIN, password, actor, must_change_password=True)
    except AccountError:  # another process sharing the catalog made it first
        partial.unlink()
        return None
    os.replace(partial, path)
    fsync_dir(data_dir)
    log.warning(
        "first start: user 'admin' created; its one-time password is in the file at path, "
        "to be changed at first login",
        extra={"path": str(path)},
    )
    return path
