"""``pacs-node tokens``: API tokens for scripts, on the catalog (the node may run or not).

``tokens create NAME`` makes a token that acts as the user NAME, with NAME's role (the issue's
"a token made for a user acts as that user"); ``--label`` tells a user's tokens apart, and is
what ``tokens revoke NAME --label LABEL`` revokes. A token's text is printed once, at creation;
the catalog keeps only its SHA-256.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pacs_node.cli.common import ConfigOption, JsonOption, opened_catalog, settings_for, user
from pacs_node.cli.console import FAILED, err, fail, out, print_json
from pacs_node.errors import PacsNodeError

DEFAULT_LABEL = "default"  # pacs_node.services.accounts.DEFAULT_TOKEN_LABEL

tokens_app = typer.Typer(
    help="API tokens acting as a user: create one, list them, revoke one.",
    no_args_is_help=True,
)
UserArgument = Annotated[str, typer.Argument(help="The user the token acts as.")]
LabelOption = Annotated[
    str, typer.Option("--label", help="The token's name among the user's tokens.")
]


@tokens_app.command("create")
def tokens_create(
    name: UserArgument,
    label: LabelOption = DEFAULT_LABEL,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create a token acting as user NAME and print it (the only time it is shown)."""
    from pacs_node.services.accounts import create_token

    with opened_catalog(settings_for(config), migrate=True) as catalog:
        try:
            token = create_token(catalog, name, label, user(), unique=True)
        except PacsNodeError as exc:
            fail(f"token for {name}: {exc}", FAILED)
    if json_output:
        print_json({"token": token, "user": name, "label": label})
        return
    err.print(f"token {label!r} acting as {name}; it is shown only now:", highlight=False)
    out.print(token, highlight=False, soft_wrap=True)


@tokens_app.command("list")
def tokens_list(
    name: Annotated[
        str | None, typer.Argument(help="Only this user's tokens.", show_default=False)
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """List live tokens by user and label (never their text)."""
    from pacs_node.services.accounts import list_tokens

    with opened_catalog(settings_for(config), migrate=True) as catalog:
        try:
            tokens = list_tokens(catalog, name)
        except PacsNodeError as exc:
            fail(str(exc), FAILED)
    if json_output:
        print_json(
            [
                {
                    "user": t.user,
                    "label": t.label,
                    "created_at": t.created_at.isoformat(),
                    "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
                }
                for t in tokens
            ]
        )
        return
    table = Table(title=f"{len(tokens)} live tokens")
    for column in ("User", "Label", "Created", "Last used"):
        table.add_column(column)
    for t in tokens:
        used = t.last_used_at.isoformat()[:19] if t.last_used_at else ""
        table.add_row(t.user, t.label, t.created_at.isoformat()[:19], used)
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    name: UserArgument, label: LabelOption = DEFAULT_LABEL, config: ConfigOption = None
) -> None:
    """Revoke user NAME's live token labelled LABEL; exit 1 when it has none."""
    from pacs_node.services.accounts import revoke_token

    with opened_catalog(settings_for(config), migrate=True) as catalog:
        try:
            revoked = revoke_token(catalog, name, label, user())
        except PacsNodeError as exc:
            fail(f"token for {name}: {exc}", FAILED)
    if not revoked:
        fail(f"{name} has no live token labelled {label!r}", FAILED)
    out.print(f"revoked {revoked} token(s) of {name} labelled {label!r}", highlight=False)
