"""fastdpo's measuring tools, kept apart from the loss library (the library never imports this package).

- :mod:`fastdpo.bench.cli`: the ``fastdpo`` command line (``fastdpo bench``, ``fastdpo profile``).
- :mod:`fastdpo.bench.run`: ``fastdpo bench``, the DPO loss step against the naive reference and competitors.
- :mod:`fastdpo.bench.competitors`: the implementations compared, behind one interface.
- :mod:`fastdpo.bench.profiling`: ``fastdpo profile``, the memory of a whole DPO training step of a model.
- :mod:`fastdpo.bench.memory`: peak-memory meters (GPU allocator statistics, or RSS on CPU).
"""
