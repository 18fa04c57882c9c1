"""The import graph runs one way: every module sits on one layer of :data:`LAYERS` and imports
only its own layer or those below; no import cycle; the demo application (``janus_demo``) imports
the library (``janus_train``), never the reverse."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import iter_library_asts, library_files, parse_module

ROOT = Path(__file__).resolve().parents[1]
APPS = ("janus_demo",)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement in `path`, at any depth."""
    return _tree_imports(parse_module(path))


def _tree_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement in `tree`, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _app_imports(path: Path, root: Path = ROOT) -> list[str]:
    return [
        f"{path.relative_to(root)}:{line} imports {mod}"
        for line, mod in _imports(path)
        if mod.split(".")[0] in APPS
        or mod in ("janus_train.demo",)
        or mod.startswith("janus_train.demo.")
    ]


def test_library_never_imports_an_application():
    files = sorted((ROOT / "janus_train").rglob("*.py"))
    assert len(files) > 20  # the walk found the package
    assert not (ROOT / "janus_train" / "demo").exists(), "the demo lives in janus_demo/"
    bad = [b for f in files for b in _app_imports(f)]
    assert bad == []


@pytest.mark.parametrize(
    "src",
    [
        "import janus_demo",
        "from janus_demo.world import Obj",
        "def f():\n    import janus_demo.vq\n",
        "from janus_train import demo",
        "from janus_train.demo.synth import main",
    ],
)
def test_the_check_sees_every_import_form(tmp_path, src):
    f = tmp_path / "m.py"
    f.write_text(src)
    assert len(_app_imports(f, tmp_path)) >= 1


LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "contract",
        (
            "janus_train",
            "janus_train.batch",
            "janus_train.step_loader",
            "janus_train.errors",
            "janus_train.quiet",
            "janus_train.compat",
        ),
    ),
    ("model", ("janus_train.model", "janus_train.model.*")),
    (
        "data I/O",
        (
            "janus_train.data",
            "janus_train.data.tario",
            "janus_train.data.preprocess",
            "janus_train.data.packing",
            "janus_train.data.recipe_schema",
        ),
    ),
    ("data", ("janus_train.data.*",)),
    ("trainer", ("janus_train.trainer", "janus_train.trainer.*")),
    ("config", ("janus_train.config", "janus_train.cli_help")),
    ("plan", ("janus_train.plan", "janus_train.plan.*")),
    ("evaluation", ("janus_train.sample", "janus_train.evaluate")),
    ("training app", ("janus_train.train",)),
    ("command lines", ("janus_train.cli", "janus_train.cli.*")),
    ("demo app", ("janus_demo", "janus_demo.*")),
]
"""The layers, lowest first. A module is on the first layer with an exact name for it, else on
the first whose ``pkg.*`` covers it. The command lines (``janus_train/cli/``) sit above the whole
library, the training app (``train.py``, the loop written out) included: no library module
imports one."""

PLUGIN_LOADERS = {"janus_train/evaluate.py"}
"""Where an import by string is allowed: a function the user names in the config
(``eval.metrics``), not a module of this repository chosen by the code."""


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer_of(mod: str) -> int | None:
    for i, (_, names) in enumerate(LAYERS):
        if mod in names:
            return i
    for i, (_, names) in enumerate(LAYERS):
        if any(n.endswith(".*") and mod.startswith(n[:-1]) for n in names):
            return i
    return None


