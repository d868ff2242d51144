"""agentcg.bpf: eBPF programs (C, loaded with bcc) on tracepoints, keyed by cgroup id."""
