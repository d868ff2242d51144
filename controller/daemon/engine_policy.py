"""Which KV policy an engine link runs: the name check (used by the config loader too) and
the factory. A name is one of agentcg.policies.kv's, or "package.module:factory" for
experiments (the config that names it is root's); metrics label the latter `custom`.
"""
from __future__ import annotations

import importlib
from typing import Any

from agentcg.errors import InvalidInput
from agentcg.policies.kv import POLICY_NAMES

CUSTOM = "custom"                    # the metrics label of a "module:attr" policy


def policy_label(name: str) -> str:
    """The bounded metrics label of policy `name`."""
    return name if name in POLICY_NAMES else CUSTOM


def check_policy_name(name: str, where: str = "kv_policy") -> str:
    """A KV policy name (agentcg.policies.kv) or "package.module:factory"."""
    if name in POLICY_NAMES:
        return name
    module, sep, attr = name.partition(":")
    if sep and module and attr.isidentifier() and all(p.isidentifier() for p in module.split(".")):
        return name
    raise InvalidInput(f"{where}: {name!r} is neither one of {', '.join(POLICY_NAMES)} nor "
                       "\"package.module:factory\"")


def make_kv_policy(name: str) -> Any:
    """A fresh policy. "module:factory" imports `factory` (a class or function taking no
    arguments) for experiments; the config that names it is root's."""
    from agentcg.policies.kv import make_policy

    if name in POLICY_NAMES:
        return make_policy(name)
    module_name, _, attr = check_policy_name(name).partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidInput(f"kv_policy {name!r}: cannot load it ({exc}); is the module on the daemon's path?") from None
    return factory()
