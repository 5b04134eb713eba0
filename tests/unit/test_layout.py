"""Import direction: data moves left to right (STYLE.md, Layout).

Every module under relay/ is parsed with ``ast``; each ``relay.*`` import it
makes (at module level or inside a function) must point to the same or an
earlier stage.  ``config``, ``errors`` and ``model`` may be imported from
anywhere; ``relay/__init__.py`` is ignored.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "relay")

# Stage of each top-level name under relay/ (module or package).
STAGES: dict[str, int] = {}
for rank, names in enumerate(
    [
        ("config", "errors", "model"),
        # Every stage writes its figures into the stats ring (only cli reads
        # them), so the ring's layout sits below the stages, not after them.
        ("stats",),
        # The connection to RabbitMQ that AMQP intake and the cluster share.
        ("broker",),
        # The per-connection timeout timer of intake and delivery.
        ("timers",),
        ("_ref", "_fast", "accel"),
        ("intake",),
        ("dkim",),
        ("route",),
        ("spool",),
        ("deliver",),
        ("outcome",),
        # feeds read committed events from the spool; never on the delivery path.
        ("feeds",),
        # dispatch is the worker's delivery loop, wiring deliver/outcome/spool.
        ("dispatch",),
        # ops: the operator verbs behind both relayctl and /api/admin.
        ("cli", "ops"),
        ("worker", "supervisor", "control", "preflight"),
        # testing is test infrastructure that no relay module may import.
        ("testing",),
    ]
):
    for name in names:
        STAGES[name] = rank

ALWAYS_ALLOWED = {"config", "errors", "model"}

# Backward edges present in the tree and reported as bugs: (importer, imported).
KNOWN_BACKWARD: set[tuple[str, str]] = set()


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")]
    parts = rel.split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, str]:
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found[_module_name(path)] = path
    return found


def _is_package(module: str, path: str) -> bool:
    return os.path.basename(path) == "__init__.py"


def _imports(module: str, path: str) -> set[str]:
    """Every relay.* module name the file imports (absolute or relative)."""
    with open(path, encoding="utf-8") as file:
        tree = ast.parse(file.read(), filename=path)
    package = module if _is_package(module, path) else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "relay")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "relay":
                continue
            # "from relay import config" names a submodule: count it as one.
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if target == "relay" else target)
    return found


def _stage_name(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _edges() -> list[tuple[str, str]]:
    edges = []
    for module, path in sorted(_modules().items()):
        if module == "relay":
            continue
        for imported in sorted(_imports(module, path)):
            edges.append((module, imported))
    return edges


def test_the_walker_finds_known_imports():
    # Guards the test itself: if the walker found nothing it would pass vacuously.
    edges = set(_edges())
    assert ("relay.route.shard", "relay.intake.policy") in edges
    assert ("relay.spool.store", "relay.route.shard") in edges
    assert ("relay.supervisor", "relay.worker") in edges  # imported inside a function
    assert ("relay.cli.config_cmd", "relay.config") in edges  # "from relay import config"


def test_every_relay_module_belongs_to_a_stage():
    unknown = {
        _stage_name(module)
        for module in _modules()
        if module != "relay" and _stage_name(module) not in STAGES
    }
    assert not unknown, f"add these to the stage order in test_layout.py: {sorted(unknown)}"


def _violations() -> list[tuple[str, str]]:
    bad = []
    for importer, imported in _edges():
        src, dst = _stage_name(importer), _stage_name(imported)
        if dst is None or dst in ALWAYS_ALLOWED or dst not in STAGES or src not in STAGES:
            continue  # relay/__init__ attributes, the base modules, or unknown (see above)
        if STAGES[dst] > STAGES[src]:
            bad.append((importer, imported))
    return bad


def test_no_backward_imports():
    violations = [edge for edge in _violations() if edge not in KNOWN_BACKWARD]
    assert not violations, "backward imports (later stage imported by an earlier one): " + ", ".join(
        f"{a} -> {b}" for a, b in violations
    )


def test_known_backward_edges_are_still_real():
    # When a reported edge is fixed, drop it from KNOWN_BACKWARD.
    assert KNOWN_BACKWARD <= set(_violations())


_CYTHON_IMPORT = re.compile(r"^\s*(?:from\s+(relay[\w.]*)\s+c?import|c?import\s+(relay[\w.]*))", re.M)


def test_fast_extensions_import_only_errors_from_relay():
    """STYLE.md: ``_fast`` imports nothing from relay except errors (.pyx/.pxd too)."""
    fast = os.path.join(PACKAGE, "_fast")
    if not os.path.isdir(fast):
        pytest.skip("no relay/_fast")
    offenders = []
    for name in sorted(os.listdir(fast)):
        if not name.endswith((".py", ".pyx", ".pxd", ".pyi")):
            continue
        with open(os.path.join(fast, name), encoding="utf-8") as file:
            text = file.read()
        for match in _CYTHON_IMPORT.finditer(text):
            target = match.group(1) or match.group(2)
            if target not in ("relay.errors",) and not target.startswith("relay._fast"):
                offenders.append(f"{name}: {target}")
    assert not offenders


def test_nothing_imports_the_test_infrastructure():
    users = [a for a, b in _edges() if _stage_name(b) == "testing" and _stage_name(a) != "testing"]
    assert not users


def test_stage_ranks_follow_the_documented_order():
    assert STAGES["config"] < STAGES["accel"] < STAGES["intake"] < STAGES["dkim"] < STAGES["route"]
    assert STAGES["route"] < STAGES["spool"] < STAGES["deliver"] < STAGES["outcome"]
    assert STAGES["outcome"] < STAGES["dispatch"] < STAGES["cli"] < STAGES["worker"] == STAGES["supervisor"]
    # Written to by every stage, read only by cli.
    assert STAGES["stats"] < STAGES["intake"]
