"""Benchmarks that print numbers (not run by CI); installed as a package so one benchmark can reuse another's
builders (``python bench/sharded_step.py`` imports ``bench.train_step``)."""
