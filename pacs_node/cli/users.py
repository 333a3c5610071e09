"""``pacs-node users``: the web face's accounts, on the catalog (the node may run or not).

Each command migrates the catalog (creating it on a fresh data folder), so accounts can be
made before the node's first start. A password comes from a prompt (asked twice), or from one
line of stdin with ``--password-stdin``; it never appears in the command line or the log.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pacs_node.cli.common import ConfigOption, JsonOption, opened_catalog, settings_for, user
from pacs_node.cli.console import FAILED, fail, out, print_json
from pacs_node.errors import PacsNodeError

if TYPE_CHECKING:
    from pacs_node.catalog.db import Catalog


class RoleName(enum.StrEnum):
    """The catalog's roles (:class:`pacs_node.catalog.models.Role`), named again here so that
    parsing the command line loads no catalog code."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


users_app = typer.Typer(
    help="Accounts of the web face: add one, list them, set a password.",
    no_args_is_help=True,
)
NameArgument = Annotated[str, typer.Argument(help="The account's login name.")]
PasswordStdinOption = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the password from one line of stdin."),
]


def read_password(from_stdin: bool) -> str:
    """The new password: one line of stdin, or typed twice at a prompt (on stderr)."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            fail("no password on stdin")
        return password
    typed: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    return typed


def _run(config: Path | None, what: str, action: Callable[[Catalog], object]) -> None:
    """One change to the migrated catalog; an account error ends the command (exit 1)."""
    with opened_catalog(settings_for(config), migrate=True) as catalog:
        try:
            action(catalog)
        except PacsNodeError as exc:
            fail(f"{what}: {exc}", FAILED)


@users_app.command("add")
def users_add(
    name: NameArgument,
    role: Annotated[RoleName, typer.Option("--role", help="What the account may do.")],
    password_stdin: PasswordStdinOption = False,
    must_change: Annotated[
        bool,
        typer.Option("--must-change", help="The user must choose a new password at first login."),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Add an account with a role and a password."""
    from pacs_node.catalog.models import Role
    from pacs_node.services.accounts import check_name, check_password, create_user

    try:
        check_name(name)
        password = check_password(read_password(password_stdin))
    except PacsNodeError as exc:
        fail(str(exc))
    _run(
        config,
        f"user {name}",
        lambda catalog: create_user(
            catalog, name, Role(role.value), password, user(), must_change_password=must_change
        ),
    )
    out.print(f"user {name} added ({role.value})", highlight=False)


@users_app.command("list")
def users_list(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """List the accounts with role, lock, live tokens and whether a password change is due."""
    from pacs_node.services.accounts import list_users

    with opened_catalog(settings_for(config), migrate=True) as catalog:
        users = list_users(catalog)
    if json_output:
        print_json(
            [
                {
                    "name": u.name,
                    "role": u.role.value,
                    "created_at": u.created_at.isoformat(),
                    "locked_until": u.locked_until.isoformat() if u.locked_until else None,
                    "disabled": u.disabled,
                    "tokens": u.tokens,
                    "must_change_password": u.must_change_password,
                }
                for u in users
            ]
        )
        return
    table = Table(title=f"{len(users)} users")
    for column in ("Name", "Role", "Created", "Locked until", "Tokens", "Password"):
        table.add_column(column)
    for u in users:
        table.add_row(
            u.name,
            u.role.value,
            u.created_at.isoformat()[:19],
            u.locked_until.isoformat()[:19] if u.locked_until else "",
            str(u.tokens),
            "to change" if u.must_change_password else ("disabled" if u.disabled else "set"),
        )
    out.print(table)


@users_app.command("passwd")
def users_passwd(
    name: NameArgument, password_stdin: PasswordStdinOption = False, config: ConfigOption = None
) -> None:
    """Set an account's password; this also lifts a lock and signs its browsers out."""
    from pacs_node.services.accounts import check_password, set_password

    try:
        password = check_password(read_password(password_stdin))
    except PacsNodeError as exc:
        fail(str(exc))
    _run(config, f"user {name}", lambda catalog: set_password(catalog, name, password, user()))
    out.print(f"password of {name} set", highlight=False)
