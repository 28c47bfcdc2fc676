"""The rules of ../shared/DESIGN.md that the source itself can show, read from the files (no import):
imports go down the floors and never round (lazy imports included), no function over 60 lines without
a reason beside it, and the names inside a run folder are written in rundir.py only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# DESIGN.md's floors, top to bottom: an import goes to a module on its own floor or a lower one.
FLOORS = [
    ("face", ["dlrun.__main__", "dlrun.cli"]),
    ("tools", ["dlrun.tools"]),
    ("wiring", ["dlrun.run", "dlrun.resume", "dlrun.evaluation"]),
    ("loop", ["dlrun.train", "dlrun.checkpoint", "dlrun.lr_find"]),
    ("parts", ["dlrun.models", "dlrun.data", "dlrun.optim", "dlrun.compress", "dlrun.sinks", "dlrun.plots",
               "dlrun.cost", "dlrun.metrics", "dlrun.baselines", "dlrun.device", "dlrun.distributed", "dlrun.losses"]),
    ("hydra_ext", ["dlrun.hydra_ext"]),
    ("floor", ["dlrun.config", "dlrun.rundir", "dlrun.errors", "dlrun.cpus", "dlrun"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def floor_of(module: str) -> int:
    """The floor's height (0 = the top) of the most specific prefix that names the module."""
    best = max(((len(p), height) for height, (_, prefixes) in enumerate(FLOORS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is on no floor of DESIGN.md: add it to FLOORS and the README's map"
    return best[1]


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The dlrun modules `path` imports anywhere in its code (module level, functions, TYPE_CHECKING)."""
    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        return ".".join(parts) or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("dlrun")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dlrun"):
            found |= {resolve(f"{node.module}.{a.name}") or resolve(node.module) for a in node.names}
    return found - {None}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_imports_go_down_the_floors():
    wrong = [f"{a} ({FLOORS[floor_of(a)][0]}) imports {b} ({FLOORS[floor_of(b)][0]})"
             for a, targets in graph().items() for b in targets
             if floor_of(b) < floor_of(a) and not b.startswith(a + ".")]  # a package may import its own modules
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two tests above can fail: a package with train -> checkpoint -> train and a model importing run."""
    pkg = tmp_path / "dlrun"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("from dlrun.checkpoint import save\n")
    (pkg / "checkpoint.py").write_text("def load():\n    from dlrun import train\n")
    (pkg / "run.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("import dlrun.run\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    edges = graph()
    assert edges["dlrun.train"] == {"dlrun.checkpoint"} and edges["dlrun.checkpoint"] == {"dlrun.train"}
    with pytest.raises(pytest.fail.Exception, match="import cycle: dlrun.checkpoint -> dlrun.train -> dlrun.checkpoint"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match=r"dlrun.models \(parts\) imports dlrun.run \(wiring\)"):
        test_imports_go_down_the_floors()


LONG = 60


def test_no_function_over_60_lines_without_a_reason():
    """A longer function says why on the line above its `def` (a comment starting `# long:`)."""
    long = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                size = node.end_lineno - node.lineno + 1
                if size > LONG and not lines[first - 2].strip().startswith("# long:"):
                    long.append(f"{name}.{node.name}: {size} lines")
    assert not long, "\n".join(long)


def run_folder_names() -> set[str]:
    """The names rundir.py gives the files and folders of a run folder (its string constants), but
    `config.yaml`, which is also the name of conf/'s primary config."""
    tree = ast.parse((SRC / "dlrun" / "rundir.py").read_text())
    constants = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    files = {c for c in constants if "." in c.lstrip(".") and c.rsplit(".", 1)[-1] in ("json", "jsonl", "pt", "png",
                                                                                           "lock", "log", "yaml")}
    folders = {c for c in constants if c in ("checkpoints", "plots", "variants", "tensorboard", ".hydra")}
    assert {"summary.json", "metrics.jsonl", "last.pt", "best.pt", "learning_curves.png", "checkpoints"} <= files | folders
    return (files | folders) - {"config.yaml"}


def path_parts(tree: ast.AST) -> list[ast.Constant]:
    """String constants used to build a path: `x / "name"`, `Path("a", "name")`, `x.joinpath("name")`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found += [n for n in (node.left, node.right) if isinstance(n, ast.Constant)]
        elif isinstance(node, ast.Call) and (getattr(node.func, "id", None) == "Path"
                                             or getattr(node.func, "attr", None) in ("joinpath", "with_name")):
            found += [n for n in node.args if isinstance(n, ast.Constant)]
    return [n for n in found if isinstance(n.value, str)]


def test_run_folder_names_are_written_in_rundir_only():
    names = run_folder_names()
    found = [f"{module}:{node.lineno}: {node.value!r}" for module, path in modules().items() if module != "dlrun.rundir"
             for node in path_parts(ast.parse(path.read_text())) if node.value in names]
    assert not found, "\n".join(found)


def test_the_name_checker_finds_a_path_built_elsewhere():
    tree = ast.parse('best = folder / "checkpoints" / "best.pt"\nlog = Path(run, "dlrun.log")\nkey = {"variants": 1}')
    names = run_folder_names()
    assert sorted(n.value for n in path_parts(tree) if n.value in names) == ["best.pt", "checkpoints", "dlrun.log"]


TOOLS = ["dlrun.cli", "dlrun.tools.report", "dlrun.tools.predict", "dlrun.tools.compress", "dlrun.tools.explain"]


@pytest.mark.slow  # a fresh interpreter shows what gets imported
def test_every_command_parses_its_arguments_before_importing_torch():
    """`--help` of every command, in one fresh interpreter: none imports torch (what makes it answer at once)."""
    script = (
        "import contextlib, io, sys\n"
        "from importlib import import_module\n"
        f"for name in {TOOLS!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        sys.argv = [name, '--help']\n"
        "        module = import_module(name)\n"
        "        module.main() if name == 'dlrun.cli' else module.main(['--help'])\n"
        "    assert 'usage' in out.getvalue() or 'Configuration groups' in out.getvalue(), (name, out.getvalue())\n"
        "    assert 'torch' not in sys.modules, name\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
