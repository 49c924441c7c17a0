"""Environment ids -> the packages that implement them: the one place the harness learns which
environments exist (as gymnax's and Jumanji's `registration.py` do).

    env, params = kvjax.make("kv-serve-v0", preset="toy")      # = harness(id).make(...)
    policy = kvjax.make_policy("engine_default", env)           # the env's own policy names

Each env package provides a `Harness` (kvjax/cache/harness.py, kvjax/serve/harness.py): how to
make the env, its policies, and what the generic commands (`kvjax eval / bench / leaderboard /
demo`, the PPO trainer) need to know about it. The rollout engine, CLI and trainer ask the
registry and never branch on an env id. Entries are "module:attribute" strings imported on first
use, so `import kvjax` stays light and a package that is never asked for is never imported.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from typing import Any

# id -> "module:attribute" of the env's Harness. Built-ins below; `register` adds more.
_ENTRY_POINTS: dict[str, str] = {}
DEFAULT_ENV_ID = "kv-cache-v0"  # the seed environment: what `kvjax.make()` and the CLI default to


def register(env_id: str, entry_point: str) -> None:
    """Register `env_id`, implemented by the Harness at `entry_point` ("module:attribute")."""
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env id must be a non-empty str, got {env_id!r}")
    if not isinstance(entry_point, str) or entry_point.count(":") != 1:
        raise ValueError(f"entry_point must be 'module:attribute', got {entry_point!r}")
    _ENTRY_POINTS[env_id] = entry_point
    harness.cache_clear()


def env_ids() -> tuple[str, ...]:
    """Every registered env id, in registration order."""
    return tuple(_ENTRY_POINTS)


def check_env_id(env_id: Any) -> str:
    """`env_id` if registered, else a ValueError naming the registered ids."""
    if not isinstance(env_id, str) or env_id not in _ENTRY_POINTS:
        raise ValueError(f"unknown env id {env_id!r}; allowed: {list(_ENTRY_POINTS)}")
    return env_id


@functools.cache
def harness(env_id: str) -> Harness:
    """The Harness of a registered env (its package imported on first use)."""
    module, attribute = _ENTRY_POINTS[check_env_id(env_id)].split(":")
    return getattr(importlib.import_module(module), attribute)


def make(env_id: str = DEFAULT_ENV_ID, **kwargs: Any):
    """`env, params = make("kv-cache-v0", difficulty="medium")` or
    `make("kv-serve-v0", preset="toy", engine="vllm", load=0.8, ...)`: the env package's make."""
    return harness(env_id).make(**kwargs)


def make_policy(name: str, env: Any):
    """Policy `name` of `env`'s package (`policy_names(env.name)` lists them)."""
    return harness(env.name).make_policy(name, env)


def policy_names(env_id: str) -> tuple[str, ...]:
    return harness(env_id).policy_names


class Harness:
    """What the generic harness needs from an env package; each package subclasses it once.

    Required: `env_id`, `policy_names`, `make(**kwargs)`, `make_policy(name, env)`. The CLI hooks
    have working defaults: an env adds its own scenario options to `kvjax eval / bench /
    leaderboard` (`add_options`), turns them into `make` keywords (`scenario`), and runs its own
    leaderboard and benchmark documents; `commands` adds subcommands only it has."""

    env_id: str = ""
    summary: str = ""  # one line for `--env` help
    policy_names: tuple[str, ...] = ()
    default_policy: str = ""  # the env's reference baseline (the one its docs compare against)
    ppo_agent: str = ""  # "module:Class" of the env's PPO agent (train/agents/), if it has one

    def make(self, **kwargs: Any):
        raise NotImplementedError

    def make_policy(self, name: str, env: Any):
        raise NotImplementedError

    # -- the CLI -------------------------------------------------------------------------------
    def add_options(self, parser: argparse.ArgumentParser, command: str) -> list[str]:
        """Add this env's options of `command` (eval, bench, leaderboard, demo) to `parser`,
        every default None (so an option given for another env can be told apart); return
        their dests."""
        return []

    def scenario(self, args: argparse.Namespace) -> dict[str, Any]:
        """`make` keywords from parsed options (defaults filled in; ValueError if invalid)."""
        return {}

    def check_args(self, args: argparse.Namespace) -> None:
        """Fill `command`-specific defaults into `args` and check them (ValueError)."""

    def eval_header(
        self,
        policy: str,
        scenario: dict[str, Any],
        params: Any,
        num_scenarios: int,
        seed: int,
        seconds: float,
    ) -> str:
        """The line `kvjax eval` prints above its results."""
        setting = ", ".join(f"{k} {v}" for k, v in scenario.items())
        return (
            f"{policy} on {self.env_id} ({setting}), {num_scenarios:,} scenarios "
            f"(seed {seed}, {seconds:.1f} s)"
        )

    def record(self, scenario: dict[str, Any], params: Any) -> dict[str, Any]:
        """The scenario's fields of `kvjax eval --json`'s record."""
        return dict(scenario)

    def format_result(self, name: str, mean: float, ci95: float) -> str:
        return f"  {name:<26} {mean:+.4f} ± {ci95:.4f}"

    def demo(self, args: argparse.Namespace) -> int:
        raise ValueError(f"{self.env_id} has no demo")

    def bench(self, args: argparse.Namespace) -> int:
        raise ValueError(f"{self.env_id} has no benchmark")

    def leaderboard(self, args: argparse.Namespace) -> int:
        raise ValueError(f"{self.env_id} has no leaderboard")

    def provides(self, command: str) -> bool:
        """Whether this env has its own `command` (demo, bench, leaderboard)."""
        return getattr(type(self), command) is not getattr(Harness, command)

    def commands(self) -> dict[str, tuple[Any, Any]]:
        """Subcommands only this env has: name -> (add_parser(subparsers), run(args) -> int)."""
        return {}


register("kv-cache-v0", "kvjax.cache.harness:HARNESS")
register("kv-serve-v0", "kvjax.serve.harness:HARNESS")

__all__ = [
    "DEFAULT_ENV_ID",
    "Harness",
    "check_env_id",
    "env_ids",
    "harness",
    "make",
    "make_policy",
    "policy_names",
    "register",
]
