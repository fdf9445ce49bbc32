"""Prefect tasks: the one stage task (stage.py) that runs any planned stage, the launcher for multi-process
stages (launch.py), and the reporting tasks (report.py, tso.py). The stage logic lives in selpo_core."""
