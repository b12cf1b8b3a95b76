"""Studies: the questions this project measured on its way, each one module, one make target, one report.

Benchmarks (``bench_*``), the authors' formulation written out literally (``authors``, the baseline the CPU
study measures speed-ups from and the reference the model tests check against) and the oneDNN Linear kernel
(``onednn``). Studies may import every stage; nothing imports them. Driver: ``python -m studies <question>``.
"""
