"""The package's layout, from its source (ast, nothing imported): no import cycle between
modules, and imports between the parts point one way (README "Layout", STYLE.md):

    controller -> bpf, policies, gpu, profiler;   gpu, profiler -> policies;   policies, bpf -> none
    agentcg/<shared>.py (errors, units, records, procfs, protocols) -> no part
    agentcg/<glue>.py (the CLI, the public client facade, demo, kv CLI) -> any part; no part imports them

Every import counts, also one inside a function (a lazy import hides a cycle, it does not
remove it) and one under `if TYPE_CHECKING:` (the module still depends on the other's
internals). No module is longer than MAX_MODULE_LINES (STYLE.md: "about 500").
What the tree still breaks is listed in KNOWN and KNOWN_LONG, each with whose work removes it;
an entry that no longer applies fails too, so the list only shrinks. The test needs
neither root nor the kernel.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PARTS = ("controller", "bpf", "gpu", "policies", "profiler")
ALLOWED = {
    "controller": {"bpf", "policies", "gpu", "profiler"},
    "gpu": {"policies"},
    "profiler": {"policies"},
    "policies": set(),
    "bpf": set(),
    "shared": set(),
}
# agentcg/ modules that are glue over the parts, with why each may import them
GLUE = {
    "agentcg.cli": "the `agentcg` command: mounts each part's click commands",
    "agentcg.client": "the public `agentcg.client` import path over controller.client",
    "agentcg.demo": "`agentcg demo`: doctor + profile + report in one command",
    "agentcg.kv_cli": "`agentcg kv simulate`: the CLI over profiler's KV simulator",
}
# what the tree still breaks: the finding -> who removes it (delete the line when it is gone)
KNOWN = {
    "agentcg.gpu.cli -> agentcg.bpf.cudacopy (gpu may not import bpf)":
        "`agentcg gpu copies` (the CUDA-copy uprobe tracer) belongs in controller/ or bpf/'s own CLI",
    "agentcg.gpu.kernel_view -> agentcg.bpf.monitor (gpu may not import bpf)":
        "the KV-store benchmark's kernel view: controller (or bench/) should pass the monitor in",
}


def _module_files() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "agentcg").rglob("*.py")):
        out[_name(path.relative_to(REPO / "agentcg"), "agentcg")] = path
    for part in PARTS:
        for path in sorted((REPO / part).rglob("*.py")):
            out[_name(path.relative_to(REPO / part), f"agentcg.{part}")] = path
    return out


def _name(relative: Path, prefix: str) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([prefix, *parts])


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The agentcg modules `module` imports (a `from X import name` of a submodule counts
    as that submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:   # `from pkg import submodule` needs the submodule only
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
            visit(child)

    visit(tree)
    return {_resolve(name, known) for name in found if name.startswith("agentcg.") or name == "agentcg"} - {None, module}


def _resolve(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _part(module: str) -> str:
    pieces = module.split(".")
    if len(pieces) > 1 and pieces[1] in PARTS:
        return pieces[1]
    return "glue" if module in GLUE else "shared"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = _module_files()
    known = set(files)
    # a package's __init__ is imported with every module in it: "agentcg" itself is not a dependency
    return {m: {d for d in _imports(m, p, known) if d != "agentcg"} for m, p in files.items()}


def test_the_graph_sees_the_package(graph):
    assert len(graph) > 100
    assert "agentcg.controller.cgroup" in graph["agentcg.controller.toolcall"]
    assert "agentcg.procfs" in graph["agentcg.controller.reaper"]


def _findings(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for members in _components(graph):
        path = _path_in(graph, set(members))
        rest = f" (the cycle's component: {', '.join(members)})" if len(members) > len(path) - 1 else ""
        out.append("cycle " + " -> ".join(path) + rest)
    for module, deps in graph.items():
        source = _part(module)
        for dep in deps:
            target = _part(dep)
            if target == "glue" and module not in GLUE:
                out.append(f"{module} -> {dep} (a part imports the CLI/client glue: import back up)")
            elif source in ALLOWED and target in PARTS and target != source and target not in ALLOWED[source]:
                out.append(f"{module} -> {dep} ({source} may not import {target})")
    return sorted(out)


def test_no_import_cycle_and_imports_point_one_way(graph):
    new = [f for f in _findings(graph) if f not in KNOWN]
    assert not new, "import cycles or imports against the layout:\n" + "\n".join(new)


def test_known_exceptions_still_apply(graph):
    stale = sorted(set(KNOWN) - set(_findings(graph)))
    assert not stale, "fixed, so remove from KNOWN in tests/test_layout.py:\n" + "\n".join(stale)


def test_layout_rules_catch_an_upward_import():
    graph = {"agentcg.policies.x": {"agentcg.controller.y"}, "agentcg.controller.y": {"agentcg.client"},
             "agentcg.client": set()}
    assert _findings(graph) == [
        "agentcg.controller.y -> agentcg.client (a part imports the CLI/client glue: import back up)",
        "agentcg.policies.x -> agentcg.controller.y (policies may not import controller)"]


def test_one_module_reads_proc():
    """Per-process /proc files are read through agentcg.procfs only."""
    offenders = []
    for module, path in _module_files().items():
        if module == "agentcg.procfs":
            continue
        text = path.read_text()
        for needle in ('f"/proc/{', "/proc/self/status", "/proc/self/cgroup", "/proc/self/fdinfo"):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert not offenders, "read these through agentcg.procfs.ProcFs:\n" + "\n".join(offenders)


MAX_MODULE_LINES = 550      # the guide says "about 500": this is where "about" ends
# modules still longer: the module -> who shortens it (delete the line when it is done)
KNOWN_LONG: dict[str, str] = {}


def _long_modules(lengths: dict[str, int]) -> dict[str, int]:
    return {m: n for m, n in sorted(lengths.items()) if n > MAX_MODULE_LINES}


def test_no_module_is_over_the_line_limit():
    """No module of the package (agentcg/ and the parts it maps: controller, bpf, gpu,
    policies, profiler) is longer than MAX_MODULE_LINES, except those in KNOWN_LONG; an
    entry there that is short now fails too, so the list only shrinks."""
    lengths = {m: len(p.read_text().splitlines()) for m, p in _module_files().items()}
    long = _long_modules(lengths)
    new = [f"{m}: {n} lines" for m, n in long.items() if m not in KNOWN_LONG]
    assert not new, (f"modules over {MAX_MODULE_LINES} lines (split them by job, STYLE.md):\n" + "\n".join(new))
    stale = sorted(set(KNOWN_LONG) - set(long))
    assert not stale, "short enough now, so remove from KNOWN_LONG in tests/test_layout.py:\n" + "\n".join(stale)


def test_the_line_limit_catches_a_long_module():
    """The check itself can fail."""
    assert _long_modules({"agentcg.x": MAX_MODULE_LINES + 1, "agentcg.y": MAX_MODULE_LINES}) == \
        {"agentcg.x": MAX_MODULE_LINES + 1}


def test_cycle_finder_finds_a_cycle():
    """The check itself can fail."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component of more than one module."""
    return [_path_in(graph, set(c)) for c in _components(graph)]


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(components)


def _path_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A concrete cycle through the component's first module, for the message."""
    start = min(component)
    parents = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ()) & component):
            if w == start:
                path = [v]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return list(reversed(path)) + [start]
            if w not in parents:
                parents[w] = v
                queue.append(w)
    return sorted(component)
