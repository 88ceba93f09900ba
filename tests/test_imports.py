"""The shape of the code: imports go one way between packages, library code names no command-line
flag, and no function of the training path takes more than 8 arguments. Read from the source with
ast (nothing is imported or run)."""
import ast
import os
import re

import pytest

from conftest import ROOT

# What each part may import from the project. Low to high: errors; models, loss; data; compress;
# the checkpoint file format (engine/checkpoint.py, a part of its own: refinery loads teachers with
# it); refinery; engine; torchscope's counting core (nothing); the front ends (cli, torchscope's
# command, the scripts, bench) on top.
ALLOWED = {
    "errors": set(),
    "models": {"errors"},
    "loss": {"errors"},
    "data": {"errors"},
    "compress": {"errors", "models", "loss"},
    "engine.checkpoint": {"errors", "models", "compress"},
    "refinery": {"errors", "models", "loss", "engine.checkpoint"},
    "engine": {"errors", "models", "loss", "data", "refinery", "compress", "engine.checkpoint"},
    "torchscope": set(),
    "torchscope.command": {"errors", "models", "loss", "data", "refinery", "compress", "engine",
                           "engine.checkpoint", "cli", "torchscope"},
    "cli": {"errors", "models", "data", "compress", "refinery", "engine", "engine.checkpoint"},
    # The deployment (export.py's library): the counter's layer kinds, the file format's atomic write.
    "deploy": {"errors", "models", "data", "compress", "engine.checkpoint", "torchscope"},
}
PARTS = ("errors", "models", "loss", "data", "refinery", "compress", "engine", "torchscope", "cli", "bench",
         "train", "test", "chain", "deploy", "export", "tools")
# Where a part lives when it is not a top-level name: the shared parts are installed under the
# project's own package, so that no generic top-level module is installed.
HOME = {"errors": os.path.join("micronet_cifar100", "errors"), "cli": os.path.join("micronet_cifar100", "cli")}
SHARED = "micronet_cifar100"
# Library code: its messages and docs say what is wrong, the front ends add the flag to change.
LIBRARY = ("models", "loss", "data", "refinery", "compress", "engine", "torchscope")
# The Trainer's log and a resume's mismatch speak to the user of train.py and chain.py in their flags,
# as these scripts did before the Trainer moved into engine/.
FRONT_ENDS = {os.path.join("torchscope", "command.py"), os.path.join("torchscope", "count.py"),
              os.path.join("engine", "trainer.py"), os.path.join("engine", "config.py")}
CHECKPOINT_FORMAT = os.path.join("engine", "checkpoint.py")


def part_of(rel):
    """'engine/step.py' -> 'engine'; 'torchscope/command.py' -> 'torchscope.command'."""
    if rel.replace(os.sep, "/") in ("torchscope/command.py", "torchscope/count.py"):
        return "torchscope.command"
    if rel == CHECKPOINT_FORMAT:
        return "engine.checkpoint"
    for part, home in HOME.items():
        if rel == home + ".py" or rel.startswith(home + os.sep):
            return part
    top = rel.split(os.sep)[0]
    return top[:-3] if top.endswith(".py") else top


def sources():
    for part in PARTS:
        path = os.path.join(ROOT, HOME.get(part, part))
        if os.path.isfile(path + ".py"):
            yield os.path.relpath(path + ".py", ROOT)
        for base, _, files in os.walk(path):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.relpath(os.path.join(base, f), ROOT)


def parse(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return ast.parse(f.read(), rel)


def project_imports(tree):
    """Top-level project parts a module imports (absolute imports; relative ones stay inside)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == SHARED:
            names = [f"{SHARED}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if name.startswith(SHARED + "."):
                name = name[len(SHARED) + 1:]   # micronet_cifar100.cli.args -> the part "cli"
            top = name.split(".")[0]
            if name == "engine.checkpoint" or name.startswith("engine.checkpoint."):
                found.add("engine.checkpoint")
            elif top in PARTS:
                found.add(top)
    return found


def graph():
    edges = {}
    for rel in sources():
        part = part_of(rel)
        edges.setdefault(part, set()).update(project_imports(parse(rel)) - {part.split(".")[0]})
    return edges


def find_cycle(edges):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(edges):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_between_packages():
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = {k: set(v) for k, v in graph().items()}
    edges["models"].add("engine")  # models -> engine -> models
    assert find_cycle(edges) is not None


def test_imports_go_one_way():
    wrong = {part: sorted(deps - ALLOWED[part]) for part, deps in graph().items()
             if part in ALLOWED and deps - ALLOWED[part]}
    assert wrong == {}


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]+")


def library_strings(rel):
    for node in ast.walk(parse(rel)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_library_code_names_no_command_line_flag():
    found = [f"{rel}:{line}: {FLAG.search(text).group()}"
             for rel in sources() if rel.split(os.sep)[0] in LIBRARY and rel not in FRONT_ENDS
             for line, text in library_strings(rel) if FLAG.search(text)]
    assert found == []


@pytest.mark.parametrize("prefix", ["train.py", "chain.py", "engine", "data"])
def test_no_function_takes_more_than_8_arguments(prefix):
    heavy = []
    for rel in sources():
        if not rel.startswith(prefix):
            continue
        for node in ast.walk(parse(rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + \
                    ([a.vararg.arg] if a.vararg else []) + ([a.kwarg.arg] if a.kwarg else [])
                names = [n for n in names if n not in ("self", "cls")]
                if len(names) > 8:
                    heavy.append(f"{rel}:{node.lineno} {node.name} ({len(names)})")
    assert heavy == []
