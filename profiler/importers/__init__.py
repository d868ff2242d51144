"""Importers of external traces into agentcg traces."""
