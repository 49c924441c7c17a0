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

import numpy as np
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
        blob = f.read()
    try:
        raw = serialization.msgpack_restore(blob)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types on bad input
        raise ValueError(f"{path} is not a msgpack checkpoint ({type(e).__name__})") from None
    if not isinstance(raw, dict) or set(raw) != {"config", "kind", "state"}:
        raise ValueError(f"{path} is not a train/ checkpoint (keys config, kind, state)")
    if raw["kind"] not in KINDS:
        raise ValueError(f"{path}: unknown checkpoint kind {raw['kind']!r}; allowed: {list(KINDS)}")
    try:
        config = json.loads(raw["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the stored config is not JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(raw["state"], dict):
        raise ValueError(f"{path}: config and state must be dicts")
    return config, raw["kind"], raw["state"]


def check_tree(expected: Any, state: Any, path: str = "") -> None:
    """ValueError unless `state` (a raw state dict) has exactly `expected`'s keys, and every
    leaf its shape and dtype kind."""
    if isinstance(expected, dict):
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint entry {path or '/'} is a leaf, expected a dict")
        if set(expected) != set(state):
            extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
            raise ValueError(f"checkpoint entry {path or '/'}: unexpected keys {extra}, "
                             f"missing {missing}")
        for k in expected:
            check_tree(expected[k], state[k], f"{path}/{k}")
        return
    if isinstance(state, dict):
        raise ValueError(f"checkpoint entry {path} is a dict, expected an array")
    want, got = np.asarray(expected), np.asarray(state)
    if want.shape != got.shape or want.dtype.kind != got.dtype.kind:
        raise ValueError(f"checkpoint entry {path} has shape {got.shape} ({got.dtype}), "
                         f"expected {want.shape} ({want.dtype}): the checkpoint was written "
                         "with another config or seed count")


def restore(template: Any, state: dict[str, Any]) -> Any:
    """Fill `template`'s structure with the saved arrays, after checking that the saved tree
    has exactly the template's structure, shapes and dtype kinds (ValueError otherwise)."""
    check_tree(serialization.to_state_dict(template), state)
    return serialization.from_state_dict(template, state)


def seed_count(kind: str, state: dict[str, Any]) -> int | None:
    """Seeds a training checkpoint was saved with (its leading batch size; None if it holds
    one unbatched runner, or for a policy checkpoint)."""
    if kind != "train":
        return None
    update = state.get("update") if isinstance(state, dict) else None
    shape = np.shape(update) if update is not None else ()
    return int(shape[0]) if len(shape) == 1 else None
