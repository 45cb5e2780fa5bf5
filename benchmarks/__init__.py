"""Benchmarks of memmap-pool against the other ways of filling numpy arrays on several cores.

Run ``python -m benchmarks --help``; docs/performance.md explains what is measured.
"""
