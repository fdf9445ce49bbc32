"""Prefect task adapters: each resolves a config, calls one selpo_core stage, returns a path."""
