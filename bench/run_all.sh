#!/usr/bin/env bash
# Runs every benchmark once, one after another, and saves each one's output with a header
# naming the machine under bench/results/<name>-<date>.txt. Needs root and the venv
# (`bash scripts/host.sh setup`). The replay benchmark alone takes about 4 minutes.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py="$repo/.venv/bin/python"
out="$repo/bench/results"
day=$(date -u +%Y-%m-%d)
mkdir -p "$out"
header() {
    echo "# $1, $(date -u +%Y-%m-%dT%H:%MZ), agentcg $(git -C "$repo" rev-parse --short HEAD)"
    echo "# host: $(uname -r), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"\
         "$(free -g | awk '/Mem:/{print $2}') GiB, cgroups $("$py" -c 'from agentcg.controller.cgroup.layout import detect_layout; print(detect_layout().kind)'),"\
         "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
}
run() {
    local name=$1; shift
    echo "== $name: $*" >&2
    { header "$name: $*"; (cd "$repo" && PYTHONUNBUFFERED=1 "$py" "$@" 2>&1); echo "# exit $?"; } \
        > "$out/$name-$day.txt"
    tail -n 4 "$out/$name-$day.txt" >&2
}
only=${1:-all}
want() { [ "$only" = all ] || [ "$only" = "$1" ]; }
want spawn      && run spawn bench/bench_spawn.py
want toolcall   && run toolcall bench/bench_toolcall.py
want reaction   && run reaction bench/bench_reaction.py
want daemon     && run daemon-scale bench/bench_daemon_scale.py
want overhead   && run bpf-overhead bench/bench_bpf_overhead.py
want report     && run report bench/bench_report.py
want gpu        && run gpu-bench-cpu bench/bench_gpu.py
want kv         && run kv-simulate bench/bench_kv_simulate.py
want engine     && run engine-cpu bench/bench_engine.py --threads 1
want replay     && run replay bench/bench_replay.py
want vllm       && run vllm-cpu bench/bench_vllm.py
want containers && run container-exec bench/bench_container_exec.py
exit 0
