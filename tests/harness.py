"""The op test harness: one :class:`OpCase` per op drives every generic check.

An ``OpCase`` says how to draw inputs for an op (shapes and geometries from
hypothesis, values from a seeded generator, float64) and gives an oracle: the
op's forward written from the textbook formula with ``autograd.numpy``. From
that the suite checks, for every op:

1. forward equals the oracle;
2. backward equals autograd's vector-Jacobian product of the oracle, for a
   random cotangent (never all-ones: a batch-norm backward fed ones is zero
   and proves nothing);
3. a central finite difference of the kernel's own forward along a random
   direction equals the backward's directional derivative (independent of the
   oracle);
4. asked for a drawn subset of the gradients (``needs_input_grad``, as the
   engine asks when some inputs need none), the backward returns None for the
   others and, for the wanted ones, exactly the arrays of a full backward.

Inputs are drawn away from kinks by construction (e.g. ``|x| >= 0.1`` for
ReLU), so the finite difference never straddles one; each op's kink
convention is pinned by its own test.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import autograd
import numpy as np
from hypothesis import strategies as st

Draw = Callable[[st.DataObject], tuple[tuple, dict]]


@dataclass(frozen=True)
class OpCase:
    """How to test one op.

    name: the kernel name (``<name>_forward`` / ``<name>_backward``).
    draw: ``draw(data) -> (args, static)``; ``args`` in input order (arrays,
        None for an absent optional input, or non-float inputs such as labels).
    oracle: ``oracle(*args, **static) -> y`` in ``autograd.numpy``.
    wrt: indices of ``args`` whose gradients are checked.
    label: a short name for the test id when one op has several cases.
    rtol, atol: float64 tolerances for forward and backward against the oracle.
    """

    name: str
    draw: Draw
    oracle: Callable[..., Any]
    wrt: tuple[int, ...]
    label: str = ""
    rtol: float = 1e-9
    atol: float = 1e-11
    tags: frozenset = field(default_factory=frozenset)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.label}" if self.label else self.name


def rng_from(data: st.DataObject) -> np.random.Generator:
    """A NumPy generator seeded by hypothesis (so failures shrink and replay)."""
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def away_from_zero(rng: np.random.Generator, shape, low: float = 0.1, high: float = 2.0) -> np.ndarray:
    """Values with ``low <= |x| <= high`` and random signs: no ReLU-style kink nearby."""
    return rng.uniform(low, high, size=shape) * rng.choice([-1.0, 1.0], size=shape)


def kernels(name: str, module=None):
    """The (forward, backward) pair of ``name`` in ``module`` (default: reference.ops)."""
    if module is None:
        import reference.ops as module
    return getattr(module, f"{name}_forward"), getattr(module, f"{name}_backward")


def check_forward(case: OpCase, data: st.DataObject) -> None:
    args, static = case.draw(data)
    forward, _ = kernels(case.name)
    y, _ = forward(*args, **static)
    expected = case.oracle(*args, **static)
    assert y.shape == np.shape(expected), f"shape {y.shape}, oracle {np.shape(expected)}"
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, expected, rtol=case.rtol, atol=case.atol)


def _oracle_vjp(case: OpCase, args: tuple, static: dict, i: int, dy: np.ndarray) -> np.ndarray:
    def f_i(xi):
        return case.oracle(*args[:i], xi, *args[i + 1 :], **static)

    vjp, _ = autograd.make_vjp(f_i)(args[i])
    return vjp(dy)


def check_backward(case: OpCase, data: st.DataObject) -> None:
    args, static = case.draw(data)
    forward, backward = kernels(case.name)
    y, cache = forward(*args, **static)
    dy = rng_from(data).standard_normal(np.shape(y))
    grads = backward(dy, cache)
    assert len(grads) == len(args), f"{len(grads)} gradients for {len(args)} inputs"
    for i in case.wrt:
        expected = _oracle_vjp(case, args, static, i, dy)
        assert grads[i] is not None, f"no gradient for input {i}"
        assert grads[i].shape == np.shape(args[i]), f"input {i}: grad shape {grads[i].shape}"
        np.testing.assert_allclose(grads[i], expected, rtol=case.rtol, atol=case.atol, err_msg=f"input {i}")
    check_skipped_gradients(case, data, args, static, dy, grads)


def check_skipped_gradients(case: OpCase, data: st.DataObject, args, static, dy, full_grads) -> None:
    """Ask for a drawn subset of the gradients: the others are None, the wanted ones unchanged.

    ``full_grads`` is the backward's answer when every gradient is wanted. The
    inputs outside ``case.wrt`` (labels, settings, absent options) are never wanted.
    """
    # the engine never records an op with no wanted gradient, so at least one is wanted
    wanted = data.draw(st.sets(st.sampled_from(case.wrt), min_size=1), label="wanted gradients")
    needs = tuple(i in wanted for i in range(len(args)))
    forward, backward = kernels(case.name)
    y, cache = forward(*args, **static, needs_input_grad=needs)
    grads = backward(dy, cache)
    assert len(grads) == len(args), f"{len(grads)} gradients for {len(args)} inputs"
    for i in case.wrt:
        if i in wanted:
            assert grads[i] is not None, f"input {i} was wanted, got no gradient (needs {needs})"
            np.testing.assert_array_equal(grads[i], full_grads[i], err_msg=f"input {i}, needs {needs}")
        else:
            assert grads[i] is None, f"input {i} was not wanted, got a gradient (needs {needs})"


def check_finite_difference(case: OpCase, data: st.DataObject, h: float = 1e-6) -> None:
    args, static = case.draw(data)
    forward, backward = kernels(case.name)
    rng = rng_from(data)
    y, cache = forward(*args, **static)
    dy = rng.standard_normal(np.shape(y))
    grads = backward(dy, cache)
    directions = {i: rng.standard_normal(np.shape(args[i])) for i in case.wrt}

    def phi(t: float) -> float:
        moved = list(args)
        for i, v in directions.items():
            moved[i] = args[i] + t * v
        out, _ = forward(*moved, **static)
        return float(np.sum(dy * out))

    numeric = (phi(h) - phi(-h)) / (2 * h)
    analytic = sum(float(np.sum(grads[i] * v)) for i, v in directions.items())
    scale = max(1.0, abs(numeric), abs(analytic))
    assert abs(numeric - analytic) <= 1e-5 * scale, f"finite difference {numeric} vs backward {analytic}"


def partial_oracle(fn: Callable, **fixed) -> Callable:
    """An oracle with some keyword settings bound (for cases sharing one formula)."""
    return functools.partial(fn, **fixed)
