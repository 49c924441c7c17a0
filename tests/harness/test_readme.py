"""Every README snippet runs after a plain `import kvjax` (sizes shrunk: 4096 -> 64 scenarios)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import kvjax

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SMALL = 64


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_python_snippets():
    assert python_blocks(), "README lost its python snippets"


def test_every_python_block_runs_and_the_rollout_one_liner_too():
    ns: dict = {}
    for block in python_blocks():
        exec(compile(block.replace("4096", str(SMALL)), "README.md", "exec"), ns)
    results = ns["results"]
    assert set(results) == set(kvjax.COMPONENTS) | set(kvjax.METRICS) | {"total"}
    assert all(np.asarray(v).shape == (SMALL,) for v in results.values())
    assert np.isfinite(np.asarray(results["total"])).all()

    # The inline one-liner after the block, in the namespace the block left.
    one_liners = [
        e
        for e in re.findall(r"`(kvjax\.rollout\.rollout\(.*?\))`", README, flags=re.S)
        if "make_policy" in e
    ]
    assert one_liners
    for expr in one_liners:
        expr = " ".join(expr.split()).replace("4096", str(SMALL))
        res = eval(expr, {**ns, "kvjax": kvjax})
        assert res["total"].shape == (SMALL,)
        assert np.isfinite(res["total"]).all()


def test_every_dotted_kvjax_name_in_the_readme_resolves():
    names = set(re.findall(r"\bkvjax(?:\.[A-Za-z_]\w*)+", README))
    assert "kvjax.rollout.rollout" in names and "kvjax.make_policy" in names
    for dotted in sorted(names):
        obj = kvjax
        for part in dotted.split(".")[1:]:
            assert hasattr(obj, part), f"README names {dotted}, which does not resolve"
            obj = getattr(obj, part)
