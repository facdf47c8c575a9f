"""Dependencies between services (``depends_on`` in the catalog): pure graph rules.

A release train rolls a dependency out before the services that call it, and rolls back in
the reverse order. The graph is checked when the catalog loads (an unknown service or a
cycle is refused there) and again when a train is planned, before any write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def unknown_dependencies(graph: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """(service, dependency) pairs whose dependency is not a service of the graph."""
    return [(svc, dep) for svc, deps in graph.items() for dep in deps if dep not in graph]


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A dependency cycle as a path that ends where it starts (``[a, b, a]``), or None.

    Depth-first, services and dependencies visited in sorted order, so the cycle named is
    the same on every run. Dependencies outside the graph are ignored (see
    :func:`unknown_dependencies`).
    """
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in on_path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        on_path.add(node)
        for dep in sorted(set(graph.get(node, ()))):
            if dep in graph:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start)
        if found:
            return found
    return None


def describe_cycle(cycle: list[str]) -> str:
    return " -> ".join(cycle)


def _closure(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    """Every service ``start`` depends on, directly or through others."""
    seen: set[str] = set()
    todo = [d for d in graph.get(start, ()) if d in graph]
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo.extend(d for d in graph.get(dep, ()) if d in graph)
    return seen


def dependency_order(graph: Mapping[str, Iterable[str]], services: Iterable[str]) -> list[str]:
    """``services`` ordered so that each comes after everything it depends on.

    Dependencies count through services outside ``services`` too (a train of ``a`` and
    ``c`` where ``a -> b -> c`` rolls ``c`` out first). Ties keep the name order, so the
    order is the same on every run. ValueError on a cycle or a service not in the graph.
    """
    chosen = sorted(dict.fromkeys(services))
    missing = [s for s in chosen if s not in graph]
    if missing:
        raise ValueError(f"not in the dependency graph: {', '.join(missing)}")
    cycle = find_cycle(graph)
    if cycle:
        raise ValueError(f"dependency cycle: {describe_cycle(cycle)}")
    needs = {s: _closure(graph, s) & set(chosen) for s in chosen}
    ordered: list[str] = []
    while len(ordered) < len(chosen):
        ready = [s for s in chosen if s not in ordered and needs[s] <= set(ordered)]
        ordered.append(ready[0])  # never empty: the graph has no cycle
    return ordered


def reverse_dependency_order(
    graph: Mapping[str, Iterable[str]], services: Iterable[str]
) -> list[str]:
    """The rollback order: callers first, then what they depend on."""
    return list(reversed(dependency_order(graph, services)))
