"""Learnable sparsity and the baselines it is compared with.

Methods (``--method``):

- ``dense``: no sparsity (:class:`~reference.sparsity.base.Dense`).
- ``str``: soft threshold weight reparameterization (:mod:`.soft_threshold`).
- ``ltp``: learned threshold pruning with a differentiable L0 (:mod:`.learned_threshold`).
- ``scp``: operation-aware soft channel pruning (:mod:`.channel_pruning`).
- ``magnitude`` and ``gmp``: magnitude pruning (uniform or global, one-shot or
  gradual) and gradual magnitude pruning with the cubic schedule
  (:mod:`.magnitude`), optionally with per-layer budgets read from a trained
  run or a budget file (budget transfer, :mod:`.budgets`).

Every method is a :class:`~reference.sparsity.base.SparsityMethod`: hooks the
training loop calls. :func:`build_method` makes one from a training config.
"""

from __future__ import annotations

from importlib import import_module

from reference.errors import ConfigError
from reference.sparsity.base import Dense, SparsityMethod, StepContext

__all__ = ["METHOD_NAMES", "Dense", "SparsityMethod", "StepContext", "build_method"]

# name -> (module, factory); modules are imported on first use
_REGISTRY = {
    "dense": ("reference.sparsity.base", "Dense"),
    "str": ("reference.sparsity.soft_threshold", "from_config"),
    "ltp": ("reference.sparsity.learned_threshold", "from_config"),
    "scp": ("reference.sparsity.channel_pruning", "from_config"),
    "magnitude": ("reference.sparsity.magnitude", "magnitude_from_config"),
    "gmp": ("reference.sparsity.magnitude", "gmp_from_config"),
}
METHOD_NAMES = tuple(_REGISTRY)
_TAKE_A_BUDGET = ("magnitude", "gmp")


def build_method(config, budget=None) -> SparsityMethod:
    """The sparsity method a :class:`~reference.config.TrainConfig` asks for.

    ``budget``: the ``{layer: sparsity}`` dict of the config's budget file,
    already read (:func:`reference.build.load_budget`), for the methods that
    take a budget (magnitude pruning and GMP).
    """
    if config.method not in _REGISTRY:
        raise ConfigError(f"unknown method {config.method!r}; expected one of: {', '.join(METHOD_NAMES)}")
    module_name, factory = _REGISTRY[config.method]
    if config.method in _TAKE_A_BUDGET:
        return getattr(import_module(module_name), factory)(config, budget)
    if budget is not None:
        raise ConfigError(
            f"method {config.method!r} takes no budget; budgets are for {' and '.join(_TAKE_A_BUDGET)}"
        )
    if config.method == "dense":
        return Dense()
    return getattr(import_module(module_name), factory)(config)
