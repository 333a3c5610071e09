"""``pacs-node train``: one implementation behind the node's CLI and ``python -m
pacs_node.training``, which needs only what training imports (torch, MONAI, pydantic, pydicom),
so a GPU workstation without the node's services can train a bundle. Imports nothing of the CLI
but its consoles."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from pacs_node.cli.console import err, fail
from pacs_node.errors import PacsNodeError


def command_line(
    recipe: Path, out: Path | None, workers: int, init: Path | None, device: str, loaders: int
) -> str:
    """The command as a user would type it again (recorded in the bundle's metadata)."""
    words = ["pacs-node", "train", str(recipe)]
    if out is not None:
        words += ["--out", str(out)]
    if init is not None:
        words += ["--init", str(init)]
    if workers != 1:
        words += ["--workers", str(workers)]
    if device != "cpu":
        words += ["--device", device]
    if loaders:
        words += ["--loaders", str(loaders)]
    return shlex.join(words)


def train(
    recipe_path: Annotated[Path, typer.Argument(help="Training recipe (YAML or JSON).")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Bundle folder (default: models/<name>).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes rendering phantom cases.")] = 1,
    init: Annotated[
        Path | None, typer.Option("--init", help="Start from these weights (a model.pt).")
    ] = None,
    device: Annotated[
        str, typer.Option(help="cpu, cuda, cuda:N, or auto (a GPU when there is one).")
    ] = "cpu",
    loaders: Annotated[
        int, typer.Option(help="Processes augmenting patches (0: the training process).")
    ] = 0,
) -> None:
    """Train a model on phantoms from a recipe and write it as a bundle with its model card."""
    from pacs_node.training.bundle import earlier_stages, write_bundle
    from pacs_node.training.card import refresh_card
    from pacs_node.training.recipe import load_recipe
    from pacs_node.training.trainer import train as run_training

    try:
        recipe = load_recipe(recipe_path)
    except PacsNodeError as exc:
        fail(str(exc))
    root = out_dir or Path("models") / recipe.name
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeRemainingColumn(),
        console=err,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def report(stage: str, done: int, total: int, note: str) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, note="")
            progress.update(tasks[stage], completed=done, note=note)
            if done == total and not err.is_terminal:  # a log file gets one line per stage
                err.print(f"{stage}: {note}", highlight=False)

        try:
            result = run_training(
                recipe, report, workers=workers, init=init, device=device, loaders=loaders
            )
        except ValueError as exc:
            fail(str(exc))
    commands = [command_line(recipe_path, out_dir, workers, init, device, loaders)]
    earlier, previous = earlier_stages(init, root)
    commands = [*earlier, *commands]
    write_bundle(recipe, result, root, card="", commands=commands, previous=previous)
    refresh_card(root)
    err.print(
        f"wrote {root}: validation Dice {result.best_val_dice:.3f} (epoch {result.best_epoch} "
        f"of {result.epochs_run}) in {result.minutes:.1f} min on {result.machine}",
        highlight=False,
    )
