"""Hybrid hosts: v1 controllers for memory, cpu, cpuacct, pids (and freezer as a
fallback), the v2 tree for identity, freeze, kill and PSI.

A cgroup is one directory per hierarchy, same relative path in each; a spawned or
attached process joins all of them. The v2 directory is the cgroup's identity: its
inode is the id BPF sees (bpf_get_current_cgroup_id() reads the default hierarchy),
PSI is accounted on it, and `exists`, `children`, `pids` read it. The v1 mappings and
their limits are described in `v1`.
"""
from __future__ import annotations

import builtins
import os
import signal
from pathlib import Path
from typing import Any

from agentcg.controller.cgroup import v1
from agentcg.controller.cgroup.base import CpuStat, MemoryEvents, MemoryStat, validate_path
from agentcg.controller.cgroup.layout import CgroupLayout
from agentcg.controller.cgroup.v2 import V2Tree, check_cpu_max, check_weight, limit_text, pids_below
from agentcg.errors import CgroupGone, ControllerMissing

# v1 controllers a cgroup joins, in this order; co-mounted ones share a directory.
JOINED_V1 = ("memory", "cpu", "cpuacct", "pids", "freezer")


class HybridTree(V2Tree):
    kind = "hybrid"

    def __init__(self, layout: CgroupLayout, root: str = "agentcg", *,
                 kernel_release: str | None = None) -> None:
        if layout.v2_mount is None:
            raise ControllerMissing("hybrid cgroups need the v2 tree (e.g. /sys/fs/cgroup/unified); none is mounted")
        self.v1_mounts = {c: Path(m) for c, m in layout.v1_mounts.items() if c in JOINED_V1}
        super().__init__(layout.v2_mount, root, kernel_release=kernel_release)
        if "freeze" in self._core_caps():
            # Linux 5.2+ freezes through the v2 tree: joining the v1 freezer too would only
            # add a mkdir, a join and an rmdir to every tool call.
            self.v1_mounts.pop("freezer", None)
        if self.v1_mounts.get("cpuacct") not in (None, self.v1_mounts.get("cpu")) and \
                (self.mount / "cpu.stat").exists():
            # the v2 tree's cpu.stat (usage/user/system, Linux 4.15+) counts every cgroup's CPU
            # time whatever the controllers: a cpuacct mounted on its own would only add a
            # mkdir, a join (a cgroup migration, ~0.2 ms) and an rmdir to every call
            self.v1_mounts.pop("cpuacct", None)

    def _probe(self) -> frozenset[str]:
        caps = self._core_caps()
        if "freeze" not in caps and "freezer" in self.v1_mounts:
            caps.add("freeze")
        if "memory" in self.v1_mounts:
            caps |= {"memory.max", "memory.low", "memory.min", "memory.peak"}
        if "cpu" in self.v1_mounts:
            caps |= {"cpu.weight", "cpu.max"}
        if "pids" in self.v1_mounts:
            caps.add("pids.max")
        return frozenset(caps)

    def _v1_bases(self) -> list[Path]:
        bases: list[Path] = []
        for controller in JOINED_V1:
            mount = self.v1_mounts.get(controller)
            if mount is not None and mount / self.root not in bases:
                bases.append(mount / self.root)
        return bases

    def _hierarchy_bases(self) -> list[Path]:
        return [self.root_dir, *self._v1_bases()]

    def _hierarchy_dirs(self, path: str) -> list[Path]:
        v2 = self._dir(path)   # validates, memoised
        return [v2, *(self.cgroup_dir(path, c) for c in self._v1_order())]

    def _v1_order(self) -> list[str]:
        """One controller per distinct v1 mount, in JOINED_V1 order (what _v1_bases lists)."""
        order = getattr(self, "_v1_order_cache", None)
        if order is None:
            seen: set[Path] = set()
            order = []
            for controller in JOINED_V1:
                mount = self.v1_mounts.get(controller)
                if mount is not None and mount not in seen:
                    seen.add(mount)
                    order.append(controller)
            self._v1_order_cache = order
        return order

    def _create_in(self, base: Path, path: str, exist_ok: bool, enable: bool) -> None:
        # No subtree_control in hybrid: the v2 tree has no resource controllers to enable.
        super()._create_in(base, path, exist_ok, enable=False)

    def cgroup_dir(self, path: str, hierarchy: str = "v2") -> Path:
        if hierarchy == "v2":
            return self._dir(path)
        key = (path, hierarchy)
        cache = self.__dict__.setdefault("_v1_dirs", {})
        directory = cache.get(key)
        if directory is None:
            directory = self._v1_dir(path, hierarchy)
            if len(cache) >= 4096:
                cache.clear()
            cache[key] = directory
        return directory

    def _v1_dir(self, path: str, hierarchy: str) -> Path:
        mount = self.v1_mounts.get(hierarchy)
        if mount is None:
            raise ControllerMissing(
                f"hierarchy {hierarchy!r} is not mounted here; have v2 and {', '.join(sorted(self.v1_mounts))}"
            )
        path = validate_path(path)
        return mount / self.root / path if path else mount / self.root

    def _v1(self, controller: str, path: str, cap: str | None = None, check: bool = True) -> Path:
        """The v1 directory; `check`: CgroupGone now when the v2 one is gone (readings skip
        the stat: a read in a removed cgroup raises CgroupGone by itself, _fs.translate)."""
        if cap is not None:
            self._require(cap)
        directory = self.cgroup_dir(validate_path(path), controller)
        if check and not self._dir(path).is_dir():
            raise CgroupGone(f"{self._dir(path)}: the cgroup does not exist (removed, or never created)")
        return directory

    # ---- lifecycle helpers ------------------------------------------------------
    def _any_process(self, path: str) -> bool:
        if super()._any_process(path):
            return True
        return bool(pids_below(self._hierarchy_dirs(path)[1:]))

    def kill(self, path: str) -> None:
        """cgroup.kill on the v2 tree, plus SIGKILL to anything that joined only a v1
        hierarchy (one sweep; `remove` repeats it while processes remain)."""
        super().kill(path)
        for pid in pids_below(self._hierarchy_dirs(path)[1:]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _set_frozen(self, path: str, frozen: bool) -> None:
        if "freeze" in self._core_caps():
            super()._set_frozen(path, frozen)
        else:  # kernels before 5.2: the v1 freezer
            v1.set_frozen(self._v1("freezer", path, "freeze"), frozen)

    def is_frozen(self, path: str) -> bool:
        if "freeze" in self._core_caps():
            return super().is_frozen(path)
        return v1.freezer_state(self._v1("freezer", path, "freeze")) == "FROZEN"

    # ---- limits -----------------------------------------------------------------
    def set_memory(self, path: str, *, high: Any = None, max: Any = None, low: Any = None,
                   min: Any = None) -> None:
        path = validate_path(path)
        if high is not None:
            limit_text(high, "memory.high")
            raise ControllerMissing(
                "memory.high has no cgroup v1 equivalent (v1 cannot throttle at a threshold); "
                "use max=, or run on a cgroup v2 host"
            )
        max_text = None if max is None else limit_text(max, "memory.max", v1.V1_UNLIMITED)
        soft = [limit_text(v, name, v1.V1_UNLIMITED) for name, v in (("memory.low", low), ("memory.min", min))
                if v is not None]
        directory = self._v1("memory", path, "memory.max")
        if max_text is not None:
            v1.set_memory_limit(directory, max_text)
        if soft:
            # the larger protection wins; -1 (unlimited) is the largest
            v1.set_memory_soft_limit(directory, v1.V1_UNLIMITED if v1.V1_UNLIMITED in soft else builtins.max(soft, key=int))

    def set_cpu(self, path: str, *, weight: int | None = None, max_s: Any = None,
                period_s: float = 0.1) -> None:
        path = validate_path(path)
        if weight is not None:
            check_weight(weight)
        quota = check_cpu_max(max_s, period_s) if max_s is not None else None
        if weight is None and quota is None:
            return
        directory = self._v1("cpu", path, "cpu.weight")
        if weight is not None:
            v1.set_cpu_weight(directory, weight)
        if quota is not None:
            v1.set_cpu_max(directory, *quota)

    def set_pids_max(self, path: str, value: Any) -> None:
        text = limit_text(value, "pids.max")
        v1.set_pids_max(self._v1("pids", validate_path(path), "pids.max"), text)

    # ---- readings ---------------------------------------------------------------
    def memory_current(self, path: str) -> int:
        return v1.memory_current(self._v1("memory", path, "memory.max", check=False))

    def memory_peak(self, path: str) -> int:
        return v1.memory_peak(self._v1("memory", path, "memory.peak", check=False))

    def memory_events(self, path: str) -> MemoryEvents:
        return v1.memory_events(self._v1("memory", path, "memory.max", check=False))

    def memory_stat(self, path: str) -> MemoryStat:
        return v1.memory_stat(self._v1("memory", path, "memory.max", check=False))

    def cpu_stat(self, path: str) -> CpuStat:
        if "cpuacct" not in self.v1_mounts:
            base = super().cpu_stat(path)  # the v2 tree always has usage_usec/user/system
        else:
            usage_s, user_s, system_s = v1.cpu_usage(self._v1("cpuacct", path))
            base = CpuStat(usage_s, user_s, system_s, 0, 0, 0.0)
        if "cpu" in self.v1_mounts:
            return base._replace(**dict(zip(("nr_periods", "nr_throttled", "throttled_s"),
                                            v1.cpu_throttling(self._v1("cpu", path, check=False)))))
        return base



