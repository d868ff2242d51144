"""agentcg.controller: the host side. Cgroups per sandbox and tool call, the daemon,
enforcement, the Prometheus exporter and the CLI commands that act on the host."""
