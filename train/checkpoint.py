"""Checkpoints with flax serialization (msgpack): the training state, or a policy alone.

A checkpoint is one msgpack file holding `{"config": <PPOConfig as JSON>, "kind": "train" |
"policy", "state": <flax state dict>}`. Restoring needs a template pytree of the same structure
(`flax.serialization.from_state_dict`), which the trainer builds from the stored config, so a file
restores to exactly the arrays that were saved.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flax import serialization

KINDS = ("train", "policy")


def save(path: str, target: Any, config: dict[str, Any], kind: str = "train") -> None:
    """Write `target` (any flax-serializable pytree) and its config to `path` atomically."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; allowed: {list(KINDS)}")
    blob = serialization.msgpack_serialize(
        {
            "config": json.dumps(config, sort_keys=True),
            "kind": kind,
            "state": serialization.to_state_dict(target),
        }
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def read(path: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """-> (config dict, kind, raw state dict). Raises FileNotFoundError / ValueError."""
    with open(path, "rb") as f:
        raw = serialization.msgpack_restore(f.read())
    if not isinstance(raw, dict) or set(raw) != {"config", "kind", "state"}:
        raise ValueError(f"{path} is not a train/ checkpoint (keys config, kind, state)")
    return json.loads(raw["config"]), raw["kind"], raw["state"]


def restore(template: Any, state: dict[str, Any]) -> Any:
    """Fill `template`'s structure with the saved arrays."""
    return serialization.from_state_dict(template, state)
