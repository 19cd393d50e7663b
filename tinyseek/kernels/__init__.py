"""Fast CPU variants of the model's ops: C sources (``*.c``, package data), the Python glue of each
(``<op>.py``: takes tensors and plain arguments, returns None where the kernel does not apply) and
the one loader that builds them on first use into a private per-user cache
(:mod:`tinyseek.kernels.loader`; ``pyext.h``: the CPython-extension prelude a source includes).

Layering: ``kernels`` sits below ``model`` and imports nothing from it. The PyTorch reference of every
op stays in ``tinyseek/model``; each op there has one seam (:class:`tinyseek.model.layers.KernelSeam`)
where a variant from here is chosen once, when the module is built, moved or loaded, and the tests
compare every variant with the reference. tests/test_kernels_build.py compiles every source here with
``-Wall -Werror``.
"""
