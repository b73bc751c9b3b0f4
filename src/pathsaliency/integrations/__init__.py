"""Adapters that register the path-metric criterion with compression frameworks.

Each module here imports its framework; the core ``pathsaliency`` never does.
"""
