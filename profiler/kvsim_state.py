"""The KV simulator's state: its configuration, its per-policy result, one transfer link
and one session's request (what `Simulator` in kvsim.py moves between states)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from agentcg.profiler.kvsim_cost import EngineModel
from agentcg.profiler.kvsim_sessions import SimSession

GB = 1e9

PENDING, WAITING, RUNNING, PAUSED, DONE = "pending", "waiting", "running", "paused", "done"


@dataclass(frozen=True)
class SimConfig:
    model: EngineModel
    gpu_kv_bytes: int
    host_memory_bytes: int          # the host budget shared by sandboxes and the host KV pool
    host_kv_static_bytes: int       # the fixed host KV pool of policies that do not share
    ssd_bytes: int = 0
    block_tokens: int = 16
    arrival_interval_s: float = 0.0
    host_reserve_bytes: int = 0
    shared_prefix_tokens: int = 0   # a system prompt every session starts with, stored once per tier
    sandbox_memory: bool = True     # sandboxes follow their recorded memory (kvsim_host.py)
    max_kills_per_call: int = 3
    host_pool: str = "safe"         # how the fixed pool was sized (a label)


@dataclass
class PolicyResult:
    policy: str
    sessions: int
    jct_s: list[float]
    gpu_kv_waste_gbs: float = 0.0
    idle_held_gbs: float = 0.0
    recompute_gbs: float = 0.0
    recomputed_tokens: int = 0
    prefilled_tokens: int = 0
    bytes_moved: dict[str, int] = field(default_factory=dict)
    peak_host_kv_bytes: int = 0
    peak_host_total_bytes: int = 0   # host KV + sandboxes
    peak_sandbox_bytes: int = 0      # all sandboxes together
    makespan_s: float = 0.0
    preemptions: int = 0
    policy_errors: int = 0
    fallbacks: int = 0               # the fallback (vllm-v1) chose victims: the policy's directives made no room
    pressure_stalls: int = 0         # pressure rounds used up with no room made: the step stalled
    pins_released: int = 0           # pinned paused KV released so work goes on (nothing else could run)
    forced_spills: int = 0           # host KV dropped because the sandboxes needed the RAM
    refused_directives: int = 0
    unknown_directives: int = 0
    stall_s: float = 0.0
    wall_s: float = 0.0
    label: str = ""                  # the policy and its host pool
    host_pool_bytes: int = 0         # fixed pool (0 for none, or for a pool that follows the sandboxes)
    ttft_resumed_s: list[float] = field(default_factory=list)   # first token of calls after a tool gap
    sandbox_oom_kills: int = 0
    failed_calls: int = 0
    forced_spill_bytes: int = 0
    host_idle_gibs: float = 0.0      # host memory neither sandboxes nor KV hold, integrated

    @property
    def host_idle_mean_bytes(self) -> float:
        return self.host_idle_gibs * (1 << 30) / self.makespan_s if self.makespan_s > 0 else math.nan

    def ttft_quantile(self, q: float) -> float:
        return _quantile(self.ttft_resumed_s, q)

    def jct_quantile(self, q: float) -> float:
        return _quantile(self.jct_s, q)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class _Link:
    def __init__(self, name: str, bytes_per_s: float) -> None:
        self.name, self.bytes_per_s, self.free_at, self.moved = name, bytes_per_s, 0.0, 0

    def send(self, now: float, nbytes: int) -> float:
        if self.bytes_per_s <= 0:
            return math.inf
        start = max(now, self.free_at)
        self.free_at = start + nbytes / self.bytes_per_s
        self.moved += nbytes
        return self.free_at


@dataclass
class _Sess:
    spec: SimSession
    index: int
    start_s: float
    state: str = PENDING
    turn: int = 0
    ctx: int = 0                # tokens of the session's KV chain (computed)
    hwm: int = 0                # tokens of the chain ever computed (for recompute counting)
    g: int = 0                  # GPU prefix [0, g)
    pinned: bool = False
    evictable: bool = False
    ttl_deadline: float | None = None
    host: tuple[int, int] | None = None
    ssd: tuple[int, int] | None = None
    host_ready: float = 0.0     # when the host copy lands
    gpu_ready: float = 0.0      # when a transfer back to the GPU lands
    epoch: int = 0              # bumps when the KV is dropped, invalidating transfers in flight
    pending_release: int = 0    # GPU tokens freed when a swap-out lands
    # the current LLM call
    prompt: int = 0
    out: int = 0
    prefilled: int = 0
    decoded: int = 0
    recompute_upto: int = 0     # prefill positions below this are recomputation
    arrival_s: float = 0.0
    admitted_s: float | None = None
    paused_s: float | None = None
    preempted_s: float | None = None
    loading: bool = False
    alloc: int = 0              # this step's prefill chunk
    first_token: bool = False   # the current call has sampled its first token
    # the sandbox (kvsim_host.py)
    sandbox: int = 0
    gap_epoch: int = 0          # bumps when a tool call (re)starts, invalidating its events
    gap_start_s: float = 0.0
    mem_steps: tuple = ()
    mem_idx: int = 0
    kills: int = 0
    give_up: bool = False

    @property
    def rid(self) -> str:
        return self.spec.session_id

    @property
    def turn_spec(self):
        return self.spec.turns[self.turn]
