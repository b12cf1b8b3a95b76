"""Tools that judge the pipeline's output and run it end to end: accuracy parity across backends
(``parity``), the whole pipeline on a small dataset (``demo``)."""
