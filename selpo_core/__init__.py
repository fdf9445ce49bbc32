"""selpo_core: the pure library of selpo (selective, token-level preference optimization).

Never imports prefect: every stage runs from a notebook or `python -m selpo_core.stages` as well as from a flow.
"""

__version__ = "0.1.0"
