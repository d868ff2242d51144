"""Spawn cost of a tool call's process: /bin/true started inside a cgroup of its own
against a bare os.posix_spawn of /bin/true, interleaved in the same run, without and with
the eBPF programs loaded in this process (a big process: forking it would cost more than
spawning; agentcg's path never forks it).

Two agentcg rows: the cgroup primitives alone (tree create + spawn + wait + remove, every
step on the critical path), and the product's tool-call path, ToolCallManager begin +
spawn + wait + end with its record (what agentcg.client, `agentcg run` and `sandbox exec`
use): a spare cgroup with a parked exec helper that joined every hierarchy ahead, removal
after the record in the pool's thread (controller/toolcall_pool.py). Before each baseline
sample the bench waits until that thread is idle, so its work never lands in the baseline;
its CPU per call is printed. The target is judged on the product's path (round 2 judged the
primitives row, which had no record and no owner file: the product row is stricter).

Also prints a C floor where a C compiler is present: the same loop in C (posix_spawn and
wait; and spawning the exec helper that joins every hierarchy), as the cheapest the host
allows.

    sudo .venv/bin/python bench/bench_spawn.py [--runs 300]

Target: <= 1 ms added at p50 over the bare posix_spawn, without and with eBPF.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentcg.controller.cgroup import open_tree
from agentcg.controller.cgroup.spawner import helper_path

TARGET_ADDED_P50_MS = 1.0
TRUE = "/bin/true"
_C_FLOOR = r"""
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
extern char **environ;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }
/* floor N                      : posix_spawn /bin/true and wait, N times
 * floor N HELPER PROCS...      : posix_spawn the exec helper joining PROCS (opened once,
 *                                as the caller keeps them), read its status pipe, wait */
int main(int argc, char **argv) {
    int n = atoi(argv[1]), failed = 0;
    double *t = malloc(sizeof(double) * n);
    char fds[256] = "";
    for (int k = 3; k < argc; k++) {
        int fd = open(argv[k], O_WRONLY | O_CLOEXEC);
        if (fd < 0) { perror(argv[k]); return 1; }
        fcntl(fd, F_SETFD, 0);   /* inherited by the helper */
        char one[16];
        snprintf(one, sizeof one, "%s%d", k > 3 ? "," : "", fd);
        strcat(fds, one);
    }
    for (int i = 0; i < n; i++) {
        pid_t pid;
        int status = 0;
        double s = now();
        if (argc > 3) {
            int p[2];
            if (pipe(p)) return 1;
            fcntl(p[0], F_SETFD, FD_CLOEXEC);
            char st[16];
            snprintf(st, sizeof st, "%d", p[1]);
            char *args[] = {argv[2], st, fds, "--", "/bin/true", "/bin/true", NULL};
            posix_spawn(&pid, argv[2], NULL, NULL, args, environ);
            close(p[1]);
            char b[32];
            if (read(p[0], b, sizeof b) > 0) failed++;
            close(p[0]);
        } else {
            char *args[] = {"/bin/true", NULL};
            posix_spawn(&pid, "/bin/true", NULL, NULL, args, environ);
        }
        waitpid(pid, &status, 0);
        if (status != 0) failed++;
        t[i] = now() - s;
    }
    qsort(t, n, sizeof(double), cmp);
    printf("%.6f %.6f %d\n", t[n / 2], t[(int)(0.99 * (n - 1))], failed);
    return 0;
}
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bare_spawn() -> float:
    start = time.perf_counter()
    pid = os.posix_spawn(TRUE, [TRUE], os.environ)
    os.waitpid(pid, 0)
    return time.perf_counter() - start


def cgroup_spawn(tree, name: str) -> float:
    start = time.perf_counter()
    tree.create(name)
    tree.spawn(name, [TRUE]).wait()
    tree.remove(name)
    return time.perf_counter() - start


def c_floor(runs: int, tree) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "C floor: not measured (no C compiler)"
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "floor.c", Path(tmp) / "floor"
        src.write_text(_C_FLOOR)
        if subprocess.run([cc, "-O2", "-o", str(exe), str(src)], capture_output=True).returncode != 0:
            return "C floor: not measured (compiling it failed)"
        bare = subprocess.run([str(exe), str(runs)], capture_output=True, text=True, check=True).stdout.split()
        line = f"C floor   posix_spawn+wait:            p50 {float(bare[0]) * 1e3:.3f} ms  p99 {float(bare[1]) * 1e3:.3f} ms"
        helper = helper_path()
        if helper is not None:
            tree.create("floor")
            try:
                procs = [str(d / "cgroup.procs") for d in tree._hierarchy_dirs("floor")]
                joined = subprocess.run([str(exe), str(runs), str(helper), *procs], capture_output=True, text=True,
                                        check=True).stdout.split()
            finally:
                tree.remove("floor")
            line += (f"\n          posix_spawn of the exec helper, joining {len(procs)} hierarchies, then /bin/true: "
                     f"p50 {float(joined[0]) * 1e3:.3f} ms  p99 {float(joined[1]) * 1e3:.3f} ms"
                     + (f" ({joined[2]} runs FAILED)" if joined[2] != "0" else ""))
        return line


