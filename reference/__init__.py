"""learnsparse's NumPy reference: a small autodiff, CNN layers and models, training.

Start with :mod:`reference.autodiff` (the tape), :mod:`reference.ops` (the
kernels, each with its derivation), then :mod:`reference.nn` and
:mod:`reference.models`. The command line lives in :mod:`reference.cli`.
"""

__version__ = "0.1.0"
