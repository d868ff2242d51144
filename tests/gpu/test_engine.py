"""The reference engine on this CPU-only host: the real decode loop, the real tiered store
(CPU device tier, mlocked host pool, O_DIRECT SSD file on the repository's filesystem) and
the real KV policies. No GPU here: the device tier is host memory (docs/gpu.md).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from agentcg.engine_protocol import Action, Directive, DirectiveResult, EventKind, Tier
from agentcg.errors import InvalidInput
from agentcg.gpu.engine.engine import Engine
from agentcg.gpu.engine.model import Feed, ModelConfig, RandomDecoder
from agentcg.gpu.engine.paged import PagedKV
from agentcg.gpu.engine.run import InProcessDriver, run_sessions
from agentcg.gpu.engine.turns import EngineSession, EngineTurn
from agentcg.gpu.kvgeometry import KVGeometry, KVTierFull
from agentcg.gpu.kvstore import TieredKVStore
from agentcg.policies.kv import make_policy
from agentcg.policies.kv.types import NO_DECISION, Decision, KvSnapshot, Trigger
from testutil import wait_until

REPO = Path(__file__).resolve().parents[2]
GEOMETRY = KVGeometry(layers=2, kv_heads=2, head_dim=32, dtype="fp32", tokens_per_block=16)  # 16 KiB blocks


@pytest.fixture
def ssd_dir() -> Path:
    # On the repository's filesystem (ext4 here), where O_DIRECT works; /tmp may be tmpfs.
    with tempfile.TemporaryDirectory(prefix="agentcg-test-engine-", dir=REPO) as d:
        yield Path(d)


@pytest.fixture(autouse=True)
def one_thread():
    # Other test processes share the two cores: OpenMP spinning of a second thread costs
    # more than it gains on these tiny GEMMs. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def kept_outputs():
    return run_sessions([session()], GEOMETRY, OnPause(Action.KEEP), device_blocks=64, timeout_s=60).outputs()


def session(sid: str = "s0", turns: int = 3, base: int = 70, step: int = 45, out: int = 6,
            tool_s: float = 0.02) -> EngineSession:
    return EngineSession(sid, f"sandbox-{sid}", tuple(
        EngineTurn(base + i * step, out, "Bash:pytest" if i < turns - 1 else None, tool_s if i < turns - 1 else 0.0)
        for i in range(turns)))


class OnPause:
    """A KV policy that answers every pause with one fixed directive (vllm-v1 otherwise)."""

    name = "on-pause"
    shares_host_memory = False

    def __init__(self, action: Action | None, **fields) -> None:
        self.action, self.fields = action, fields
        self.base = make_policy("vllm-v1")

    def decide(self, snap: KvSnapshot) -> Decision:
        if snap.trigger is Trigger.PAUSE and self.action is not None:
            return Decision((Directive(snap.subject, self.action, **self.fields),))
        return self.base.decide(snap) if snap.trigger is not Trigger.PAUSE else NO_DECISION

    def observe(self, event) -> None:
        return None

    def waiting_key(self, view) -> tuple:
        return self.base.waiting_key(view)


class PreemptToHost(OnPause):
    """vllm-v1's victim, but its KV is swapped to the host instead of left to the prefix cache."""

    def __init__(self) -> None:
        super().__init__(None)

    def decide(self, snap: KvSnapshot) -> Decision:
        decision = self.base.decide(snap)
        return Decision(tuple(Directive(d.request_id, d.action, tier=Tier.HOST) if d.action is Action.PREEMPT else d
                              for d in decision.directives))


