"""agentcg's vLLM V1 KV connector: the only module of agentcg that imports vLLM.

    vllm serve MODEL --disable-hybrid-kv-cache-manager --kv-transfer-config '{
        "kv_connector": "AgentcgConnector",
        "kv_connector_module_path": "agentcg.gpu.vllm.connector",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"socket": "/run/agentcg/agentcg.sock"}}'

vLLM builds the connector twice: the SCHEDULER role in the engine-core process (sessions,
the daemon link, decisions: sessions.py) and the WORKER role in the worker process (the data
path between vLLM's paged KV cache and agentcg's store: datapath.py). They talk only through
vLLM's own channels: `AgentcgMeta` (scheduler -> worker, each step) and `AgentcgWorkerMeta`
(worker -> scheduler, each step). docs/vllm.md has the extra-config keys and what is kept,
offloaded and loaded when.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole, KVConnectorWorkerMetadata,
)

from agentcg.engine_protocol import (
    Bandwidth, EngineStats, KvGeometry, Register, Tier, TierCapacity,
)
from agentcg.gpu.vllm.datapath import DataPath, JobResult, LayoutError, LoadJob, MoveJob, SaveJob, geometry_of, open_store
from agentcg.gpu.vllm.link import DaemonLink
from agentcg.gpu.vllm.sessions import SchedulerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput

log = logging.getLogger("agentcg.vllm")


def _setup_logging() -> None:
    """agentcg's connector lines in vLLM's log, at INFO, once per process."""
    root = logging.getLogger("agentcg")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"(agentcg pid={os.getpid()}) %(levelname)s %(asctime)s "
                                               "[%(name)s] %(message)s", "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False

DEFAULTS = {"socket": os.environ.get("AGENTCG_SOCKET", "/run/agentcg/agentcg.sock"), "host_bytes": 1 << 30,
            "ssd_dir": None, "ssd_bytes": 0, "hold_s": 30.0, "retry_s": 2.0, "metrics_url": None,
            "stats_interval_s": 2.0, "engine_id": None, "fault_file": None, "session_idle_s": 600.0}
METRICS = {"vllm:kv_cache_usage_perc": "kv_usage_frac", "vllm:num_requests_running": "running",
           "vllm:num_requests_waiting": "waiting", "vllm:num_preemptions_total": "preemptions_total",
           "vllm:num_preemptions": "preemptions_total", "vllm:prefix_cache_queries_total": "prefix_cache_queries",
           "vllm:prefix_cache_queries": "prefix_cache_queries", "vllm:prefix_cache_hits_total": "prefix_cache_hits",
           "vllm:prefix_cache_hits": "prefix_cache_hits"}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfa]+)")


@dataclass
class AgentcgMeta(KVConnectorMetadata):
    saves: list[SaveJob] = field(default_factory=list)
    moves: list[MoveJob] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)


@dataclass
class AgentcgWorkerMeta(KVConnectorWorkerMetadata):
    results: list[JobResult] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, AgentcgWorkerMeta):
            return AgentcgWorkerMeta(self.results + other.results)
        return self


def parse_metrics(text: str) -> dict[str, float]:
    """The vLLM /metrics samples this connector reports, summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) not in METRICS:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        field_name = METRICS[m.group(1)]
        out[field_name] = out.get(field_name, 0.0) + value
    return out


def _config(vllm_config: "VllmConfig") -> dict[str, Any]:
    extra = dict(DEFAULTS)
    given = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        log.warning("agentcg connector: ignoring unknown kv_connector_extra_config key(s) %s; known: %s",
                    ", ".join(unknown), ", ".join(DEFAULTS))
    extra.update({k: v for k, v in given.items() if k in DEFAULTS})
    return extra


class AgentcgConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _setup_logging()
        self.extra = _config(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        self.kv_heads = mc.get_num_kv_heads(pc)
        self.head_dim = mc.get_head_size()
        self.layers = mc.get_num_layers(pc)
        self.num_blocks = int(getattr(kv_cache_config, "num_blocks", 0) or 0)
        self.max_blocks_per_req = -(-int(mc.max_model_len) // self.block_size) + 1
        self.dtype_bytes = torch.tensor([], dtype=mc.dtype).element_size() if isinstance(mc.dtype, torch.dtype) else 2
        self.model = str(mc.model)
        self.sched: SchedulerSide | None = None
        self.link: DaemonLink | None = None
        self.datapath: DataPath | None = None
        self._results: list[JobResult] = []
        self._load_errors: set[int] = set()
        self._measured: dict[tuple[str, str], tuple[int, float]] = {}
        self._resync = threading.Event()
        self._pool: Any = None
        if role == KVConnectorRole.SCHEDULER:
            self._start_scheduler(vllm_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False      # a cache: a dropped save is a later miss, never wrong KV

    # ---- scheduler side ----------------------------------------------------------------
    def _start_scheduler(self, vllm_config: "VllmConfig") -> None:
        x = self.extra
        policy = getattr(vllm_config.kv_transfer_config, "kv_load_failure_policy", "fail")
        if policy != "recompute":
            log.warning("agentcg connector: kv_load_failure_policy is %r; set \"kv_load_failure_policy\": "
                        "\"recompute\" so a failed load is recomputed instead of failing the request", policy)
        self.sched = SchedulerSide(self.block_size, self._send, lambda: self.link is not None and self.link.up,
                                   hold_s=float(x["hold_s"]), has_ssd=bool(x["ssd_dir"]) and int(x["ssd_bytes"]) > 0,
                                   has_host=int(x["host_bytes"]) > 0, idle_s=float(x["session_idle_s"]))
        if x["socket"]:
            self.link = DaemonLink(x["socket"], self._register, retry_s=float(x["retry_s"]), on_up=self._resync.set)
            self.sched.take = self.link.take            # type: ignore[method-assign]
        threading.Thread(target=self._stats_loop, name="agentcg-vllm-stats", daemon=True).start()

    def _send(self, message: Any) -> bool:
        return self.link.send(message) if self.link is not None else False

    def _register(self) -> Register:
        bpt = 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes
        x = self.extra
        tiers = [TierCapacity(Tier.GPU, self.num_blocks * self.block_size * bpt)]
        if int(x["host_bytes"]):
            tiers.append(TierCapacity(Tier.HOST, int(x["host_bytes"])))
        if x["ssd_dir"] and int(x["ssd_bytes"]):
            tiers.append(TierCapacity(Tier.SSD, int(x["ssd_bytes"])))
        names = {"gpu": Tier.GPU, "host": Tier.HOST, "ssd": Tier.SSD}
        bandwidths = tuple(Bandwidth(names[s], names[d], b / t) for (s, d), (b, t) in self._measured.items()
                           if t > 0 and s in names and d in names and s != d)
        return Register(engine_id=x["engine_id"] or f"vllm-{os.getpid()}", model=self.model[:1000],
                        geometry=KvGeometry(self.layers, self.kv_heads, self.head_dim, self.dtype_bytes,
                                            self.block_size),
                        tiers=tuple(tiers), bandwidths=bandwidths)

    def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
        self._pool = gpu_block_pool
        if self.sched is not None:
            self.sched.pool = gpu_block_pool

    def on_new_request(self, request: Any) -> None:
        if self.sched is not None:
            self.sched.apply_directives()
            self.sched.new_request(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.sched is None:
            return 0, False
        return self.sched.matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self.sched is None:
            return
        ids = blocks.get_block_ids()
        self.sched.after_alloc(request, list(ids[0]) if ids else [], num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        if self.sched is None:
            return AgentcgMeta()
        if self._resync.is_set():
            self._resync.clear()
            self.sched.resync()
        saves, moves, loads = self.sched.build(scheduler_output)
        return AgentcgMeta(saves, moves, loads)

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if self.sched is not None and isinstance(meta, AgentcgWorkerMeta) and meta.results:
            for r in meta.results:
                for src, dst, nbytes, seconds in r.legs:
                    key = (_tier_name(src), _tier_name(dst))
                    b, t = self._measured.get(key, (0, 0.0))
                    self._measured[key] = (b + nbytes, t + seconds)
            self.sched.results(meta.results)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        if self.sched is not None:
            ids = block_ids[0] if block_ids and isinstance(block_ids[0], (list, tuple)) else block_ids
            self.sched.finished(request, list(ids or ()))
        return False, None

    def has_pending_block_frees(self) -> bool:
        # vLLM is about to preempt a running request for blocks: give back kept ones first.
        return self.sched is not None and self.sched.release_for_pressure()

    def has_pending_push_work(self) -> bool:
        # keeps vLLM's engine stepping until the worker has run the queued moves
        return self.sched is not None and self.sched.has_pending_work()

    def _stats_loop(self) -> None:
        url, every = self.extra["metrics_url"], float(self.extra["stats_interval_s"])
        warned = False
        while True:
            time.sleep(every)
            if self.link is None or not self.link.up:
                continue
            figures: dict[str, float] = {}
            if url:
                try:
                    with urllib.request.urlopen(url, timeout=2.0) as response:
                        figures = parse_metrics(response.read().decode(errors="replace"))
                except OSError as exc:
                    if not warned:
                        log.warning("agentcg connector: cannot scrape vLLM metrics at %s (%s)", url, exc)
                        warned = True
            pool, sched = self._pool, self.sched
            held = sum(len(s.pinned) for s in list(sched.sessions.values())) if sched is not None else None
            usage = figures.get("kv_usage_frac")
            if usage is None and pool is not None:
                usage = float(pool.get_usage())
            ints = {k: int(figures[k]) for k in ("running", "waiting", "preemptions_total", "prefix_cache_queries",
                                                 "prefix_cache_hits") if k in figures}
            self._send(EngineStats(time.monotonic(), kv_usage_frac=max(0.0, min(1.0, usage)) if usage is not None
                                   else None, gpu_blocks=self.num_blocks or None, held_blocks=held,
                                   source=url or "block pool", **ints))

    # ---- worker side -------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.role != KVConnectorRole.WORKER or self.datapath is not None:
            return
        x = self.extra
        try:
            num_blocks = self.num_blocks or next(iter(kv_caches.values())).shape[0]
            geometry, names, dims = geometry_of(kv_caches, num_blocks, self.block_size, self.kv_heads, self.head_dim)
            device = "cuda" if next(iter(kv_caches.values())).is_cuda else "cpu"
            store = open_store(geometry, self.max_blocks_per_req, int(x["host_bytes"]), x["ssd_dir"],
                               int(x["ssd_bytes"]), device)
            self.datapath = DataPath(store, kv_caches, names, dims, fault_file=x["fault_file"])
            log.info("agentcg connector: KV data path ready (%d layers, %d blocks of %d B, host %d B, ssd %d B, %s)",
                     len(names), num_blocks, geometry.block_bytes, int(x["host_bytes"]), int(x["ssd_bytes"]), device)
        except (LayoutError, Exception) as exc:   # the connector must not stop vLLM: no data path then
            log.warning("agentcg connector: no KV data path (%s); keep works, offload and load are refused", exc)

    def _meta(self) -> AgentcgMeta | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, AgentcgMeta) else None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is None:
            return
        for job in meta.loads:
            if self.datapath is None:
                r = JobResult(job.job_id, job.key, "load", False, len(job.block_ids), reason="no data path",
                              failed_block_ids=job.block_ids)
            else:
                r = self.datapath.load(job)
            self._load_errors.update(r.failed_block_ids)
            self._results.append(r)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return                  # loads are synchronous, done in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return                  # finished calls' blocks are copied whole in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._meta()
        if meta is None:
            return
        for save in meta.saves:
            self._results.append(self.datapath.save(save) if self.datapath is not None else
                                 JobResult(save.job_id, save.key, "swap_out" if save.dst == "host" else "offload",
                                           False, len(save.block_ids), reason="no data path"))
        for move in meta.moves:
            self._results.append(self.datapath.move(move) if self.datapath is not None else
                                 JobResult(move.job_id, move.key, move.op, False, reason="no data path"))

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._results:
            return None
        out, self._results = self._results, []
        return AgentcgWorkerMeta(out)

    def shutdown(self) -> None:
        if self.link is not None:
            self.link.close()
        if self.datapath is not None:
            self.datapath.store.close()


def _tier_name(name: str) -> str:
    return "gpu" if name in ("device", "gpu") else name
