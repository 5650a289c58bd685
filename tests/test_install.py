"""`pip install .` and `pip install -e .` both give xlmr_mini.kernels / xlmr_mini.data, and no
top-level `kernels` or `data` package."""
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = """
import importlib.util, sys
import xlmr_mini.kernels, xlmr_mini.data
for name in ("kernels", "data"):
    assert importlib.util.find_spec(name) is None, f"top-level {name} is importable"
from xlmr_mini.__main__ import commands  # `python -m xlmr_mini` finds every command where installed
assert {"train", "evaluate", "study", "data"} <= set(commands()), commands()
print(xlmr_mini.kernels.__file__)
print(xlmr_mini.data.__file__)
"""


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install_layout(tmp_path, editable):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # The new environment sees this one's packages (torch, setuptools, pip) through a path entry,
    # which adds the directory but does not run this environment's own .pth hooks (our install).
    new_site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    (Path(new_site) / "parent.pth").write_text(site.getsitepackages()[0] + "\n")
    cmd = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    cmd += ["-e", str(REPO)] if editable else [str(REPO)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Run from an unrelated directory so the checkout is not on sys.path by accident.
    out = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels_file, data_file = out.stdout.split()
    if editable:
        assert kernels_file.startswith(str(REPO)) and data_file.startswith(str(REPO))
    else:
        assert "site-packages" in kernels_file and "site-packages" in data_file


def test_a_top_level_kernels_import_loads_no_second_copy():
    """From the repository root the `kernels` folder is importable under that name too, and
    transformers imports it while probing for the Hub's `kernels` package: that import must not
    load the kernel modules again (it would rebind the xlmr_mini::* custom ops to the copy)."""
    code = ("import importlib, sys; import xlmr_mini.kernels; importlib.import_module('kernels'); "
            "print(sorted(k for k in sys.modules if k.startswith('kernels.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