def kv_positions(store: TieredKVStore, rid: str, n_tokens: int) -> torch.Tensor:
    blocks = [store.read(rid, i) for i in range(-(-n_tokens // 16))]
    stacked = torch.stack(blocks)                      # (nb, 2, layers, T, heads, dim)
    return stacked.permute(1, 2, 0, 3, 4, 5).reshape(2, GEOMETRY.layers, -1, 2, 32)[:, :, :n_tokens]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kv_is_bit_identical_whether_prefilled_at_once_or_token_by_token_in_a_batch(dtype):
    """The property recompute relies on: a token's KV and the next token do not depend on
    how the context was chunked or what else was in the batch."""
    geometry = KVGeometry(2, 2, 32, dtype, 16)
    model = RandomDecoder(ModelConfig.for_geometry(geometry))
    with TieredKVStore(geometry, 64, 0, device="cpu") as store:
        paged = PagedKV(store)
        for rid in ("whole", "chunked", "other"):
            store.allocate(rid, 10)
        gen = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, model.config.vocab, (90,), generator=gen)
        other = torch.randint(0, model.config.vocab, (100,), generator=gen)
        whole = model.step([Feed(paged.view("whole"), tokens, 0)])[0]
        model.step([Feed(paged.view("chunked"), tokens[:37], 0)])
        for i in range(37, 90):
            feeds = [Feed(paged.view("chunked"), tokens[i:i + 1], i)]
            if i % 3:
                feeds.insert(0, Feed(paged.view("other"), other[i:i + 1 + i % 5], i))
            chunked = model.step(feeds)[-1]
        a = kv_positions(store, "whole", 90)
        b = kv_positions(store, "chunked", 90)
        assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32))
        assert whole == chunked


@pytest.mark.parametrize("action,fields,moved", [
    (Action.KEEP, {}, []),
    (Action.SWAP_TO_HOST, {}, [("device", "host"), ("host", "device")]),
    (Action.OFFLOAD_TO_SSD, {}, [("device", "ssd"), ("ssd", "device")]),
    (Action.DISCARD, {}, []),
])
def test_same_tokens_whether_kv_was_kept_swapped_offloaded_or_recomputed(ssd_dir, kept_outputs, action, fields,
                                                                         moved):
    result = run_sessions([session()], GEOMETRY, OnPause(action, **fields), device_blocks=64, host_blocks=64,
                          ssd_dir=ssd_dir, timeout_s=60)
    assert result.outputs() == kept_outputs
    assert all(len(t.output) == 6 for t in result.sessions[0].turns)
    assert result.refused_directives == 0
    later = result.sessions[0].turns[1:]
    for src, dst in moved:
        assert result.bytes_moved(src, dst) > 0, (src, dst)
    if action is Action.DISCARD:
        assert result.recomputed_tokens > 0 and all(t.cached_tokens == 0 for t in later)
    else:
        assert result.recomputed_tokens == 0 and all(t.cached_tokens > 0 for t in later)
    if not moved:
        assert result.traffic == ()


def test_preemption_under_a_full_device_pool_keeps_the_tokens(ssd_dir):
    # No tool calls: three requests of 50..64 + 30 tokens grow into a 12-block (192-token) pool.
    sessions = [session(f"s{i}", turns=1, base=50 + 7 * i, out=30) for i in range(3)]
    roomy = run_sessions(sessions, GEOMETRY, "vllm-v1", device_blocks=128, timeout_s=60)
    tight = run_sessions(sessions, GEOMETRY, "vllm-v1", device_blocks=12, timeout_s=60)
    to_host = run_sessions(sessions, GEOMETRY, PreemptToHost(), device_blocks=12, host_blocks=64, timeout_s=60)
    infercept = run_sessions(sessions, GEOMETRY, "infercept", device_blocks=12, host_blocks=64, timeout_s=60)
    assert roomy.preemptions == 0
    assert tight.preemptions > 0 and tight.recomputed_tokens > 0
    assert to_host.preemptions > 0 and to_host.bytes_moved("device", "host") > 0
    assert tight.outputs() == roomy.outputs() == to_host.outputs() == infercept.outputs()


