"""PSI memory triggers in the daemon's epoll: one for the tree's root ("") and one per
sandbox, armed where the host allows (a refusal is warned about once, not retried)."""
from __future__ import annotations

import logging
import select
from typing import Callable

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.daemon.config import PsiSection
from agentcg.controller.psi import PressureTrigger
from agentcg.errors import AgentcgError

log = logging.getLogger("agentcg.daemon")


class PsiTriggers:
    def __init__(self, tree: CgroupTree, settings: PsiSection,
                 register: Callable[[int, int, Callable[[int, int], None]], None], unregister: Callable[[int], None],
                 fired: Callable[[str], None]) -> None:
        self.tree, self.settings = tree, settings
        self._register, self._unregister, self._fired = register, unregister, fired
        self._triggers: dict[str, PressureTrigger] = {}
        self._refused: set[str] = set()

    def __contains__(self, scope: str) -> bool:
        return scope in self._triggers

    def arm(self, scope: str) -> None:
        if (not self.settings.enabled or scope in self._triggers or scope in self._refused
                or "psi" not in self.tree.capabilities or not self.tree.exists(scope)):
            return
        try:
            trigger = self.tree.pressure_trigger(scope, "memory", "some", self.settings.stall_s, self.settings.window_s)
        except AgentcgError as exc:
            log.warning("no PSI trigger on %s: %s", scope or "the root", exc)
            self._refused.add(scope)
            return
        self._triggers[scope] = trigger
        self._register(trigger.fileno(), select.EPOLLPRI | select.EPOLLERR,
                       lambda fd, mask, scope=scope: self._on_fire(scope, mask))

    def disarm(self, scope: str) -> None:
        self._refused.discard(scope)
        trigger = self._triggers.pop(scope, None)
        if trigger is not None:
            self._unregister(trigger.fileno())
            trigger.close()

    def close(self) -> None:
        for scope in list(self._triggers):
            self.disarm(scope)

    def _on_fire(self, scope: str, mask: int) -> None:
        if mask & select.EPOLLERR:          # the cgroup was removed under the trigger
            self.disarm(scope)
            return
        self._fired(scope)
