"""agentcg.controller.daemon: the long-running root daemon.

    config.py   TOML -> validated DaemonConfig (defaults work with no file)
    server.py   the Unix socket: JSON-lines framing, limits, peer credentials
    state.py    the state file and adoption of cgroups left by an earlier daemon
    calls.py    the daemon's tool-call lifecycle (begin, attach, end, reap)
    service.py  the daemon: one epoll loop tying sockets, BPF, PSI and the tick together
    metrics.py  the Prometheus collector and its tiny HTTP endpoint

Nothing here does work at import time; `agentcg daemon` (daemon_cli) builds a Daemon.
"""
