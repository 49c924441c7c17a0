"""Adapters that put kvjax behind other frameworks' interfaces (each an optional extra).

- `kvjax.adapters.verifiers`: the LLM tool-calling evaluation on verifiers v1
  (`pip install -e ".[verifiers]"`; needs `verifiers>=0.4.0,<0.5`).

Nothing is imported here, so `import kvjax.adapters` never needs an optional dependency.
"""
