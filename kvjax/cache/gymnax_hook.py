"""Registers kvjax's environments with gymnax when gymnax is installed (the `gymnax` extra),
without importing gymnax (a few seconds) on every `import kvjax`.

`install()` (run by `import kvjax`): if `gymnax.registration` is already imported, register now;
otherwise a meta-path hook registers right after gymnax imports it. Either order works:

    import kvjax, gymnax
    env, params = gymnax.make("kv-cache-v0", difficulty="hard")       # kvjax.KVCacheEnv
    env, params = gymnax.make("kv-cache-flat-v0", difficulty="hard")  # gymnax Discrete / Box

The environments themselves live in `kvjax.cache.gymnax_env` (imported on `gymnax.make`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from typing import Any

GYMNAX_IDS = ("kv-cache-v0", "kv-cache-flat-v0")
_TARGET = "gymnax.registration"


def _factory(env_id: str):
    def make(**kwargs: Any):
        from kvjax.cache import gymnax_env

        return gymnax_env.make_env(env_id, **kwargs)

    make.__name__ = f"make_{env_id.replace('-', '_')}"
    return make


def register(registration: Any) -> None:
    """Register GYMNAX_IDS with a loaded `gymnax.registration` module (idempotent)."""
    try:
        known = getattr(registration, "registered_envs", [])
        for env_id in GYMNAX_IDS:
            if env_id not in known:
                registration.register(env_id, _factory(env_id))
    except Exception as e:  # noqa: BLE001 - an incompatible gymnax must not break import kvjax
        warnings.warn(f"kvjax: could not register with gymnax ({e})", stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        register(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of `gymnax.registration` so that kvjax registers after it runs."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if gymnax is loaded, else when it is (no-op without gymnax)."""
    if _TARGET in sys.modules:
        register(sys.modules[_TARGET])
        return
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    try:
        if importlib.util.find_spec("gymnax") is None:
            return
    except (ImportError, ValueError):
        return
    sys.meta_path.insert(0, _Finder())


__all__ = ["GYMNAX_IDS", "install", "register"]
