"""Datasets: math prompt and eval sets (TFDS, ArrayRecord), their answers, the synthetic task.

Modules (import them directly): math_sets (the published eval-set layouts), tfds_sources (TFDS
builders and per-host readers), synthetic (the seeded arithmetic task with fork labels).
"""