def tool_call(mgr) -> float:
    start = time.perf_counter()
    call = mgr.begin("bench", "true", [TRUE])
    proc = call.spawn([TRUE])
    mgr.end(call, proc.wait())
    if mgr.monitor is not None:
        mgr.monitor.poll(0)    # drain the exec/exit events, as agentcg.client does after each call
    return time.perf_counter() - start


def measure(tree, runs: int, label: str, monitor=None) -> bool:
    from agentcg.controller.toolcall import ToolCallManager
    from agentcg.controller.toolcall_pool import DEFAULT_POOL_SIZE

    bare: list[float] = []
    bare_primitives: list[float] = []
    in_cgroup: list[float] = []
    product: list[float] = []
    for i in range(10):  # warm-up: page cache, dentries, the tree's root
        bare_spawn()
        cgroup_spawn(tree, f"warm{i}")
    for i in range(runs):  # a loop of its own: its rmdirs' kernel work stays out of the next one
        bare_primitives.append(bare_spawn())
        in_cgroup.append(cgroup_spawn(tree, f"call-{i}"))
    with tempfile.TemporaryDirectory() as state:
        mgr = ToolCallManager(tree, monitor=monitor, grace_s=1.0, state=Path(state), pool_size=DEFAULT_POOL_SIZE)
        try:
            mgr.ensure_sandbox("bench")
            for i in range(10):  # warm-up: the pool
                bare_spawn()
                tool_call(mgr)
            cpu_before = mgr.pool.background_s
            for i in range(runs):  # interleaved so load from elsewhere hits all alike
                mgr.flush()        # the pool's thread idle: its work in neither the baseline nor a call
                bare.append(bare_spawn())
                product.append(tool_call(mgr))
            mgr.flush()
            background_ms = (mgr.pool.background_s - cpu_before) / runs * 1e3
        finally:
            mgr.close()
        left = tree.children("bench/tools") if tree.exists("bench/tools") else []
    ms = lambda v: v * 1e3
    b50, b99 = ms(percentile(bare, 0.50)), ms(percentile(bare, 0.99))
    c50, c99 = ms(percentile(in_cgroup, 0.50)), ms(percentile(in_cgroup, 0.99))
    pb50 = ms(percentile(bare_primitives, 0.50))
    p50, p99 = ms(percentile(product, 0.50)), ms(percentile(product, 0.99))
    ok = p50 - b50 <= TARGET_ADDED_P50_MS and not left
    print(f"[{label}]")
    print(f"  baseline  os.posix_spawn+wait:                  p50 {b50:.3f} ms  p99 {b99:.3f} ms")
    print(f"  primitives create+spawn+wait+remove:            p50 {c50:.3f} ms  p99 {c99:.3f} ms  "
          f"(added p50 {c50 - pb50:+.3f} ms over its own interleaved baseline, p50 {pb50:.3f} ms)")
    print(f"  tool call  begin+spawn+wait+end (with record):  p50 {p50:.3f} ms  p99 {p99:.3f} ms")
    print(f"  added     p50 {p50 - b50:+.3f} ms  p99 {p99 - b99:+.3f} ms; target <= {TARGET_ADDED_P50_MS:.1f} ms "
          f"added at p50: {'met' if p50 - b50 <= TARGET_ADDED_P50_MS else 'NOT met'}")
    print(f"  off the critical path: {background_ms:.3f} ms of CPU per call in the pool's thread; "
          f"call cgroups left after close: {len(left)}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--no-ebpf", action="store_true", help="skip the run with the eBPF programs loaded")
    args = parser.parse_args()
    if args.runs < 10:
        print("bench_spawn: --runs must be >= 10", file=sys.stderr)
        return 2
    tree = open_tree(root=f"agentcg-bench-{secrets.token_hex(4)}")
    results = []
    try:
        print(f"spawn {TRUE}, {args.runs} runs each, interleaved; cgroup layout: {tree.kind} "
              f"({len(tree._hierarchy_bases())} hierarchies joined); exec helper: {helper_path() or 'none (sh trampoline)'}")
        print(c_floor(args.runs, tree))
        results.append(measure(tree, args.runs, "no eBPF"))
        if not args.no_ebpf:
            from agentcg.bpf.monitor import BpfMonitor
            with BpfMonitor() as monitor:
                results.append(measure(tree, args.runs, "eBPF programs loaded in this process", monitor))
    finally:
        if tree.exists(""):
            tree.remove("")
    print(f"target <= {TARGET_ADDED_P50_MS:.1f} ms added at p50: {'met' if all(results) else 'NOT met'}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
