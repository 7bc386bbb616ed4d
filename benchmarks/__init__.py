"""stargate's benchmark suite: ``python -m benchmarks [NAME] [--quick] [--out DIR]``.

Every benchmark measures stargate against a peer in the same run, prints a
table and writes plots (PNG) to ``--out`` (``benchmarks/results/`` by
default). See ``docs/topics/performance.rst`` for what each one measures
and the figures of a full run.
"""
