"""Accounts: users with a role, their passwords, API tokens and browser sessions.

Passwords are kept as argon2id hashes; tokens and session cookies are random and only their
SHA-256 is kept (they carry 256 bits, so a slow hash adds nothing). Repeated failed logins lock
an account for a while, so a password cannot be guessed at network speed. Every door checks
credentials here and gets a :class:`Principal`, whose :attr:`~Principal.actor` its commands
record.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_node.actor import Actor
from pacs_node.catalog.db import Catalog
from pacs_node.catalog.models import ApiToken, Role, User, WebSession, utcnow
from pacs_node.errors import RequestError

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

_hasher = PasswordHasher()
# A hash to verify against when the user does not exist, so both answers take as long.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


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
    or the account is locked until ``until``."""

    locked_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class UserSummary:
    name: str
    role: Role
    created_at: datetime
    locked_until: datetime | None
    disabled: bool
    tokens: int


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
        session.commit()
        log.info("user created", extra={"user": name, "role": role.value, "actor": str(actor)})
        return _principal(user)


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


def authenticate_password(
    catalog: Catalog, name: str, password: str, now: datetime | None = None
) -> Principal | LoginRefused:
    """Check a name and password; count a failure against the account, lock it after
    :data:`LOCK_AFTER_FAILURES` in a row. A locked account refuses even the right password."""
    now = now or utcnow()
    with catalog.sessions() as session:
        user = session.scalars(select(User).where(User.name == name)).one_or_none()
        stored = user.password_hash if user is not None and user.disabled_at is None else None
        try:
            matches = _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
        except (VerificationError, InvalidHashError):
            matches = False
        if user is None or stored is None:
            return LoginRefused()
        if user.locked_until is not None and user.locked_until > now:
            return LoginRefused(user.locked_until)
        if not matches:
            user.failed_logins += 1
            over = user.failed_logins - LOCK_AFTER_FAILURES
            if over >= 0:
                user.locked_until = now + min(LOCK_FIRST * 2**over, LOCK_MAX)
                log.warning(
                    "account locked after failed logins",
                    extra={"user": user.name, "failures": user.failed_logins},
                )
            session.commit()
            return LoginRefused(user.locked_until if over >= 0 else None)
        user.failed_logins = 0
        user.locked_until = None
        if _hasher.check_needs_rehash(stored):
            user.password_hash = _hasher.hash(password)
        session.commit()
        return _principal(user)


def create_token(catalog: Catalog, user_name: str, token_name: str, actor: Actor) -> str:
    """A new API token acting as ``user_name``; the only time its text is seen."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with catalog.sessions() as session:
        user = _user(session, user_name)
        session.add(
            ApiToken(
                user_id=user.id,
                name=token_name[:64],
                digest=_digest(token),
                created_at=utcnow(),
            )
        )
        session.commit()
    log.info("token created", extra={"user": user_name, "token": token_name, "actor": str(actor)})
    return token


def revoke_token(catalog: Catalog, user_name: str, token_name: str, actor: Actor) -> int:
    """Revoke every live token of ``user_name`` named ``token_name``; how many were."""
    with catalog.sessions() as session:
        user = _user(session, user_name)
        tokens = session.scalars(
            select(ApiToken).where(
                ApiToken.user_id == user.id,
                ApiToken.name == token_name,
                ApiToken.revoked_at.is_(None),
            )
        ).all()
        for token in tokens:
            token.revoked_at = utcnow()
        session.commit()
    log.info("token revoked", extra={"user": user_name, "token": token_name, "actor": str(actor)})
    return len(tokens)


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
    cookie = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow()
    with catalog.sessions() as session:
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
        for row in session.scalars(select(WebSession).where(WebSession.digest == _digest(cookie))):
            session.delete(row)
        session.commit()
