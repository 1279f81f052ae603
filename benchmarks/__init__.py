"""`make bench`: the benchmark suite (see benchmarks/README.md).

Every figure is a ratio against a baseline measured in the same run on the same machine, the
median of several repetitions, because the machines this runs on (a shared 2-core CPU box, a
GPU node) differ too much for absolute numbers to mean anything across runs.

    python -m benchmarks.run [--quick] [--only generation,training,scaling]
"""
