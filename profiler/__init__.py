"""agentcg.profiler: traces, reports, plots, importers and simulation."""
