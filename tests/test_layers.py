"""The import rules of docs/architecture.md and DESIGN.md, enforced on the source tree.

Every module of ``engine/``, ``storage/``, ``service/``, ``migrations/`` and ``cli.py`` is
parsed with :mod:`ast` (nothing is imported: no module's side effects, no torch needed) and:

1. pure engine modules (every module of ``engine/`` outside ``ORCHESTRATION``) import
   neither ``storage`` nor an orchestration module;
2. ``storage`` imports nothing from ``engine`` but ``engine.errors`` and ``engine.centroids``;
3. ``cli.py`` and ``service/`` do not import ``storage`` (except ``cli.cmd_db``, the
   database-administration command), and nothing but ``engine/__init__.py`` imports
   ``engine.engine``;
4. there are no import cycles among the project's modules;
5. every import of a project module names the installed package: ``from voiceprint.engine
   import audio``, never ``from engine import audio`` (that works only from the repository
   root, and there it loads a second copy of the module). This rule covers ``tests/`` and
   ``bench/`` too.

The modules are named here as on disk (``engine.audio``); ``voiceprint.`` is taken off
every import before the rules look at it. The root ``__init__.py`` is ``voiceprint``.

Imports are counted wherever they are written: at module level, inside functions (a lazy
import is still a dependency) and, for rules 1-3, under ``if TYPE_CHECKING:`` too (knowing
another layer's types is knowing that layer). Only the cycle rule leaves type-only imports
out, because they never run. ``importlib.import_module("literal")`` counts as an import.
``from engine import audio`` is an import of ``engine.audio`` (a module of the tree), while
``from engine import Engine`` is one of ``engine`` itself. ``import engine.audio`` counts as
an edge to ``engine.audio`` only, not to the ``engine`` package Python runs on the way:
counting those would tie every lazy package ``__init__`` into a knot with all below it.

A separate test keeps every source file outside ``tests/`` within ``MAX_LINES`` lines.

The checkers take source text, not the disk, so the second half of this file proves on
small synthetic trees that each rule does fail when broken.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "storage", "service", "migrations")
MODULES = ("cli.py", "__init__.py")
PACKAGE = "voiceprint"  # what pyproject.toml installs the repository root as
PROJECT_TOPS = frozenset({*PACKAGES, "cli"})  # names that must be written under PACKAGE
# Orchestration: the engine modules that may talk to storage and to each other. Names,
# not files: some are still to be written, and a missing one is simply not there.
ORCHESTRATION = frozenset(
    {
        "engine",  # engine/__init__.py
        "engine.engine",
        "engine.enrollment",
        "engine.recognition",
        "engine.refresh",
        "engine.models",
        "engine.jobs",
        "engine.evaluation",
        "engine.scheduler",
        "engine.access",
        "engine.health",
        "engine.diarizer",
        "engine.discovery",
        "engine.diarize_jobs",
        "engine.live_index",
    }
)
STORAGE_MAY_IMPORT = frozenset({"engine.errors", "engine.centroids"})
STORAGE_ALLOWED_IN = {"cli": "cmd_db"}  # module -> the one function that may import storage
FACADE = "engine.engine"
FACADE_IMPORTED_BY = "engine"  # engine/__init__.py, lazily
MAX_LINES = 500
# Files allowed past MAX_LINES, each with its own ceiling and the reason; the ceiling keeps
# the exception from growing unnoticed.
LONG_FILES_ALLOWED = {
    # The table of ~25 commands (one parser function, read top to bottom) and each
    # command's text rendering; split across files, a command's flags and its output
    # would live apart. DESIGN.md fixes cli.py as one file at the top level, so the
    # ceiling grows only with new commands.
    "cli.py": 934,  # 910 before `voiceprint index status`, 924 before `db upgrade` imported checkpoint files, 932 before recall
}
LENGTH_CHECKED = ("engine", "storage", "service", "migrations", "bench", "cli.py")
SOURCE_SUFFIXES = (".py",)


# --- the checkers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    path: str  # the importer's file, relative to the repository root
    line: int
    target: str  # dotted name of the module imported (resolved, see resolve())
    functions: tuple[str, ...]  # the enclosing functions, outermost first; () at module level
    type_checking: bool  # under ``if TYPE_CHECKING:``
    bare: bool = False  # written without the ``voiceprint.`` prefix (rule 5)

    def where(self) -> str:
        inside = f" (in {'.'.join(self.functions)})" if self.functions else ""
        return f"{self.path}:{self.line}{inside}"


def module_name(path: str) -> tuple[str, bool]:
    """``engine/encoders/__init__.py`` -> ``("engine.encoders", True)``; ``cli.py`` -> ``("cli", False)``;
    the root ``__init__.py`` -> ``("voiceprint", True)``."""
    parts = list(Path(path).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts) or PACKAGE, is_package


def unprefixed(name: str) -> str:
    """``voiceprint.engine.audio`` -> ``engine.audio``: the on-disk name the rules use."""
    return name[len(PACKAGE) + 1 :] if name.startswith(PACKAGE + ".") else name


def is_bare(name: str) -> bool:
    return name.partition(".")[0] in PROJECT_TOPS


def resolve(base: str, names: Iterable[str], known: set[str]) -> list[str]:
    """What ``from base import a, b`` imports: ``base.a`` where that is a module, else ``base``."""
    targets = []
    for name in names:
        sub = f"{base}.{name}" if base and base != PACKAGE else name  # ``from voiceprint import cli``: ``cli``
        targets.append(sub if sub in known else base)
    return list(dict.fromkeys(t for t in targets if t))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def parse_imports(source: str, path: str, known: set[str]) -> list[Import]:
    """Every import written in ``source`` (the file at ``path``), resolved against ``known`` modules."""
    importer, is_package = module_name(path)
    package = importer if is_package else importer.rpartition(".")[0]
    found: list[Import] = []

    def add(node: ast.AST, target: str, functions: tuple[str, ...], type_checking: bool, bare: bool = False) -> None:
        found.append(Import(importer, path, node.lineno, unprefixed(target), functions, type_checking, bare))

    def absolute(module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        anchor = package.split(".") if package else []
        if level > 1:
            anchor = anchor[: len(anchor) - (level - 1)]
        return ".".join([*anchor, *([module] if module else [])])

    def visit(node: ast.AST, functions: tuple[str, ...], type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, functions, type_checking, is_bare(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.module, node.level)
            bare = node.level == 0 and is_bare(base)
            base = base if base == PACKAGE else unprefixed(base)
            for target in resolve(base, [a.name for a in node.names], known):
                add(node, target, functions, type_checking, bare)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            add(node, node.args[0].value, functions, type_checking, is_bare(node.args[0].value))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, functions, True)
            for child in node.orelse:
                visit(child, functions, type_checking)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions = (*functions, node.name)
        for child in ast.iter_child_nodes(node):
            visit(child, functions, type_checking)

    visit(ast.parse(source, filename=path), (), False)
    return found


def collect(sources: Mapping[str, str], unparsed: list[str] | None = None) -> list[Import]:
    """The imports of a tree given as ``{relative path: source text}``.

    A file that does not parse is left out and named in ``unparsed`` when that is given
    (so one broken file does not hide the rules of the others), else its error is raised.
    """
    known = {module_name(path)[0] for path in sources}
    found = []
    for path, text in sorted(sources.items()):
        try:
            found += parse_imports(text, path, known)
        except SyntaxError as exc:
            if unparsed is None:
                raise
            unparsed.append(f"{path}:{exc.lineno}: does not parse: {exc.msg}")
    return found


def _top(name: str) -> str:
    return name.partition(".")[0]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_pure(module: str) -> bool:
    return _top(module) == "engine" and module not in ORCHESTRATION


def pure_violations(imports: Iterable[Import]) -> list[str]:
    out = []
    for imp in imports:
        if not is_pure(imp.importer):
            continue
        if _top(imp.target) == "storage":
            out.append(f"{imp.where()}: pure module {imp.importer} imports {imp.target}")
        elif imp.target in ORCHESTRATION:
            out.append(f"{imp.where()}: pure module {imp.importer} imports orchestration module {imp.target}")
    return out


def storage_violations(imports: Iterable[Import]) -> list[str]:
    return [
        f"{imp.where()}: {imp.importer} imports {imp.target} (storage may import only {sorted(STORAGE_MAY_IMPORT)} from engine)"
        for imp in imports
        if _top(imp.importer) == "storage" and _top(imp.target) == "engine" and imp.target not in STORAGE_MAY_IMPORT
    ]


def facade_violations(imports: Iterable[Import]) -> list[str]:
    out = []
    for imp in imports:
        front = imp.importer == "cli" or _top(imp.importer) == "service"
        allowed = STORAGE_ALLOWED_IN.get(imp.importer)
        if front and _top(imp.target) == "storage" and allowed not in imp.functions:
            out.append(f"{imp.where()}: {imp.importer} imports {imp.target}; use the engine.Engine facade")
        if _within(imp.target, FACADE) and imp.importer != FACADE_IMPORTED_BY and imp.importer != FACADE:
            out.append(f"{imp.where()}: {imp.importer} imports {imp.target}; only engine/__init__.py may")
    return out


def bare_violations(imports: Iterable[Import]) -> list[str]:
    return [
        f"{imp.where()}: {imp.importer} imports {imp.target} without the package; write {PACKAGE}.{imp.target}"
        for imp in imports
        if imp.bare
    ]


def import_graph(imports: Iterable[Import]) -> dict[str, dict[str, Import]]:
    """module -> {imported project module: the first import that does it}; type-only imports left out."""
    imports = list(imports)
    project = {imp.importer for imp in imports}
    graph: dict[str, dict[str, Import]] = {m: {} for m in project}
    for imp in imports:
        if not imp.type_checking and imp.target in project and imp.target != imp.importer:
            graph[imp.importer].setdefault(imp.target, imp)
    return graph


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The groups of two or more modules that reach each other (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # the tree is small: recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(groups)


def shortest_cycle(graph: Mapping[str, Iterable[str]], group: list[str]) -> list[str]:
    """The shortest cycle ``[start, ..., start]`` through the group's first module (breadth-first)."""
    members, start = set(group), group[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    return [*paths[node], start]
                if nxt in members and nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise ValueError(f"{group} is not strongly connected")


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle per group of modules that import each other."""
    return [shortest_cycle(graph, group) for group in strongly_connected(graph)]


def cycle_violations(imports: Iterable[Import]) -> list[str]:
    graph = import_graph(imports)
    out = []
    for group in strongly_connected(graph):
        cycle = shortest_cycle(graph, group)
        steps = "; ".join(f"{a} -> {b} ({graph[a][b].where()})" for a, b in zip(cycle, cycle[1:]))
        circle = f"import cycle: {steps}"
        if len(group) > len(cycle) - 1:
            circle += f" [one of {len(group)} modules that reach each other: {', '.join(group)}]"
        out.append(circle)
    return out


def store_reaches(source: str, path: str) -> list[str]:
    """Places where ``path`` reads an ``.store`` attribute: reaching past the facade."""
    return [
        f"{path}:{node.lineno}: uses .store (go through the Engine's methods)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr == "store"
    ]


def long_files(lengths: Mapping[str, int], limit: int = MAX_LINES, allowed: Mapping[str, int] = {}) -> list[str]:
    limits = {path: allowed.get(path, limit) for path in lengths}
    return [f"{path}: {n} lines (limit {limits[path]})" for path, n in sorted(lengths.items()) if n > limits[path]]


def line_count(text: str) -> int:
    return len(text.splitlines())


# --- the real tree -----------------------------------------------------------------------


def _files(roots: Iterable[str], suffixes: tuple[str, ...] = (".py",)) -> list[Path]:
    files = []
    for root in roots:
        path = ROOT / root
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts]
    return sorted(files)


@dataclass
class Tree:
    imports: list[Import]
    unparsed: list[str]

    def __repr__(self) -> str:  # pytest prints fixtures of a failed test: keep that short
        return f"Tree({len(self.imports)} imports, {len(self.unparsed)} files that do not parse)"


@pytest.fixture(scope="module")
def tree() -> Tree:
    files = _files([*PACKAGES, *MODULES])
    assert any(p.name == "engine.py" for p in files), f"no engine/engine.py under {ROOT}: is this the repository?"
    unparsed: list[str] = []
    imports = collect({p.relative_to(ROOT).as_posix(): p.read_text() for p in files}, unparsed)
    return Tree(imports, unparsed)


def test_every_checked_module_parses(tree):
    _verdict(tree.unparsed)


def _verdict(problems: list[str]) -> None:
    assert not problems, f"{len(problems)} broken:\n" + "\n".join(problems)


def test_pure_engine_modules_use_neither_storage_nor_orchestration(tree):
    _verdict(pure_violations(tree.imports))


def test_storage_imports_only_errors_and_centroids_from_engine(tree):
    _verdict(storage_violations(tree.imports))


def test_cli_and_service_use_the_facade(tree):
    _verdict(facade_violations(tree.imports))


def test_cli_and_service_never_reach_into_the_engines_store():
    files = _files(["service", *MODULES])
    _verdict([v for p in files for v in store_reaches(p.read_text(), p.relative_to(ROOT).as_posix())])


def test_store_reach_rule():
    assert store_reaches("def f(eng):\n    return eng.store.jobs.list_jobs()\n", "cli.py") == [
        "cli.py:2: uses .store (go through the Engine's methods)"
    ]
    assert store_reaches("def f(eng):\n    return eng.jobs()\n", "cli.py") == []


def test_no_import_cycles(tree):
    _verdict(cycle_violations(tree.imports))


def test_project_imports_name_the_installed_package():
    files = _files([*PACKAGES, *MODULES, "tests", "bench"])
    sources = {p.relative_to(ROOT).as_posix(): p.read_text() for p in files}
    _verdict(bare_violations(collect(sources)))


def test_no_source_file_outside_tests_is_long():
    files = _files(LENGTH_CHECKED, SOURCE_SUFFIXES)
    _verdict(long_files({p.relative_to(ROOT).as_posix(): line_count(p.read_text()) for p in files}, allowed=LONG_FILES_ALLOWED))


# --- the checkers fail when a rule is broken ---------------------------------------------


def imports_of(sources: dict[str, str]) -> list[Import]:
    """The imports of a synthetic tree ``{"engine/audio": "import storage", ...}`` (``.py`` implied)."""
    return collect({name + ".py": text for name, text in sources.items()})


def test_a_file_that_does_not_parse_is_named_and_the_others_still_checked():
    unparsed: list[str] = []
    found = collect({"engine/audio.py": "import storage\n", "cli.py": "def f(:\n"}, unparsed)
    assert [i.target for i in found] == ["storage"]
    assert len(unparsed) == 1 and unparsed[0].startswith("cli.py:1: does not parse")
    with pytest.raises(SyntaxError):
        collect({"cli.py": "def f(:\n"})


def test_module_names():
    assert module_name("engine/encoders/__init__.py") == ("engine.encoders", True)
    assert module_name("engine/__init__.py") == ("engine", True)
    assert module_name("cli.py") == ("cli", False)
    assert module_name("__init__.py") == ("voiceprint", True)


def test_the_package_prefix_is_taken_off_and_bare_project_imports_are_caught():
    found = imports_of(
        {
            "cli": (
                "from voiceprint.engine import Engine\n"
                "from voiceprint import migrations, Engine\n"
                "import voiceprint.storage.db\n"
                "from engine.errors import NotFound\n"
                "import cli\n"
                "import importlib\nm = importlib.import_module('storage.db')\n"
            ),
            "engine/__init__": "",
            "engine/errors": "",
            "migrations/__init__": "",
            "storage/db": "",
            "__init__": "from .engine import Engine\n",
        }
    )
    cli = [(i.line, i.target, i.bare) for i in found if i.importer == "cli" and i.target != "importlib"]
    assert cli == [
        (1, "engine", False),
        (2, "migrations", False),
        (2, "voiceprint", False),
        (3, "storage.db", False),
        (4, "engine.errors", True),
        (5, "cli", True),
        (7, "storage.db", True),
    ]
    assert [(i.importer, i.target) for i in found if i.path == "__init__.py"] == [("voiceprint", "engine")]
    assert bare_violations(found) == [
        "cli.py:4: cli imports engine.errors without the package; write voiceprint.engine.errors",
        "cli.py:5: cli imports cli without the package; write voiceprint.cli",
        "cli.py:7: cli imports storage.db without the package; write voiceprint.storage.db",
    ]


def test_imports_are_resolved_to_modules_where_they_are_modules():
    found = imports_of(
        {
            "engine/audio": "from engine import errors, config\nfrom engine.errors import AudioError\nimport numpy\n",
            "engine/errors": "",
            "engine/__init__": "",
        }
    )
    audio = [i for i in found if i.importer == "engine.audio"]
    # engine.config is no module of this tree, so ``config`` is a name in the package
    assert [i.target for i in audio] == ["engine.errors", "engine", "engine.errors", "numpy"]
    assert [i.line for i in audio] == [1, 1, 2, 3]


def test_relative_imports_are_resolved():
    found = imports_of(
        {
            "engine/losses/__init__": "from . import margins\nfrom .margins import aam\nfrom .. import errors\n",
            "engine/losses/margins": "from ..errors import InvalidInput\nfrom . import LOSSES\n",
            "engine/errors": "",
        }
    )
    by = {(i.importer, i.line): i.target for i in found}
    assert by == {
        ("engine.losses", 1): "engine.losses.margins",
        ("engine.losses", 2): "engine.losses.margins",
        ("engine.losses", 3): "engine.errors",
        ("engine.losses.margins", 1): "engine.errors",
        ("engine.losses.margins", 2): "engine.losses",
    }


def test_function_level_type_checking_and_dynamic_imports_are_seen():
    found = imports_of(
        {
            "engine/scoring": (
                "from typing import TYPE_CHECKING\n"
                "import importlib\n"
                "def f():\n    def g():\n        import storage\n"
                "if TYPE_CHECKING:\n    from engine.engine import Engine\n"
                "m = importlib.import_module('engine.refresh')\n"
            )
        }
    )
    lazy, typed, dynamic = [i for i in found if i.target not in ("typing", "importlib")]
    assert (lazy.target, lazy.functions, lazy.type_checking) == ("storage", ("f", "g"), False)
    assert (typed.target, typed.type_checking) == ("engine.engine", True)
    assert (dynamic.target, dynamic.line) == ("engine.refresh", 8)


def test_pure_rule_catches_storage_and_orchestration_imports():
    found = imports_of(
        {
            "engine/audio": "import storage.store\n",
            "engine/encoders/ge2e_lstm": "def build():\n    from engine.refresh import run\n",
            "engine/losses/aam": "from engine import Engine\n",  # the package __init__ is the facade's door
            "engine/gate": "from engine.enrollment import Enroller\n",  # an orchestration name not (yet) on disk
            "engine/index": "from engine import errors\nimport numpy\n",  # allowed
            "engine/errors": "",
            "engine/refresh": "import storage\nfrom engine import models\n",  # orchestration may
            "engine/__init__": "",
        }
    )
    assert pure_violations(found) == [
        "engine/audio.py:1: pure module engine.audio imports storage.store",
        "engine/encoders/ge2e_lstm.py:2 (in build): pure module engine.encoders.ge2e_lstm imports orchestration module engine.refresh",
        "engine/gate.py:1: pure module engine.gate imports orchestration module engine.enrollment",
        "engine/losses/aam.py:1: pure module engine.losses.aam imports orchestration module engine",
    ]


def test_pure_rule_sees_type_only_imports():
    found = imports_of({"engine/scoring": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from storage import Store\n"})
    assert pure_violations(found) == ["engine/scoring.py:3: pure module engine.scoring imports storage"]


def test_storage_rule():
    found = imports_of(
        {
            "storage/profiles": "from engine.errors import NotFound\nfrom engine.centroids import RunningCentroid\nimport sqlalchemy\n",
            "storage/registry": "from engine.config import Config\n",
            "storage/jobs": "def later():\n    import engine\n",
            "engine/errors": "",
            "engine/centroids": "",
            "engine/config": "",
            "engine/__init__": "",
        }
    )
    allowed = "(storage may import only ['engine.centroids', 'engine.errors'] from engine)"
    assert storage_violations(found) == [
        f"storage/jobs.py:2 (in later): storage.jobs imports engine {allowed}",
        f"storage/registry.py:1: storage.registry imports engine.config {allowed}",
    ]


def test_facade_rule():
    found = imports_of(
        {
            "cli": (
                "from engine import Engine\n"
                "def cmd_db(args):\n    from storage import Store\n"  # the one exception
                "def cmd_other(args):\n    from storage import Store\n"
                "def cmd_home(args):\n    from engine.engine import resolve_home\n"
            ),
            "service/app": "from storage.records import Job\n",
            "service/routes": "from engine import engine\n",
            "engine/__init__": "def __getattr__(name):\n    from engine.engine import Engine\n",  # allowed
            "engine/engine": "",
            "engine/refresh": "from engine.engine import Engine\n",
        }
    )
    assert facade_violations(found) == [
        "cli.py:5 (in cmd_other): cli imports storage; use the engine.Engine facade",
        "cli.py:7 (in cmd_home): cli imports engine.engine; only engine/__init__.py may",
        "engine/refresh.py:1: engine.refresh imports engine.engine; only engine/__init__.py may",
        "service/app.py:1: service.app imports storage.records; use the engine.Engine facade",
        "service/routes.py:1: service.routes imports engine.engine; only engine/__init__.py may",
    ]


def test_cycle_rule_reports_the_circle():
    found = imports_of(
        {
            "engine/engine": "from engine import refresh\n",
            "engine/refresh": "def run():\n    from engine.engine import Engine\n",  # a lazy import still closes it
            "engine/audio": "from engine import errors\n",
            "engine/errors": "",
            "engine/__init__": "",
        }
    )
    assert cycle_violations(found) == [
        "import cycle: engine.engine -> engine.refresh (engine/engine.py:1); "
        "engine.refresh -> engine.engine (engine/refresh.py:2 (in run))"
    ]


def test_cycle_rule_names_every_module_of_a_larger_knot():
    # the registry pattern: a package imports its families, each family imports the package
    found = imports_of(
        {
            "engine/losses/__init__": "from engine.losses import aam, triplet\n",
            "engine/losses/aam": "from engine.losses import LOSSES\n",
            "engine/losses/triplet": "from engine.losses import LOSSES\n",
        }
    )
    assert cycle_violations(found) == [
        "import cycle: engine.losses -> engine.losses.aam (engine/losses/__init__.py:1); "
        "engine.losses.aam -> engine.losses (engine/losses/aam.py:1) "
        "[one of 3 modules that reach each other: engine.losses, engine.losses.aam, engine.losses.triplet]"
    ]


def test_cycle_rule_leaves_type_only_imports_out_and_finds_longer_circles():
    type_only = imports_of({"a": "import b\n", "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"})
    assert cycle_violations(type_only) == []
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "x": ["y"], "y": ["x"]}) == [
        ["a", "b", "c", "a"],
        ["x", "y", "x"],
    ]
    assert find_cycles({"a": ["b"], "b": ["c"], "c": []}) == []


def test_long_file_rule():
    assert long_files({"storage/store.py": 1290, "cli.py": 500, "engine/x.py": 12}) == ["storage/store.py: 1290 lines (limit 500)"]
    assert long_files({"cli.py": 700}, allowed={"cli.py": 660}) == ["cli.py: 700 lines (limit 660)"]
    assert long_files({"cli.py": 640}, allowed={"cli.py": 660}) == []
    assert line_count("a\nb\n") == 2 and line_count("") == 0
