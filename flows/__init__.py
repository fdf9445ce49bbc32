"""Prefect flows: compose the tasks into selpo's pipelines."""
