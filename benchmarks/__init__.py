"""Benchmarks: quality against the synthetic task's ground truth, speed against peers (see README, Results)."""
