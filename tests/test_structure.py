"""The source tree's structure: no symlinks, every module placed in a layer, imports only downward,
and a checkout that imports without an install or links."""
import ast
import subprocess
import sys


import xlmr_mini
from conftest import REPO

RANK = {layer: rank for rank, layer in enumerate(("core", "library", "application"))}
TREES = {"xlmr_mini": REPO / "xlmr_mini", "kernels": REPO / "kernels", "data": REPO / "data", "bench": REPO / "bench"}


def layer_of(top: str) -> str:
    """The layer of a top-level module name of the package (`train`, `kernels`, `bench`)."""
    found = [layer for layer, names in xlmr_mini.LAYERS.items() if top in names]
    assert len(found) == 1, f"module {top!r} must sit in exactly one layer of xlmr_mini.LAYERS (found {found})"
    return found[0]


def modules():
    """(file, its top-level module name) for every Python file of the package, kernels, data, bench."""
    for tree, root in TREES.items():
        for path in sorted(root.rglob("*.py")):
            top = tree if tree != "xlmr_mini" else path.stem
            if top != "__init__":
                yield path, top


def imported_tops(path) -> set[str]:
    """Top-level xlmr_mini module names imported anywhere in `path` (function bodies included)."""
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "xlmr_mini" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "xlmr_mini" and len(parts) > 1:
                tops.add(parts[1])
            elif parts[0] == "bench" and len(parts) >= 1:
                tops.add("bench")
    return tops


def test_no_symlinks_in_the_tree():
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0:  # in a git checkout, none committed either (mode 120000)
        links = [line.split("\t")[1] for line in listed.stdout.splitlines() if line.startswith("120000")]
        assert links == []
    on_disk = [p for p in REPO.rglob("*") if p.is_symlink() and ".ci-venv" not in p.parts and ".git" not in p.parts]
    assert on_disk == []


def test_every_module_is_in_one_layer():
    for _, top in modules():
        layer_of(top)


def test_imports_only_go_down():
    upward = []
    for path, top in modules():
        for dep in sorted(imported_tops(path) - {top}):
            if RANK[layer_of(dep)] > RANK[layer_of(top)]:
                upward.append(f"{path.relative_to(REPO)} ({layer_of(top)}) imports {dep} ({layer_of(dep)})")
    assert upward == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from xlmr_mini.train import train\n    import xlmr_mini.evaluate\n")
    assert imported_tops(bad) == {"train", "evaluate"}
    assert RANK[layer_of("train")] > RANK[layer_of("data")]


def test_checkout_imports_without_install_or_links():
    """With the editable install's finder removed, the tests' conftest still maps kernels/ and data/."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "import conftest, xlmr_mini.kernels, xlmr_mini.data.readers\n"
        "print(xlmr_mini.kernels.__file__); print(xlmr_mini.data.readers.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(REPO / "kernels" / "__init__.py"), str(REPO / "data" / "readers.py")]