def _graph(root: Path = ROOT, pkgs=("janus_train", *APPS)) -> dict[str, dict[str, int]]:
    """module -> {module of this repository it imports: line}, imports at any depth (inside
    functions and ``TYPE_CHECKING`` blocks too); ``from pkg import mod`` counts as ``pkg.mod``."""
    files = {_module_name(f, root): f for p in pkgs for f in sorted((root / p).rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for mod, f in files.items():
        out: dict[str, int] = {}
        for line, name in _imports(f):
            target = next((m for m in (name, name.rpartition(".")[0]) if m in files), None)
            if target and target != mod:
                out.setdefault(target, line)
        graph[mod] = out
    return graph


def _upward(graph: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        for dep, line in sorted(deps.items()):
            if _layer_of(dep) > _layer_of(mod):
                bad.append(
                    f"{mod}:{line} ({LAYERS[_layer_of(mod)][0]}) imports {dep} "
                    f"({LAYERS[_layer_of(dep)][0]})"
                )
    return bad


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _imports_by_string(path: Path) -> list[int]:
    """Lines that import a module named by a string (``importlib.import_module``,
    ``__import__``): an arrow the checks above cannot see."""
    return [
        n.lineno
        for n in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(n, ast.Call)
        and (
            (isinstance(n.func, ast.Attribute) and n.func.attr == "import_module")
            or (isinstance(n.func, ast.Name) and n.func.id in ("import_module", "__import__"))
        )
    ]


def test_every_module_sits_on_one_layer_and_imports_only_downward():
    graph = _graph()
    assert len(graph) > 60 and "janus_train.cli.data" in graph  # the walk found the packages
    assert [m for m in sorted(graph) if _layer_of(m) is None] == []
    assert _upward(graph) == []
    assert _layer_of("janus_train.cli.data") > _layer_of("janus_train.train")
    assert _layer_of("janus_train.config") > _layer_of("janus_train.data.recipe")
    assert _layer_of("janus_train.data.tario") < _layer_of("janus_train.data.recipe")


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_no_import_by_string():
    bad = [
        f"{f.relative_to(ROOT)}:{line}"
        for f in library_files()
        if f.relative_to(ROOT).as_posix() not in PLUGIN_LOADERS
        for line in _imports_by_string(f)
    ]
    assert bad == []


def test_the_layer_checks_see_upward_imports_cycles_and_string_imports(tmp_path):
    pkg = tmp_path / "janus_train"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "batch.py").write_text("def f():\n    from janus_train.model import lora\n")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "freeze.py").write_text("from janus_train.model.lora import x\n")
    (pkg / "model" / "lora.py").write_text("import janus_train.model.freeze\n")
    graph = _graph(tmp_path, ("janus_train",))
    assert _upward(graph) == [
        "janus_train.batch:2 (contract) imports janus_train.model (model)",
        "janus_train.batch:2 (contract) imports janus_train.model.lora (model)",
    ]
    assert _cycles(graph) == [["janus_train.model.freeze", "janus_train.model.lora"]]
    (pkg / "cli.py").write_text("import importlib\nm = importlib.import_module('janus_demo.x')\n")
    assert _imports_by_string(pkg / "cli.py") == [2]
    assert _layer_of("janus_train.cli.plan") == [n for n, _ in LAYERS].index("command lines")
    assert _layer_of("janus_train.plan.search") == [n for n, _ in LAYERS].index("plan")


def _command_line_lines(path: Path) -> list[int]:
    """Lines that make a program of a module: an ``ArgumentParser``, ``sys.argv``, a ``main``
    function, an ``if __name__ == "__main__"`` block."""
    out = []
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        func = getattr(n, "func", None) if isinstance(n, ast.Call) else None
        if (
            (isinstance(n, ast.Attribute) and n.attr == "argv")
            or (isinstance(func, ast.Attribute) and func.attr == "ArgumentParser")
            or (isinstance(func, ast.Name) and func.id == "ArgumentParser")
            or (isinstance(n, ast.FunctionDef) and n.name == "main")
            or (isinstance(n, ast.Constant) and n.value == "__main__")
        ):
            out.append(n.lineno)
    return out


def test_no_command_line_inside_the_library():
    """Programs live in janus_train/cli/, except the training app (``janus-train``, Hydra's)."""
    files = sorted((ROOT / "janus_train").rglob("*.py"))
    bad = [
        f"{f.relative_to(ROOT)}:{line}"
        for f in files
        if not f.relative_to(ROOT).as_posix().startswith("janus_train/cli/")
        and f.relative_to(ROOT).as_posix() != "janus_train/train.py"
        for line in _command_line_lines(f)
    ]
    assert bad == []
    assert _command_line_lines(ROOT / "janus_train/cli/data.py")  # the check sees one


def test_the_demo_app_imports_the_library():
    """The arrow that must exist: the app sits on top of janus_train."""
    mods = {m for f in (ROOT / "janus_demo").glob("*.py") for _, m in _imports(f)}
    assert any(m.startswith("janus_train") for m in mods)


def test_no_test_file_imports_another_test_file():
    """Shared test helpers live in tests/conftest.py, tests/helpers.py or tests/dist_utils.py."""
    bad = [
        f"{f.name}:{line} imports {mod}"
        for f in sorted((ROOT / "tests").glob("test_*.py"))
        for line, mod in _imports(f)
        if any(part.startswith("test_") for part in mod.split("."))
    ]
    assert bad == []


def test_the_batch_contract_is_defined_once():
    """The ignore index, the code-from-pixels marker, the task ids and the ratio splitter have
    one definition (janus_train/batch.py); everything else imports them."""
    names = {"IGNORE", "IGNORE_INDEX", "CODE_FROM_PIXELS", "TASK_ID", "TASK_IDS", "TASKS"}
    splitters = {"task_counts", "split_counts", "largest_remainder"}
    defined = []
    for f in sorted((ROOT / "janus_train").rglob("*.py")):
        for node in ast.parse(f.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            defined += [
                (f.name, t.id) for t in targets if isinstance(t, ast.Name) and t.id in names
            ]
            if isinstance(node, ast.FunctionDef) and node.name in splitters:
                defined.append((f.name, node.name))
    assert sorted(defined) == sorted(
        ("batch.py", n) for n in ("IGNORE", "CODE_FROM_PIXELS", "TASKS", "TASK_IDS", "task_counts")
    ), defined
    # -100 spelled out anywhere else is a second definition in disguise
    literal = [
        f"{f.relative_to(ROOT)}:{n.lineno}"
        for f in sorted((ROOT / "janus_train").rglob("*.py"))
        if f.name != "batch.py"
        for n in ast.walk(ast.parse(f.read_text()))
        if isinstance(n, ast.UnaryOp)
        and isinstance(n.op, ast.USub)
        and isinstance(n.operand, ast.Constant)
        and n.operand.value == 100
    ]
    assert literal == []


BATCH_FUNCS = {"collate", "check_batch", "count_supervised", "empty_batch"}
"""The batch contract's functions: defined in janus_train/batch.py only."""


def _top_level(names: set[str]) -> list[tuple[str, str]]:
    """(path, name) of every module-level function, class or assignment named in `names`."""
    out = []
    for f in sorted((ROOT / "janus_train").rglob("*.py")):
        rel = str(f.relative_to(ROOT / "janus_train"))
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in names:
                out.append((rel, node.name))
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            out += [(rel, t.id) for t in targets if isinstance(t, ast.Name) and t.id in names]
    return out


def test_collate_keys_and_counts_are_defined_once():
    """One collate (both loaders), one supervised-token count, one key list, one per-sample
    record, one empty micro-batch, one pixel normalisation; the old copies stay gone."""
    keys = {"TOKEN_KEYS", "REQUIRED_KEYS", "IMAGE_KEYS", "PAD_VALUES", "_ROW_KEYS", "_IMAGE_KEYS"}
    gone = {"pack_row", "trim_row", "concat_rows", "empty_micro"}
    norm = {"normalize_pixels_", "to_uint8", "images_to_float"}
    got = _top_level(BATCH_FUNCS | keys | gone | norm | {"Sample"})
    want = [("batch.py", n) for n in BATCH_FUNCS | keys - {"_ROW_KEYS", "_IMAGE_KEYS"}]
    want += [("batch.py", "Sample")]
    want += [("data/preprocess.py", n) for n in ("normalize_pixels_", "to_uint8")]
    assert sorted(got) == sorted(want)


def test_users_import_the_batch_contract():
    """Every module of the library, the demo and the benchmarks that calls a batch-contract
    function imports it from janus_train.batch; data, model, trainer loop, synthetic loader and
    a benchmark are among them."""
    users = {}
    for f in sorted(
        [*(ROOT / "janus_train").rglob("*.py"), *(ROOT / "janus_demo").rglob("*.py")]
        + [*(ROOT / "benchmarks").glob("*.py")]
    ):
        rel = str(f.relative_to(ROOT))
        if rel == "janus_train/batch.py":
            continue
        tree = ast.parse(f.read_text())
        called = {
            n.func.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in BATCH_FUNCS
        }
        imported = {
            a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "janus_train.batch"
            for a in n.names
        }
        assert called <= imported, f"{rel} calls {sorted(called - imported)} not from the contract"
        if imported:
            users[rel] = imported
    for rel, name in (
        ("janus_train/data/builders.py", "collate"),
        ("janus_train/data/step_loaders.py", "empty_batch"),
        ("janus_train/model/forward.py", "IGNORE"),
        ("janus_train/data/synthetic_loader.py", "collate"),
        ("janus_train/train.py", "count_supervised"),
        ("janus_train/train.py", "check_batch"),
        ("benchmarks/bench_ckpt.py", "count_supervised"),
    ):
        assert name in users.get(rel, set()), f"{rel} does not import {name}"


def test_one_ratio_splitter_for_both_loaders():
    """The synthetic loader splits a step like the data loader, ties included (und:text 1:1 with
    one sample goes to und in both)."""
    from janus_train.batch import task_counts
    from janus_train.data.synthetic_loader import split_by_ratio

    for n in range(1, 13):
        for ratio in (
            {"und": 1, "text": 1, "gen": 0},
            {"und": 2, "text": 3, "gen": 5},
            {"und": 6, "text": 1, "gen": 3},
            {"und": 1, "text": 1, "gen": 1},
        ):
            want = task_counts(ratio, n)
            got = split_by_ratio(n, ratio)
            assert {t: got.count(t) for t in want} == want
    assert split_by_ratio(1, {"und": 1, "text": 1, "gen": 0}) == ["und"]
    # independent: 7 samples at 2:3:5 -> quotas 1.4, 2.1, 3.5 -> 1+2+3, then gen (.5)
    assert task_counts({"und": 2, "text": 3, "gen": 5}, 7) == {"und": 1, "text": 2, "gen": 4}


def test_the_code_is_ruff_formatted_and_lint_clean():
    """`ruff format` at the configured 100 columns and `ruff check` (pyproject's [tool.ruff]) hold
    for every Python file; the dev extra installs ruff, so CI checks it with the tests."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    fmt = subprocess.run([ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = subprocess.run(
        [ruff, "check", "janus_train", "janus_demo", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


# --------------------------------------------------------------------------- data I/O, deps

TAR_MODULE = "janus_train/data/tario.py"
"""The one tar reader and writer; everything else reads and writes shards through it."""


def _tar_by_hand(rel: str, tree: ast.Module) -> list[str]:
    """Tar handling outside the one module in module ``rel`` (``tree``): importing tarfile, or
    webdataset's tar iteration / gopen; and anywhere, a tar written member by member (TarInfo,
    addfile)."""
    out = []
    inside = rel == TAR_MODULE
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and node.attr in ("TarInfo", "addfile"):
            out.append(f"{where} writes a tar by hand ({node.attr})")
        if inside:
            continue
        if isinstance(node, ast.Attribute) and node.attr in ("gopen", "tar_file_iterator"):
            out.append(f"{where} reads a tar stream ({node.attr})")
    out += [
        f"{rel}:{line} imports {mod}"
        for line, mod in _tree_imports(tree)
        if not inside
        and (mod.split(".")[0] == "tarfile" or mod.startswith("webdataset.tariterators"))
    ]
    return out


def test_one_tar_reader_and_no_tar_written_by_hand():
    modules = dict(iter_library_asts())
    assert TAR_MODULE in modules
    assert [b for rel, tree in modules.items() for b in _tar_by_hand(rel, tree)] == []


@pytest.mark.parametrize(
    "src",
    [
        "import tarfile",
        "def f(p):\n    import tarfile\n    return tarfile.open(p)\n",
        "from tarfile import open as topen",
        "import webdataset as wds\nwds.gopen('x')",
        "from webdataset.tariterators import tar_file_iterator",
        "def w(tf, ti, b):\n    tf.addfile(ti, b)\n",
    ],
)
def test_the_tar_check_sees_every_form(src):
    assert _tar_by_hand("m.py", ast.parse(src))


def _dist(requirement: str) -> str:
    import re

    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    """pyproject.toml's ``[project]`` table."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _undeclared(files: list[Path], root: Path = ROOT) -> list[str]:
    """Third-party top-level imports whose distribution (import name -> distribution, e.g. PIL ->
    pillow, yaml -> pyyaml, from the installed metadata; the import name itself when not
    installed) is not in pyproject's dependencies or a runtime extra (not ``dev``)."""
    import importlib.metadata
    import sys

    project = _project()
    extras = project.get("optional-dependencies", {})
    deps = project["dependencies"] + [d for k, ds in extras.items() if k != "dev" for d in ds]
    declared = {_dist(d) for d in deps}
    provides = importlib.metadata.packages_distributions()
    own = {"janus_train", *APPS, "tests", "benchmarks"}
    out = []
    for f in files:
        for line, mod in _imports(f):
            top = mod.split(".")[0]
            if top in sys.stdlib_module_names or top in own or top == "__future__":
                continue
            dists = {_dist(d) for d in provides.get(top, [top])}
            if not dists & declared:
                out.append(f"{f.relative_to(root)}:{line} imports {top} ({sorted(dists)})")
    return sorted(set(out))


def test_every_third_party_import_is_a_declared_dependency():
    assert _undeclared(library_files()) == []


@pytest.mark.parametrize("name", ["accelerate", "deepspeed"])
def test_what_transformers_deepspeed_integration_checks_is_declared(name):
    """ZeRO-3's partitioned load (``trainer.distributed.partitioned_load``) builds transformers'
    ``HfDeepSpeedConfig``, which checks accelerate's and deepspeed's versions against
    transformers' own table (``dep_version_check``): both are declared (accelerate once came
    only through peft), at a minimum that table accepts."""
    from packaging.requirements import Requirement
    from transformers.dependency_versions_table import deps

    declared = {_dist(d): Requirement(d).specifier for d in _project()["dependencies"]}
    assert name in declared, f"pyproject.toml does not declare {name}"
    floors = [s.version for s in declared[name] if s.operator == ">="]
    need = Requirement(deps[name]).specifier
    assert floors and all(need.contains(v, prereleases=True) for v in floors), (
        declared[name],
        need,
    )


@pytest.mark.parametrize("src", ["import pytest", "from no_such_pkg_xyz import y", "import ruff"])
def test_the_dependency_check_sees_undeclared_imports(tmp_path, src):
    f = tmp_path / "m.py"
    f.write_text(f"def f():\n    {src}\n")
    assert _undeclared([f], tmp_path)


# --------------------------------------------------------------------------- process group

DIST_MODULES = {"janus_train/trainer/distributed.py", "janus_train/compat.py"}
"""Where the process group is touched: ``trainer/distributed.py`` (every collective, the rank,
setup and teardown; the rest of the library calls its helpers) and ``compat.py`` (torch's
private timeout setter, behind its guard)."""


def _direct_dist(rel: str, tree: ast.Module) -> list[str]:
    """Uses of ``torch.distributed`` or ``deepspeed.comm`` in module ``rel`` (``tree``) outside
    :data:`DIST_MODULES`: an import of either (any form), or either reached as an attribute
    (``torch.distributed.x``)."""
    if rel in DIST_MODULES:
        return []
    dist = ("torch.distributed", "deepspeed.comm")
    out = [
        f"{rel}:{line} imports {mod}"
        for line, mod in _tree_imports(tree)
        if any(mod == d or mod.startswith(f"{d}.") for d in dist)
    ]
    out += [
        f"{rel}:{n.lineno} uses {n.value.id}.{n.attr}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and f"{n.value.id}.{n.attr}" in dist
    ]
    return out


def test_only_the_distributed_module_talks_to_the_process_group():
    modules = dict(iter_library_asts())
    assert set(modules) >= DIST_MODULES
    assert [b for rel, tree in modules.items() for b in _direct_dist(rel, tree)] == []


@pytest.mark.parametrize(
    "src",
    [
        "import torch.distributed as dist",
        "from torch import distributed",
        "def f():\n    from torch.distributed import all_gather_object\n",
        "import torch\nr = torch.distributed.get_rank()\n",
        "from deepspeed import comm",
        "import deepspeed\ndeepspeed.comm.barrier()\n",
    ],
)
def test_the_process_group_check_sees_every_form(src):
    assert _direct_dist("m.py", ast.parse(src))


# --------------------------------------------------------------------------- function length

MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS: dict[str, int] = {}
"""The library's functions still over :data:`MAX_FUNCTION_LINES` (``def`` to last line,
docstring included) and their length: none may grow, none may join (issue 25 names them; none
is left)."""


def _long_functions(files: list[Path], root: Path = ROOT) -> dict[str, int]:
    out = {}
    for f in files:
        rel = f.relative_to(root).as_posix()
        for n in ast.walk(ast.parse(f.read_text(), rel)):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                length = n.end_lineno - n.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out[f"{rel}:{n.name}"] = length
    return out


def test_no_library_function_over_80_lines_but_the_named_ones():
    long = _long_functions(sorted((ROOT / "janus_train").rglob("*.py")))
    grown = {k: v for k, v in long.items() if v > LONG_FUNCTIONS.get(k, MAX_FUNCTION_LINES)}
    assert grown == {}, f"over {MAX_FUNCTION_LINES} lines (or longer than allowed): {grown}"


def test_the_length_check_counts_from_def_to_the_last_line(tmp_path):
    f = tmp_path / "m.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    f.write_text(
        f"class A:\n    def ok(self):\n{body.replace('    x', '        x')}\n"
        f"def long():\n{body}    return 1\n"
    )
    assert _long_functions([f], tmp_path) == {"m.py:long": MAX_FUNCTION_LINES + 1}


