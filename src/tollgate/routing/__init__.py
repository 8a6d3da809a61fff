"""Upstream routing: providers, model-prefix routing, base URI allow-list, credential injection."""
