"""Deterministic KV policies for the vLLM tests (loaded by the daemon as "module:factory").

`KeepAll` keeps every paused session's KV on the GPU until it resumes; `OffloadAll` swaps it
to the host tier at every pause; `DiscardAll` drops every copy. Each otherwise does nothing.
"""
from __future__ import annotations

from agentcg.engine_protocol import Action, Directive
from agentcg.policies.kv.types import Decision, KvSnapshot, Trigger


class _OnPause:
    name = "test"
    shares_host_memory = False
    action = Action.KEEP

    def decide(self, snapshot: KvSnapshot) -> Decision:
        if snapshot.trigger is not Trigger.PAUSE or snapshot.subject is None:
            return Decision()
        return Decision((Directive(snapshot.subject, self.action),))

    def observe(self, event) -> None:
        pass

    def waiting_key(self, view) -> tuple:
        return (view.arrival_s, view.request_id)


class KeepAll(_OnPause):
    action = Action.KEEP


class OffloadAll(_OnPause):
    action = Action.SWAP_TO_HOST


class DiscardAll(_OnPause):
    action = Action.DISCARD
