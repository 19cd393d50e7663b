"""Fast CPU variants of the model's ops: C sources (``*.c``, package data) and the one loader that
builds them on first use into a private per-user cache (:mod:`tinyseek.kernels.loader`).

Layering: ``kernels`` sits below ``model`` and imports nothing from it. The PyTorch reference of every
op stays in ``tinyseek/model``; each op there has one seam where a variant from here is chosen once,
when the module is built or the model loaded, and the reference is tested against it.
"""
