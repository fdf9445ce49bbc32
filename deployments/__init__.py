"""Deployments: serve script and prefect.yaml for the flows."""