def _readme_layout(text: str) -> set[str]:
    """The paths (``janus_train/plan/search.py``) that the README's architecture tree names: each
    entry is a name ending in ``/`` or ``.py`` indented two spaces per level."""
    block = text.split("## Architecture", 1)[1].split("```")[1]
    stack: list[str] = []
    out = set()
    for line in block.splitlines():
        name = line.strip().split(" ")[0]
        if not name.endswith(("/", ".py")):
            continue
        stack = [*stack[: (len(line) - len(line.lstrip(" "))) // 2], name]
        out.add("".join(stack))
    return out


def test_readme_architecture_names_every_module_and_no_other():
    named = {p for p in _readme_layout((ROOT / "README.md").read_text()) if p.endswith(".py")}
    files = {
        f.relative_to(ROOT).as_posix()
        for pkg in ("janus_train", "janus_demo")
        for f in (ROOT / pkg).rglob("*.py")
        if f.name != "__init__.py"
    }
    assert {"janus_train/plan/search.py", "janus_demo/vq.py"} <= named  # the parse works
    assert sorted(files - named) == [] and sorted(named - files) == []


def test_readme_architecture_names_every_script_and_config_group():
    """The architecture block's one-line entries (``benchmarks/``, ``launch/``, ``conf/``) name
    every benchmark script, launch script (``launch/``, ``launch/slurm/``) and config group there
    is, and no ``.py`` / ``.sh`` file that is gone."""
    block = (ROOT / "README.md").read_text().split("## Architecture", 1)[1].split("```")[1]
    words = set(re.findall(r"[\w.]+/?", block))
    want = {
        *(f.name for f in (ROOT / "benchmarks").iterdir() if f.suffix in (".py", ".sh")),
        *(f.name for d in ("launch", "launch/slurm") for f in (ROOT / d).glob("*.sh")),
        *(f"{d.name}/" for d in (ROOT / "conf").iterdir() if d.is_dir()),
        "slurm/",
    }
    assert sorted(want - words) == []
    gone = {w for w in words if re.fullmatch(r"\w+\.(py|sh)", w)} - want
    gone -= {p.rsplit("/", 1)[-1] for p in _readme_layout(f"## Architecture\n```\n{block}```")}
    assert sorted(gone) == []


def test_readme_layout_parse_nests_by_indent():
    text = "## Architecture\n```\npkg/\n  a.py   x\n  sub/\n    b.py\n  c.py\n```\n"
    assert _readme_layout(text) == {"pkg/", "pkg/a.py", "pkg/sub/", "pkg/sub/b.py", "pkg/c.py"}


# --------------------------------------------------------------------------- re-exports

OWN = ("janus_train", *APPS)


def _defined(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (inside top-level ``if`` / ``try`` too), imports
    aside: functions, classes, assignment targets."""
    out: set[str] = set()

    def walk(body: list[ast.stmt]) -> None:
        for n in body:
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.add(n.name)
            elif isinstance(n, ast.Assign):
                out.update(x.id for t in n.targets for x in ast.walk(t) if isinstance(x, ast.Name))
            elif isinstance(n, ast.AnnAssign | ast.AugAssign) and isinstance(n.target, ast.Name):
                out.add(n.target.id)
            elif isinstance(n, ast.If | ast.Try):
                walk(n.body)
                walk(n.orelse)
                walk(getattr(n, "finalbody", []))
                for h in getattr(n, "handlers", []):
                    walk(h.body)

    walk(tree.body)
    return out


def _module_aliases(tree: ast.Module, modules) -> dict[str, str]:
    """Local name -> the module of ``modules`` an import anywhere in ``tree`` binds it to:
    ``import a.b`` binds ``a``, ``import a.b as m`` ``m``, ``from a import b`` (a module) ``b``."""
    out = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            pairs = [
                (a.asname, a.name) if a.asname else (a.name.split(".")[0],) * 2 for a in n.names
            ]
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            pairs = [(a.asname or a.name, f"{n.module}.{a.name}") for a in n.names]
        else:
            continue
        out.update((bound, mod) for bound, mod in pairs if mod in modules)
    return out


def _module_of(node: ast.expr, aliases: dict[str, str], modules) -> str | None:
    """The module of ``modules`` that ``node`` (``m``, ``a.b.c``) names through ``aliases``."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        mod = _module_of(node.value, aliases, modules)
        if mod and f"{mod}.{node.attr}" in modules:
            return f"{mod}.{node.attr}"
    return None


def _attribute_uses(tree: ast.Module, modules) -> list[tuple[int, str, str]]:
    """(line, module, name) of every name of a module of ``modules`` that ``tree`` reaches as
    an attribute of the module's import (``mixing.task_counts``,
    ``janus_train.data.mixing.task_counts``); submodules and dunders aside, and a name the file
    patches on that module (``monkeypatch.setattr(m, "name", ...)``, ``m.name = ...``): a
    patch goes where the name is looked up. (Blind spot, by design: one such patch anywhere in
    a file spares every read of ``m.name`` in that file.)"""
    aliases = _module_aliases(tree, modules)
    uses, patched = [], set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute):
            mod = _module_of(n.value, aliases, modules)
            if mod and f"{mod}.{n.attr}" not in modules and not n.attr.startswith("__"):
                uses.append((n.lineno, mod, n.attr))
                if isinstance(n.ctx, ast.Store | ast.Del):
                    patched.add((mod, n.attr))
        elif (
            isinstance(n, ast.Call)
            and getattr(n.func, "attr", getattr(n.func, "id", None)) == "setattr"
            and len(n.args) > 1
            and isinstance(n.args[1], ast.Constant)
        ):
            mod = _module_of(n.args[0], aliases, modules)
            patched.add((mod, n.args[1].value))
    return [u for u in uses if u[1:] not in patched]


def _reexports(root: Path = ROOT, trees=("tests", "benchmarks")) -> list[str]:
    """Names of this repository imported from a module that does not define them (``from m
    import x``, or ``m.x`` on an imported module ``m``), and names a library module re-exports
    (imports from another module of the repository and lists in ``__all__`` or never uses):
    each name has one home, its users import it from there. A package's ``__init__`` may gather
    the names its own submodules define (``janus_train.model``)."""
    files = {_module_name(f, root): f for f in library_files(root=root)}
    parsed = {m: parse_module(f) for m, f in files.items()}
    defined = {m: _defined(t) for m, t in parsed.items()}

    def gathered(pkg: str, name: str) -> bool:
        """``pkg/__init__`` imports ``name`` from a submodule of its own that defines it."""
        f = files.get(pkg)
        return (
            f is not None
            and f.name == "__init__.py"
            and any(
                isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith(pkg + ".")
                and any(a.name == name and a.asname is None for a in n.names)
                and name in defined.get(n.module, ())
                for n in parsed[pkg].body
            )
        )

    out = []
    for f in [*files.values(), *library_files(trees, root)]:
        tree = parse_module(f)
        mod, rel = _module_name(f, root), f.relative_to(root).as_posix()
        exported = {
            e.value
            for n in tree.body
            if isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)
            for e in getattr(n.value, "elts", [])
            if isinstance(e, ast.Constant)
        }
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        for n in ast.walk(tree):
            if not (isinstance(n, ast.ImportFrom) and n.level == 0 and n.module in files):
                continue
            for a in n.names:
                if f"{n.module}.{a.name}" in files:
                    continue  # a module, not a name
                if a.name not in defined[n.module] and not gathered(n.module, a.name):
                    out.append(f"{rel}:{n.lineno} imports {a.name} from {n.module} (not its home)")
                bound = a.asname or a.name
                lib = f in files.values() and rel.split("/")[0] in OWN
                if lib and (bound in exported or bound not in used) and not gathered(mod, a.name):
                    out.append(f"{rel}:{n.lineno} re-exports {a.name} of {n.module}")
        for line, home, name in _attribute_uses(tree, files):
            if name not in defined[home] and not gathered(home, name):
                out.append(f"{rel}:{line} uses {home}.{name} (not its home)")
    return out


def test_every_name_is_imported_from_its_home_and_never_re_exported():
    """``task_counts`` (janus_train.batch) once came through data/mixing.py, the batch constants
    through model/forward.py: a second address for a name hides where it lives."""
    assert _reexports() == []


@pytest.mark.parametrize(
    "src, want",
    [
        ("from janus_train.batch import task_counts  # noqa: F401\n", "re-exports task_counts"),
        ("from janus_train.batch import TASKS\n__all__ = ['TASKS']\nx = TASKS\n", "re-exports"),
        ("from janus_train.mix import task_counts\nx = task_counts\n", "(not its home)"),
        ("from janus_train.model import TASKS\nx = TASKS\n", "(not its home)"),
        # a module's attribute (the check saw only ``from m import x`` until these)
        ("from janus_train import mix\nx = mix.task_counts\n", "uses janus_train.mix.task_counts"),
        ("import janus_train.mix\njanus_train.mix.task_counts()\n", "(not its home)"),
        ("import janus_train.mix as m\n\ndef f():\n    return m.task_counts\n", "(not its home)"),
        ("import janus_train.model.forward as f\nx = f.TASKS\n", "(not its home)"),
    ],
)
def test_the_re_export_check_sees_both_sides(tmp_path, src, want):
    _tiny_package(tmp_path, src)
    got = [b for b in _reexports(tmp_path, ()) if "user.py" in b or "model/__init__" in b]
    assert any(want in b for b in got if "user.py" in b), got
    # the package gathering its own submodule's name is fine; passing on batch's TASKS is not
    assert [b for b in got if "model/__init__" in b] == [
        "janus_train/model/__init__.py:1 imports TASKS from janus_train.model.forward (not its home)",
        "janus_train/model/__init__.py:1 re-exports TASKS of janus_train.model.forward",
    ]


def test_the_re_export_check_spares_homes_gathered_names_and_patches(tmp_path):
    """A name reached on its home module, on the package gathering it, a module's dunder, a
    submodule, and a name the file patches on the module that looks it up."""
    _tiny_package(
        tmp_path,
        "import janus_train.model\nfrom janus_train import batch, mix\n"
        "x = batch.task_counts, janus_train.batch.TASKS, janus_train.model.x, mix.__name__\n"
        "y = janus_train.model.forward.x\n"
        "def t(monkeypatch):\n    monkeypatch.setattr(mix, 'task_counts', mix.task_counts)\n"
        "    janus_train.model.forward.TASKS = ()\n",
    )
    assert [b for b in _reexports(tmp_path, ()) if "user.py" in b] == []


def _tiny_package(tmp_path: Path, user: str) -> None:
    """A ``janus_train`` with ``batch`` (the home of TASKS, task_counts), ``mix`` and
    ``model/forward`` (users of them), ``model/__init__`` (re-exporting TASKS) and ``user``."""
    pkg = tmp_path / "janus_train"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "batch.py").write_text("TASKS = ('text',)\n\ndef task_counts():\n    pass\n")
    (pkg / "mix.py").write_text("from janus_train.batch import task_counts\nx = task_counts\n")
    (pkg / "model" / "forward.py").write_text("from janus_train.batch import TASKS\nx = TASKS\n")
    (pkg / "model" / "__init__.py").write_text(
        "from janus_train.model.forward import TASKS, x\n__all__ = ['TASKS', 'x']\n"
    )
    (pkg / "user.py").write_text(user)


# --------------------------------------------------------------------------- benchmark scripts

BENCH_SCRIPTS = sorted(f for f in (ROOT / "benchmarks").glob("*.py") if "__main__" in f.read_text())


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=lambda f: f.name)
def test_every_benchmark_script_answers_help(script, monkeypatch, capsys):
    """``python benchmarks/<script> --help`` prints its usage and exits 0 (lora_memory.py once
    handed ``--help`` to Hydra as an override: a traceback). Run in-process: the script's
    ``main`` with ``sys.argv`` set, as its ``__main__`` block calls it."""
    import importlib.util
    import sys

    assert len(BENCH_SCRIPTS) >= 10  # the glob found the scripts
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as e:
        mod.main()
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: {script.name}"), out[:300]