def test_protocol_events_register_and_directives_from_the_driver(ssd_dir):
    sent = []

    def on_message(driver: InProcessDriver, message) -> None:
        # The daemon's role: swap the KV out when the agent enters its tool call.
        if getattr(message, "kind", None) is EventKind.PAUSED:
            driver.send(Directive(message.request_id, Action.SWAP_TO_HOST))
            driver.send(Directive("nobody", Action.DISCARD))
            sent.append(message)

    result = run_sessions([session(turns=2)], GEOMETRY, OnPause(None), device_blocks=64, host_blocks=64,
                          ssd_dir=ssd_dir, on_message=on_message, timeout_s=60)
    reg = result.register
    assert (reg.geometry.layers, reg.geometry.kv_heads, reg.geometry.head_dim, reg.geometry.dtype_bytes) == (2, 2, 32, 4)
    assert {t.tier: t.capacity_bytes for t in reg.tiers}[Tier.GPU] == 64 * GEOMETRY.block_bytes
    assert {(b.src, b.dst) for b in reg.bandwidths} >= {(Tier.GPU, Tier.HOST), (Tier.HOST, Tier.GPU),
                                                        (Tier.GPU, Tier.SSD), (Tier.SSD, Tier.GPU)}
    assert all(b.bytes_per_s > 0 for b in reg.bandwidths)
    assert len(sent) == 1
    paused = sent[0]
    assert (paused.session_id, paused.sandbox, paused.tool, paused.tool_call_id) == ("s0", "sandbox-s0", "Bash:pytest", "s0/0")
    assert result.bytes_moved("device", "host") > 0 and result.bytes_moved("host", "device") > 0
    assert result.refused_directives == 1


def test_event_sequence_and_results(ssd_dir):
    driver_messages = []
    result = run_sessions([session(turns=2)], GEOMETRY, "vllm-v1", device_blocks=64,
                          on_message=lambda d, m: driver_messages.append(m), timeout_s=60)
    kinds = [m.kind for m in driver_messages if hasattr(m, "kind")]
    assert kinds == [EventKind.ADMITTED, EventKind.PAUSED, EventKind.RESUMED, EventKind.ADMITTED, EventKind.FINISHED]
    refused = [m for m in driver_messages if isinstance(m, DirectiveResult) and not m.ok]
    assert refused == []
    turns = result.sessions[0].turns
    assert turns[0].prompt_tokens == 70 and turns[1].prompt_tokens == 115
    assert turns[1].arrival_s >= turns[0].end_s + 0.02
    assert all(t.arrival_s <= t.admitted_s <= t.first_token_s <= t.end_s for t in turns)


def test_refusals_and_bad_input(ssd_dir):
    model = RandomDecoder(ModelConfig(layers=3, kv_heads=2, head_dim=32, q_heads=4))
    with TieredKVStore(GEOMETRY, 16, 0, device="cpu") as store:
        with pytest.raises(InvalidInput, match="disagree"):
            Engine(store, model, make_policy("vllm-v1"))
    with TieredKVStore(GEOMETRY, 16, 0, on_full="spill", device="cpu") as store:
        with pytest.raises(InvalidInput, match="on_full='error'"):
            Engine(store, RandomDecoder(ModelConfig.for_geometry(GEOMETRY)), make_policy("vllm-v1"))
    with pytest.raises(KVTierFull, match="raise device_blocks"):
        run_sessions([session(base=400, turns=1)], GEOMETRY, "vllm-v1", device_blocks=8, timeout_s=30)
    with pytest.raises(InvalidInput, match="no sessions"):
        run_sessions([], GEOMETRY)


def test_reference_engine_over_the_daemon_socket(ssd_dir, kept_outputs):
    """The reference engine attached to a real daemon through its Unix socket (engine.attach,
    then engine-protocol lines): the pauses it reports for its sandbox reach the daemon's KV
    policy, the daemon's directives come back and are answered, and the tokens are the same
    as in the in-process run."""
    from agentcg.controller.daemon.testing import daemon_process
    from agentcg.gpu.engine.daemon_driver import DaemonDriver

    with daemon_process() as d:
        driver = DaemonDriver(d.socket_path)
        try:
            result = run_sessions([session(tool_s=0.2)], GEOMETRY, "vllm-v1", device_blocks=64, host_blocks=64,
                                  ssd_dir=ssd_dir, driver=driver, timeout_s=60)
            links = d.result("state")["engines"]
        finally:
            driver.close()
        assert driver.error is None
        assert driver.received, "the daemon's KV policy sent no directive for the engine's pauses"
        assert {m.request_id for m in driver.received} == {"s0"}
        assert len(links) == 1, links
        assert wait_until(lambda: not d.result("state")["engines"], timeout_s=5.0), "the closed link was not forgotten"
    assert result.outputs() == kept_outputs

