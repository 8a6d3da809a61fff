"""Tollgate: per-user usage and cost attribution for LLM traffic, as an Envoy ext_proc server."""

__version__ = "0.1.0"
