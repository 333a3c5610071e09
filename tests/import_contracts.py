"""An import-linter contract that no module of a package takes part in an import cycle.

import-linter's own `acyclic_siblings` contract is about packages (no two sibling packages may
import each other in any way); this one is about modules, the cycles Python itself trips over.
"""

from __future__ import annotations

from itertools import pairwise

import grimp
from importlinter import Contract, ContractCheck, fields, output
from importlinter.application import contract_utils
from importlinter.application.contract_utils import AlertLevel


def import_cycles(graph: grimp.ImportGraph, package: str) -> list[tuple[int, list[str]]]:
    """Each group of modules under `package` that import each other in a circle: its size, and
    one shortest cycle through it."""
    modules = {m for m in graph.modules if m == package or m.startswith(package + ".")}
    cycles: list[tuple[int, list[str]]] = []
    placed: set[str] = set()
    for module in sorted(modules):
        if module in placed:
            continue
        # Modules reachable both ways share a cycle with `module`.
        group = (
            graph.find_upstream_modules(module) & graph.find_downstream_modules(module)
        ) & modules
        if not group:
            continue
        placed |= group | {module}
        cycles.append((len(group | {module}), _one_cycle(graph, module, group)))
    return cycles


def _one_cycle(graph: grimp.ImportGraph, start: str, group: set[str]) -> list[str]:
    """A shortest import chain from `start` back to itself, through modules of its group."""
    best: tuple[str, ...] | None = None
    for imported in sorted(graph.find_modules_directly_imported_by(start) & group):
        back = graph.find_shortest_chain(importer=imported, imported=start)
        if back is not None and (best is None or len(back) < len(best)):
            best = back
    assert best is not None, f"{start} is in a cycle but no chain leads back to it"
    return [start, *best]


class ModuleCyclesContract(Contract):
    """No module under `packages` imports itself, directly or through other modules.

    `ignore_imports` works as in import-linter's own contracts, and an entry that matches no
    import is an error: an exemption ends with the import it excused."""

    type_name = "module_acyclic"

    packages = fields.ListField(subfield=fields.StringField())
    ignore_imports = fields.SetField(subfield=fields.ImportExpressionField(), required=False)

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        removal = contract_utils.remove_ignored_imports_and_report(
            graph=graph,
            ignore_imports=self.ignore_imports,  # type: ignore[arg-type]
            unmatched_alerting=AlertLevel.ERROR,
        )
        packages: list[str] = self.packages  # type: ignore[assignment]
        cycles = [cycle for package in packages for cycle in import_cycles(graph, package)]
        found = [
            (size, [(a, b, _line_numbers(graph, a, b)) for a, b in pairwise(cycle)])
            for size, cycle in cycles
        ]
        return ContractCheck(
            kept=not cycles,
            metadata={"cycles": found},
            warnings=list(removal.warnings),
            ignored_import_count=removal.ignored_import_count,
        )

    def render_broken_contract(self, check: ContractCheck) -> None:
        cycles: list[tuple[int, list[tuple[str, str, str]]]] = check.metadata["cycles"]
        for size, links in cycles:
            output.print_error(f"{size} modules import each other in a circle, for one:")
            output.new_line()
            for importer, imported, lines in links:
                output.print_error(f"-   {importer} -> {imported} ({lines})", bold=False)
            output.new_line()


def _line_numbers(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    details = graph.get_import_details(importer=importer, imported=imported)
    return ", ".join(f"l.{d['line_number']}" for d in details)
