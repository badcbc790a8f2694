"""SGD: hand-computed updates, parameter groups, checkpoints, validation, and a scalar oracle."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.autodiff import Tensor
from reference.errors import ConfigError
from reference.optim import SGD


def param(*values, dtype=np.float64):
    return Tensor(np.array(values, dtype=dtype), requires_grad=True)


def run_steps(opt, p, grads):
    for g in grads:
        p.grad = np.array(g, dtype=np.float64)
        opt.step()


# ------------------------------------------------------------ hand-computed updates
def test_plain_sgd_one_step():
    p = param(1.0, -2.0)
    opt = SGD([p], lr=0.1)
    p.grad = np.array([0.5, 0.25])
    opt.step()
    np.testing.assert_allclose(p.data, [0.95, -2.025], rtol=0, atol=1e-15)


def test_momentum_two_steps():
    # buf1 = 0.5, p1 = 1 - 0.1*0.5 = 0.95; buf2 = 0.9*0.5 + 0.25 = 0.7, p2 = 0.95 - 0.07 = 0.88
    p = param(1.0)
    opt = SGD([p], lr=0.1, momentum=0.9)
    run_steps(opt, p, [[0.5]])
    np.testing.assert_allclose(p.data, [0.95], atol=1e-15)
    run_steps(opt, p, [[0.25]])
    np.testing.assert_allclose(p.data, [0.88], atol=1e-15)


def test_nesterov_two_steps():
    # step 1: buf = 0.5, d = 0.5 + 0.9*0.5 = 0.95, p = 1 - 0.095 = 0.905
    # step 2: buf = 0.45 + 0.25 = 0.7, d = 0.25 + 0.63 = 0.88, p = 0.905 - 0.088 = 0.817
    p = param(1.0)
    opt = SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    run_steps(opt, p, [[0.5]])
    np.testing.assert_allclose(p.data, [0.905], atol=1e-15)
    run_steps(opt, p, [[0.25]])
    np.testing.assert_allclose(p.data, [0.817], atol=1e-15)


def test_weight_decay_is_added_before_momentum():
    # step 1: g = 1 + 0.1*2 = 1.2, buf = 1.2, p = 2 - 0.12 = 1.88
    # step 2: g = 1 + 0.1*1.88 = 1.188, buf = 0.5*1.2 + 1.188 = 1.788, p = 1.88 - 0.1788 = 1.7012
    p = param(2.0)
    opt = SGD([p], lr=0.1, momentum=0.5, weight_decay=0.1)
    run_steps(opt, p, [[1.0]])
    np.testing.assert_allclose(p.data, [1.88], atol=1e-15)
    run_steps(opt, p, [[1.0]])
    np.testing.assert_allclose(p.data, [1.7012], atol=1e-14)


def test_weight_decay_without_momentum_moves_a_zero_gradient_parameter():
    p = param(3.0)
    opt = SGD([p], lr=0.5, weight_decay=0.2)
    run_steps(opt, p, [[0.0]])
    np.testing.assert_allclose(p.data, [3.0 - 0.5 * 0.2 * 3.0], atol=1e-15)


# ------------------------------------------------------------------ groups
def test_per_group_weight_decay_and_lr():
    a, b, c = param(1.0), param(1.0), param(1.0)
    opt = SGD(
        [
            {"params": [a], "name": "weights"},
            {"params": [b], "name": "bn", "weight_decay": 0.0},
            {"params": [c], "name": "thresholds", "weight_decay": 0.5, "lr": 0.01},
        ],
        lr=0.1,
        weight_decay=0.1,
    )
    for t in (a, b, c):
        t.grad = np.array([1.0])
    opt.step()
    np.testing.assert_allclose(a.data, [1.0 - 0.1 * (1.0 + 0.1)], atol=1e-15)
    np.testing.assert_allclose(b.data, [1.0 - 0.1 * 1.0], atol=1e-15)
    np.testing.assert_allclose(c.data, [1.0 - 0.01 * (1.0 + 0.5)], atol=1e-15)
    assert [g["name"] for g in opt.param_groups] == ["weights", "bn", "thresholds"]


def test_groups_get_default_names():
    opt = SGD([{"params": [param(1.0)]}, {"params": [param(2.0)]}], lr=0.1)
    assert [g["name"] for g in opt.param_groups] == ["group0", "group1"]


def test_params_with_none_grad_are_untouched_and_get_no_buffer():
    p, q = param(1.0, 2.0), param(3.0)
    opt = SGD([p, q], lr=0.1, momentum=0.9, weight_decay=0.1)
    p.grad = np.array([1.0, 1.0])
    opt.step()
    np.testing.assert_array_equal(q.data, [3.0])
    assert set(opt.state_dict()["momentum_buffers"]) == {"0.0"}
    # q's first real step starts its buffer at its gradient (equation (2)), not from zero history.
    p.grad, q.grad = None, np.array([0.5])
    opt.step()
    np.testing.assert_allclose(q.data, [3.0 - 0.1 * (0.5 + 0.1 * 3.0)], atol=1e-15)


def test_update_is_in_place_keeps_dtype_and_leaves_grad_alone():
    p = param(1.0, 2.0, dtype=np.float32)
    before = p.data
    opt = SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    grad = np.array([0.5, -0.5], dtype=np.float64)
    p.grad = grad
    opt.step()
    opt.step()
    assert p.data is before
    assert p.data.dtype == np.float32
    np.testing.assert_array_equal(grad, [0.5, -0.5])
    assert opt.state_dict()["momentum_buffers"]["0.0"].dtype == np.float32


def test_zero_grad_and_set_lr():
    p, q = param(1.0), param(2.0)
    opt = SGD([{"params": [p], "lr": 0.5}, {"params": [q]}], lr=0.1)
    p.grad, q.grad = np.array([1.0]), np.array([1.0])
    opt.zero_grad()
    assert p.grad is None and q.grad is None
    opt.set_lr(0.03)
    assert [g["lr"] for g in opt.param_groups] == [0.03, 0.03]
    with pytest.raises(ConfigError, match="-1"):
        opt.set_lr(-1)


def test_shape_mismatch_between_param_and_grad():
    p = param(1.0, 2.0)
    opt = SGD([p], lr=0.1)
    p.grad = np.ones(3)
    with pytest.raises(ConfigError, match=r"\(3,\)"):
        opt.step()


# ------------------------------------------------------------------ checkpoints
def _model(rng):
    return [Tensor(rng.standard_normal(shape), requires_grad=True) for shape in [(3, 2), (4,), ()]]


def _train(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()


def _make_opt(params):
    return SGD(
        [{"params": params[:2], "name": "w"}, {"params": params[2:], "name": "s", "weight_decay": 0.0}],
        lr=0.05,
        momentum=0.875,
        nesterov=True,
        weight_decay=1e-3,
    )


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(0)
    params = _model(rng)
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(5)]
    opt = _make_opt(params)
    _train(opt, params, grads[:3])
    opt.set_lr(0.02)
    state = opt.state_dict()
    saved = [p.data.copy() for p in params]
    _train(opt, params, grads[3:])
    # The snapshot does not alias the live buffers.
    assert not any(
        np.shares_memory(v, b) for v, b in zip(state["momentum_buffers"].values(), opt._buffers.values())
    )

    fresh = [Tensor(a.copy(), requires_grad=True) for a in saved]
    opt2 = _make_opt(fresh)
    opt2.load_state_dict(state)
    assert [g["lr"] for g in opt2.param_groups] == [0.02, 0.02]
    _train(opt2, fresh, grads[3:])
    for p, q in zip(params, fresh):
        np.testing.assert_array_equal(p.data, q.data)


def test_state_dict_layout():
    p, q = param(1.0, 2.0), param(3.0)
    opt = SGD([{"params": [p, q], "name": "all"}], lr=0.1, momentum=0.9)
    p.grad, q.grad = np.ones(2), np.ones(1)
    opt.step()
    state = opt.state_dict()
    assert state["groups"] == [
        {"name": "all", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0, "num_params": 2}
    ]
    assert sorted(state["momentum_buffers"]) == ["0.0", "0.1"]


def _trained_state():
    rng = np.random.default_rng(1)
    params = _model(rng)
    opt = _make_opt(params)
    _train(opt, params, [[rng.standard_normal(p.shape) for p in params]])
    return opt.state_dict()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s["groups"].pop(), "1 parameter groups"),
        (lambda s: s["groups"][0].update(num_params=3), "3 parameters"),
        (lambda s: s["groups"][1].update(name="bn"), "'bn'"),
        (lambda s: s["groups"][0].update(momentum=1.5), "1.5"),
        (lambda s: s["momentum_buffers"].update({"0.0": np.zeros((2, 3))}), r"\(2, 3\)"),
        (lambda s: s["momentum_buffers"].update({"0.7": np.zeros(1)}), "'0.7'"),
        (lambda s: s["momentum_buffers"].update({"w.0": np.zeros(1)}), "'w.0'"),
        (lambda s: s.pop("momentum_buffers"), "momentum_buffers"),
    ],
)
def test_load_state_dict_rejects_mismatches_and_changes_nothing(corrupt, message):
    state = _trained_state()
    corrupt(state)
    params = _model(np.random.default_rng(2))
    opt = _make_opt(params)
    with pytest.raises(ConfigError, match=message):
        opt.load_state_dict(state)
    assert opt._buffers == {}
    assert [g["momentum"] for g in opt.param_groups] == [0.875, 0.875]


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"lr": -0.1}, "-0.1"),
        ({"lr": float("nan")}, "nan"),
        ({"lr": 0.1, "momentum": 1.0}, r"\[0, 1\), got 1.0"),
        ({"lr": 0.1, "momentum": -0.1}, "-0.1"),
        ({"lr": 0.1, "weight_decay": -1e-4}, "-0.0001"),
        ({"lr": 0.1, "nesterov": True}, "nesterov=True needs momentum > 0"),
        ({"lr": 0.1, "momentum": 0.9, "nesterov": 1}, "True or False, got 1"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SGD([param(1.0)], **kwargs)


def test_bad_parameter_lists():
    p = param(1.0)
    with pytest.raises(ConfigError, match="non-empty"):
        SGD([], lr=0.1)
    with pytest.raises(ConfigError, match="not a mix"):
        SGD([p, {"params": [param(2.0)]}], lr=0.1)
    with pytest.raises(ConfigError, match="'betas'"):
        SGD([{"params": [p], "betas": (0.9, 0.99)}], lr=0.1)
    with pytest.raises(ConfigError, match="appears twice"):
        SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ConfigError, match="ndarray"):
        SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(ConfigError, match="group 'bn'.*weight_decay must be >= 0"):
        SGD([{"params": [p], "name": "bn", "weight_decay": -1.0}], lr=0.1)
    with pytest.raises(ConfigError, match="no parameters"):
        SGD([{"params": []}], lr=0.1)


# ------------------------------------------------------------------ scalar oracle
def scalar_sgd(p0, grads, lr, momentum, nesterov, wd):
    """The update written out for one number, in Python floats."""
    p, buf = p0, None
    for grad in grads:
        g = grad + wd * p
        if momentum:
            buf = g if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


finite = st.floats(-10, 10, allow_nan=False)


@given(
    lr=st.floats(1e-4, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.875, 0.9, 0.99]),
    nesterov=st.booleans(),
    wd=st.sampled_from([0.0, 1e-4, 5e-4, 0.1]),
    p0=st.lists(finite, min_size=1, max_size=4),
    data=st.data(),
)
def test_matches_scalar_reimplementation(lr, momentum, nesterov, wd, p0, data):
    nesterov = nesterov and momentum > 0
    n_steps = data.draw(st.integers(1, 5))
    grads = data.draw(
        st.lists(st.lists(finite, min_size=len(p0), max_size=len(p0)), min_size=n_steps, max_size=n_steps)
    )
    p = Tensor(np.array(p0), requires_grad=True)
    opt = SGD([p], lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for g in grads:
        p.grad = np.array(g)
        opt.step()
    expected = [scalar_sgd(x, [g[i] for g in grads], lr, momentum, nesterov, wd) for i, x in enumerate(p0)]
    np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-12)
    assert all(math.isfinite(v) for v in p.data)


def test_zero_dimensional_parameter_follows_the_same_trajectory_as_a_vector():
    """A 0-d parameter (a per-layer threshold) must keep a real momentum buffer."""
    scalar = Tensor(np.array(0.5, dtype=np.float32), requires_grad=True)
    vector = Tensor(np.array([0.5], dtype=np.float32), requires_grad=True)
    opts = [SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01) for p in (scalar, vector)]
    for step in range(4):
        for p, opt in zip((scalar, vector), opts):
            p.grad = np.full(p.shape, 0.25 * (step + 1), dtype=np.float32)
            opt.step()
        assert scalar.data.shape == () and float(scalar.data) == float(vector.data[0])
    state = opts[0].state_dict()
    assert all(hasattr(buf, "shape") for buf in state["momentum_buffers"].values())
