"""The module cycle contract of `make lint` finds cycles, through any number of modules, and
only cycles."""

from __future__ import annotations

import grimp

from tests.import_contracts import import_cycles


def _graph(*imports: tuple[str, str]) -> grimp.ImportGraph:
    graph = grimp.ImportGraph()
    for importer, imported in imports:
        graph.add_import(importer=importer, imported=imported)
    return graph


def test_a_chain_without_a_way_back_is_no_cycle() -> None:
    graph = _graph(("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.a", "pkg.c"))
    assert import_cycles(graph, "pkg") == []


def test_a_cycle_through_three_modules_is_found_once() -> None:
    graph = _graph(("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a"), ("pkg.c", "x"))
    assert import_cycles(graph, "pkg") == [(3, ["pkg.a", "pkg.b", "pkg.c", "pkg.a"])]


def test_each_group_is_reported_with_a_shortest_cycle() -> None:
    graph = _graph(
        ("pkg.a", "pkg.b"),
        ("pkg.b", "pkg.a"),
        ("pkg.b", "pkg.c"),
        ("pkg.c", "pkg.a"),
        ("pkg.sub.x", "pkg.sub.y"),
        ("pkg.sub.y", "pkg.sub.x"),
    )
    assert import_cycles(graph, "pkg") == [
        (3, ["pkg.a", "pkg.b", "pkg.a"]),
        (2, ["pkg.sub.x", "pkg.sub.y", "pkg.sub.x"]),
    ]


def test_modules_outside_the_package_do_not_count() -> None:
    graph = _graph(("pkg.a", "other.b"), ("other.b", "other.c"), ("other.c", "other.b"))
    assert import_cycles(graph, "pkg") == []
