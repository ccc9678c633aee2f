"""statsd.py reads top to bottom: its sections are the ones its docstring lists, in that order,
and no section uses a name that a later section defines."""

import ast
import re
from pathlib import Path

import statsd

SOURCE = Path(statsd.__file__).read_text()
BANNER = re.compile(r"^# -+ (.+) ---$")


def sections() -> list[tuple[int, str]]:
    """(first line, name) of each banner section, in file order."""
    return [(n, m.group(1)) for n, line in enumerate(SOURCE.splitlines(), 1) if (m := BANNER.match(line))]


def section_of(line: int, found: list[tuple[int, str]]) -> int:
    """The index of the section holding `line` (-1: before the first banner)."""
    return max((i for i, (start, _) in enumerate(found) if start <= line), default=-1)


def top_level_names(tree: ast.Module) -> dict[str, int]:
    """Each module-level name and the line defining it."""
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node.lineno
        elif isinstance(node, ast.Assign):
            names.update({t.id: node.lineno for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node.lineno
    return names


def local_names(node: ast.AST) -> set[str]:
    """The names a definition binds for itself (arguments and assignments), which shadow module names."""
    bound = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    for fn in ast.walk(node):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            bound |= {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs}
    return bound


def later_references(source: str) -> list[str]:
    """Every use of a module-level name defined in a later section than its user."""
    tree = ast.parse(source)
    found = [(n, m.group(1)) for n, line in enumerate(source.splitlines(), 1) if (m := BANNER.match(line))]
    defined = top_level_names(tree)
    problems = set()
    for node in tree.body:
        here, bound = section_of(node.lineno, found), local_names(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.discard(node.name)
        for name in ast.walk(node):
            if isinstance(name, ast.Name) and name.id in defined and name.id not in bound:
                there = section_of(defined[name.id], found)
                if there > here:
                    problems.add(f"line {name.lineno} ({found[here][1] if here >= 0 else 'top'}) uses"
                                 f" {name.id} of {found[there][1]}")
    return sorted(problems)


def test_the_docstring_lists_the_sections_in_file_order():
    listed = [part.strip() for part in re.split(r"->", statsd.__doc__.split("are:", 1)[1].split("\n\n")[1])]
    listed = [re.sub(r"\s*\(.*\)$", "", part) for part in listed]
    assert listed == [name for _, name in sections()]


def test_no_section_uses_a_name_of_a_later_section():
    assert later_references(SOURCE) == []


def test_the_check_finds_a_later_name():
    """The check above can fail: a function using a name that a later section defines is reported."""
    source = ("# --------------- first ---\ndef early():\n    return LATE\n\n"
              "# --------------- second ---\nLATE = 1\n")
    assert later_references(source) == ["line 3 (first) uses LATE of second"]
    shadowed = source.replace("def early():", "def early(LATE):")
    assert later_references(shadowed) == []
