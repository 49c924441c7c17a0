"""The analysis notebooks run top to bottom from a clean kernel (small sizes) and draw figures;
they are committed without outputs, use no absolute paths and import only the public API."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
PUBLIC = ("kvjax", "kvjax.cache", "kvjax.cache.viz", "kvjax.cache.policies", "kvjax.rollout",
          "train", "train.ppo", "train.evaluate", "kvjax.serve", "kvjax.serve.policies",
          "kvjax.serve.sweep")
NAMES = [p.stem for p in NOTEBOOKS]
KERNEL = "kvjax-test-python"


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory):
    """A kernelspec that runs this very interpreter, first on JUPYTER_PATH (ahead of user and
    system specs), so the notebooks see the venv whatever kernels the machine has installed."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "kvjax tests", "language": "python"}))
    return str(root)


def _code(nb) -> str:
    """The code cells as Python (IPython magics dropped)."""
    lines = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            lines += [ln for ln in cell.source.splitlines() if not ln.lstrip().startswith("%")]
    return "\n".join(lines)


def test_all_notebooks_exist():
    assert NAMES == ["01_quickstart", "02_policy_comparison", "03_training_analysis",
                     "04_serving"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_committed_clean_and_portable(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "stale outputs"
    assert any("parameters" in c.metadata.get("tags", []) for c in code)
    text = path.read_text()
    assert not re.search(r"(/work/|/home/|/tmp/|/Users/|[A-Z]:\\\\)", text), "absolute path"
    tree = ast.parse(_code(nb))
    for node in ast.walk(tree):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mods = [node.module or ""]
        for m in mods:
            if m.split(".")[0] in ("kvjax", "train"):
                assert m in PUBLIC, f"{path.name} imports non-public module {m}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_runs_and_draws(path, kernel_path, monkeypatch):
    """Execute in a fresh kernel of this interpreter with KVJAX_NB_SMALL=1; every notebook
    shows at least one figure and no cell errors."""
    monkeypatch.setenv("KVJAX_NB_SMALL", "1")
    monkeypatch.setenv("JUPYTER_PATH", kernel_path)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 1, f"{path.name} drew no figure"
    kernel_python = nb.cells[-1].outputs[0]["text"].strip()
    assert Path(kernel_python).resolve() == Path(sys.executable).resolve()
