"""SCP (soft channel pruning) and slimming: masks, running statistics, regularizer, exact slimming, training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reference import functional as F
from reference.accounting import profile, totals
from reference.autodiff import Tensor, no_grad
from reference.config import TrainConfig
from reference.errors import CheckpointError, ConfigError
from reference.models import build_model
from reference.models.common import ChannelGroup
from reference.nn import BatchNorm2d, Conv2d, Module, ReLU, Sequential
from reference.sparsity import StepContext, build_method
from reference.sparsity.channel_pruning import SCP, ChannelMask, masked_batch_norms
from reference.sparsity.slimming import slim, slim_to_state
from tests.resume import check_resume


def _ctx(seed: int = 0, epoch: int = 0) -> StepContext:
    return StepContext(epoch, 0, 1, 1, np.random.default_rng([seed, epoch, 1]))


def _masked_bn(channels: int = 4, dtype=np.float64, **settings) -> BatchNorm2d:
    bn = BatchNorm2d(channels, dtype=dtype)
    defaults = {"k": 20.0, "c0": 0.95, "t": 0.5, "eps": 0.05}
    bn.channel_mask = ChannelMask(channels, **{**defaults, **settings})
    return bn


# ------------------------------------------------------------------- the mask


def test_more_negative_beta_prunes_the_channel_in_evaluation():
    bn = _masked_bn(4)
    bn.weight.data[:] = 1.0
    bn.bias.data[:] = [0.5, 0.0, -0.5, -3.0]  # P = Phi((0.05 - beta) / 1): 0.33, 0.52, 0.71, 0.999
    kept = bn.channel_mask.kept(bn.weight, bn.bias)
    assert kept.tolist() == [True, True, True, False]

    # the evaluation output is BN(x) on kept channels and exactly 0 on the pruned one
    x = Tensor(np.random.default_rng(0).normal(size=(3, 4, 2, 2)))
    bn.eval()
    with no_grad():
        y = bn(x).numpy()
        plain = F.batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=False).numpy()
    np.testing.assert_array_equal(y[:, :3], plain[:, :3])
    assert not y[:, 3].any()

    # in training (same noise everywhere) the soft mask falls as beta falls
    bn.train()
    bn.channel_mask.set_noise(np.zeros(4))
    m = bn.channel_mask(bn.weight, bn.bias).numpy()
    assert np.all(np.diff(m) < 0) and np.all((m >= 0) & (m <= 1))


def test_running_stats_of_channels_the_sample_prunes_do_not_move():
    bn = _masked_bn(4)
    bn.bias.data[:] = 0.5  # every channel clearly on without noise ...
    bn.channel_mask.set_noise(np.array([0.0, -200.0, 0.0, -200.0]))  # ... but the draw prunes 1 and 3
    x = Tensor(np.random.default_rng(1).normal(2.0, 3.0, size=(8, 4, 3, 3)))
    mean0, var0 = bn.running_mean.copy(), bn.running_var.copy()
    y = bn(x)
    assert np.abs(y.numpy()[:, [1, 3]]).max() < 1e-100
    np.testing.assert_array_equal(bn.running_mean[[1, 3]], mean0[[1, 3]])
    np.testing.assert_array_equal(bn.running_var[[1, 3]], var0[[1, 3]])
    assert np.all(bn.running_mean[[0, 2]] != mean0[[0, 2]]) and np.all(bn.running_var[[0, 2]] != var0[[0, 2]])
    assert int(bn.num_batches_tracked) == 1


def test_training_without_noise_is_refused():
    bn = _masked_bn(2)
    with pytest.raises(ConfigError, match="no noise.*before_step"):
        bn(Tensor(np.ones((2, 2, 2, 2))))


def test_masked_batch_norm_gradient_matches_finite_differences():
    """d/dgamma and d/dbeta of sum(r * BN(x) m) in training, through the BN and the mask."""
    rng = np.random.default_rng(2)
    bn = _masked_bn(3, k=4.0, t=1.0)
    bn.weight.data[:] = [0.7, -1.2, 0.4]
    bn.bias.data[:] = [0.3, -0.2, 0.1]
    bn.channel_mask.set_noise(rng.logistic(size=3))
    x = rng.normal(size=(4, 3, 2, 2))
    r = rng.normal(size=(4, 3, 2, 2))

    def loss() -> float:
        with no_grad():
            return float((bn(Tensor(x)).numpy() * r).sum())

    out = bn(Tensor(x))
    F.sum(F.mul(out, r)).backward()
    for p in (bn.weight, bn.bias):
        fd = np.zeros(3)
        for c in range(3):
            p.data[c] += 1e-6
            up = loss()
            p.data[c] -= 2e-6
            down = loss()
            p.data[c] += 1e-6
            fd[c] = (up - down) / 2e-6
        np.testing.assert_allclose(p.grad, fd, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------- the method's hooks


def test_attach_masks_the_listed_batch_norms_and_keeps_the_state_dict():
    model = build_model("resnet20", width=0.5)
    keys = list(model.state_dict())
    SCP().attach(model)
    names = [n for n, _ in masked_batch_norms(model)]
    assert names == [f"layer{s}.{b}.bn1" for s in (1, 2, 3) for b in range(3)]  # residual stream unmasked
    assert list(model.state_dict()) == keys

    net = build_model("mobilenet_v1", width=0.25)
    SCP().attach(net)
    assert len(masked_batch_norms(net)) == 1 + 2 * 13  # every BN


def test_regularization_by_hand_and_its_gradient():
    rng = np.random.default_rng(3)
    model = build_model("digits_cnn", width=0.5, dtype=np.float64)
    method = SCP(lam=0.01, s=2.0)
    method.attach(model)
    bns = [model.bn1, model.bn2, model.bn3]
    for bn in bns:
        bn.weight.data[:] = rng.normal(size=bn.num_features)
        bn.bias.data[:] = rng.normal(size=bn.num_features)
    expected = 0.01 * sum(bn.bias.data.sum() + 2.0 * np.abs(bn.weight.data).sum() for bn in bns)
    reg = method.regularization(model)
    assert reg.item() == pytest.approx(expected, rel=1e-12)
    reg.backward()
    for bn in bns:
        np.testing.assert_allclose(bn.bias.grad, np.full(bn.num_features, 0.01))
        np.testing.assert_allclose(bn.weight.grad, 0.02 * np.sign(bn.weight.data))
    assert model.conv1.weight.grad is None
    assert SCP(lam=0.0).regularization(model) is None


def test_no_weight_decay_on_the_masked_batch_norms_shift():
    model = build_model("resnet20", width=0.5)
    method = SCP()
    method.attach(model)
    groups = {g["name"]: g for g in method.param_groups(model, TrainConfig(weight_decay=1e-3))}
    assert groups["weights"]["weight_decay"] == 1e-3 and groups["scp_beta"]["weight_decay"] == 0.0
    shifts = {id(p) for p in groups["scp_beta"]["params"]}
    assert shifts == {id(bn.bias) for _, bn in masked_batch_norms(model)}
    assert id(model.layer1[0].bn1.weight) in {id(p) for p in groups["weights"]["params"]}  # gamma decays
    assert id(model.bn1.bias) not in shifts  # the residual stream trains as dense
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_noise_comes_from_the_step_context():
    model = build_model("digits_cnn", width=0.5)
    method = SCP()
    method.attach(model)
    method.before_step(model, _ctx(epoch=4))
    first = [bn.channel_mask.noise.copy() for _, bn in masked_batch_norms(model)]
    method.before_step(model, _ctx(epoch=4))
    assert all(
        np.array_equal(a, bn.channel_mask.noise) for a, (_, bn) in zip(first, masked_batch_norms(model))
    )
    assert first[0].shape == (8,) and first[0].dtype == np.float32
    method.before_step(model, _ctx(epoch=5))
    assert not np.array_equal(first[0], model.bn1.channel_mask.noise)


def test_bad_settings_and_models_without_prunable_channels():
    with pytest.raises(ConfigError, match="scp_k"):
        TrainConfig(method="scp", scp_k=0.0)
    with pytest.raises(ConfigError, match="c0"):
        SCP(c0=1.0)
    with pytest.raises(ConfigError, match="temperature"):
        SCP(t=-1.0)
    plain = Sequential(Conv2d(1, 4, 3), BatchNorm2d(4), ReLU())
    with pytest.raises(ConfigError, match="no channel_groups"):
        SCP().attach(plain)

    class Empty(Module):
        def channel_groups(self):
            return []

    with pytest.raises(ConfigError, match="no prunable channels"):
        SCP().attach(Empty())
    assert isinstance(build_method(TrainConfig(method="scp")), SCP)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v1"])
def test_a_training_step_through_the_hooks_reaches_every_mask(name):
    kwargs, shape = CASES[name]  # defined with the slimming tests below
    model = build_model(name, num_classes=4, **kwargs)
    method = SCP(lam=1e-3, input_size=shape[1:])
    method.attach(model)
    method.before_step(model, _ctx())
    x = Tensor(np.random.default_rng(8).normal(size=(2, *shape)).astype(np.float32))
    loss = F.softmax_cross_entropy(model(x), np.array([0, 3])) + method.regularization(model)
    loss.backward()
    for _, bn in masked_batch_norms(model):
        assert bn.weight.grad is not None and bn.bias.grad is not None
    stats = method.end_epoch(model, _ctx())
    assert stats["masked_macs"] == stats["dense_macs"] == totals(profile(model, shape)).dense_macs
    assert stats["sparsity"] == 0.0 and stats["channels_kept"] == stats["channels_total"]
    assert masked_batch_norms(model)  # end_epoch slims a copy, not the model


def test_a_model_listing_a_wrong_group_is_refused():
    class Wrong(Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.conv2 = Conv2d(1, 4, 3), BatchNorm2d(4), Conv2d(5, 2, 3)

        def channel_groups(self):
            return [ChannelGroup(self.conv1, self.bn1, (self.conv2,))]

    with pytest.raises(ConfigError, match="channel group 'bn1'.*4 inputs"):
        SCP().attach(Wrong())


# ---------------------------------------------------------------- slimming

CASES = {
    "digits_cnn": ({}, (1, 8, 8)),
    "resnet20": ({"width": 0.5}, (3, 8, 8)),
    "resnet50": ({"width": 0.125}, (3, 32, 32)),
    "mobilenet_v1": ({"width": 0.25}, (3, 32, 32)),
}


def _pruned_model(name: str, seed: int = 0, dtype=np.float64, all_off: str | None = None):
    """``name`` with SCP masks, random BN statistics and about 40 % of the masked channels forced off."""
    kwargs, shape = CASES[name]
    model = build_model(name, rng=np.random.default_rng(seed), dtype=dtype, **kwargs)
    SCP().attach(model)
    rng = np.random.default_rng(seed + 1)
    for mod_name, bn in model.named_modules():
        if not isinstance(bn, BatchNorm2d):
            continue
        c = bn.num_features
        bn.running_mean[:] = rng.normal(0, 0.2, c)
        bn.running_var[:] = rng.uniform(0.5, 2.0, c)
        bn.weight.data[:] = rng.choice([-1, 1], c) * rng.uniform(0.5, 1.5, c)
        bn.bias.data[:] = rng.uniform(0.1, 0.5, c)  # P < 0.5: on
        if bn.channel_mask is not None:
            off = rng.random(c) < 0.4
            if mod_name == all_off:
                off[:] = True
            bn.bias.data[off] = -10.0  # P = 1: off
    return model.eval(), shape


@pytest.mark.parametrize("name", list(CASES))
def test_slim_gives_the_masked_models_outputs_with_fewer_channels_and_macs(name):
    all_off = {"resnet20": "layer2.1.bn1", "mobilenet_v1": "features.4.pw_bn"}.get(name)
    model, shape = _pruned_model(name, all_off=all_off)
    x = Tensor(np.random.default_rng(9).normal(size=(3, *shape)))
    with no_grad():
        before = model(x).numpy()
    dense_state = model.state_dict()
    masked = totals(profile(model, shape))

    summary = slim(model)
    with no_grad():
        after = model(x).numpy()
    np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-9 * np.abs(before).max())

    assert not masked_batch_norms(model)
    assert summary["channels_after"] < summary["channels_before"]
    state = model.state_dict()
    assert list(state) == list(dense_state)
    smaller = [k for k in state if state[k].shape != dense_state[k].shape]
    assert smaller and all(state[k].size < dense_state[k].size for k in smaller)
    slimmed = totals(profile(model, shape))
    assert slimmed.dense_macs < masked.dense_macs and slimmed.weights < masked.weights
    if all_off is not None:
        assert summary["groups"][all_off]["after"] == 1
    if name == "mobilenet_v1":  # constants of pointwise channels switched off were folded
        assert sum(g["folded"] for g in summary["groups"].values()) > 0
    # the slimmed model still trains: shapes and attributes agree
    model.train()
    out = model(Tensor(np.asarray(x.numpy())))
    F.sum(out).backward()


def test_slim_in_float32_and_the_hand_count_of_one_layer():
    model, shape = _pruned_model("digits_cnn", seed=4, dtype=np.float32)
    kept = {n: int(bn.channel_mask.kept(bn.weight, bn.bias).sum()) for n, bn in masked_batch_norms(model)}
    x = Tensor(np.random.default_rng(5).normal(size=(4, *shape)).astype(np.float32))
    with no_grad():
        before = model(x).numpy()
    slim(model)
    with no_grad():
        after = model(x).numpy()
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    k1, k2, k3 = kept["bn1"], kept["bn2"], kept["bn3"]
    assert model.conv2.weight.shape == (k2, k1, 3, 3) and model.fc.weight.shape == (10, k3)
    assert (model.conv2.in_channels, model.conv2.out_channels, model.bn2.num_features) == (k1, k2, k2)
    rows = {r.name: r for r in profile(model, shape)}
    assert rows["conv2"].dense_macs == k2 * k1 * 3 * 3 * 4 * 4  # C_out * C_in * kh * kw * H_out * W_out
    assert rows["avgpool"].dense_macs == k3 * 4 * 4 and rows["fc"].dense_macs == k3 * 10


def test_slimmed_depthwise_conv_keeps_groups_equal_to_channels():
    model, _ = _pruned_model("mobilenet_v1")
    slim(model)
    for block in list(model.features)[1:]:
        c = block.dw.out_channels
        assert block.dw.in_channels == block.dw.groups == c == block.dw_bn.num_features
        assert block.dw.weight.shape == (c, 1, 3, 3) and block.pw.in_channels == c


@pytest.mark.parametrize("name", ["digits_cnn", "mobilenet_v1"])
def test_slim_to_state_rebuilds_the_slimmed_network(name, tmp_path):
    model, shape = _pruned_model(name)
    slim(model)
    path = tmp_path / "slim.npz"
    np.savez(path, **model.state_dict())
    kwargs = CASES[name][0]
    fresh = build_model(name, dtype=np.float64, **kwargs)
    SCP().attach(fresh)  # a model built for the run, masks included
    with np.load(path) as data:
        summary = slim_to_state(fresh, dict(data))
    assert summary["channels_after"] < summary["channels_before"] and not masked_batch_norms(fresh)
    x = Tensor(np.random.default_rng(6).normal(size=(2, *shape)))
    fresh.eval()
    with no_grad():
        np.testing.assert_array_equal(fresh(x).numpy(), model(x).numpy())
    assert totals(profile(fresh, shape)).dense_macs == totals(profile(model, shape)).dense_macs

    wider = build_model(name, dtype=np.float64, **kwargs)
    state = wider.state_dict()
    with pytest.raises(CheckpointError, match="does not come from this model"):
        slim_to_state(build_model(name, dtype=np.float64, width=kwargs.get("width", 1.0) / 2), state)
    del state[next(iter(state))]
    with pytest.raises(CheckpointError):
        slim_to_state(wider, state)


def test_a_model_without_masks_slims_to_itself():
    model = build_model("digits_cnn", width=0.5)
    summary = slim(model)
    assert summary["channels_after"] == summary["channels_before"] == 8 + 16 + 32


# ------------------------------------------------------------------ training


def _scp_run(tmp_path, name: str, **changes) -> TrainConfig:
    settings = {
        "method": "scp", "scp_lambda": 0.01, "epochs": 4, "width": 0.5, "batch_size": 32, "lr": 0.05,
        "schedule": "step", "milestones": (3,), "progress": False, "run_dir": str(tmp_path / name),
    }  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)


def test_short_scp_run_prunes_logs_channels_and_resumes_bit_identically(tmp_path):
    full, _, _ = check_resume(lambda run: _scp_run(tmp_path, run), tmp_path, stop_after=3)
    rows = [json.loads(line) for line in (tmp_path / "full" / "layers.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    last = rows[-1]
    assert set(last["layers"]) == {"bn1", "bn2", "bn3"}
    assert last["channels_total"] == 8 + 16 + 32
    # slimming keeps one channel of a group whose channels are all off
    assert last["channels_kept"] == sum(max(v["kept"], 1) for v in last["layers"].values())
    assert last["channels_kept"] < last["channels_total"]  # lambda = 0.01 prunes within 4 epochs
    assert 0 < last["masked_macs"] < last["dense_macs"] == totals(profile(full.model, (1, 8, 8))).dense_macs
    assert 0 < last["sparsity"] == full.history[-1]["sparsity"]
    assert full.metrics["test_acc"] > 0.85

    # the finished run slims to a smaller network with the same predictions
    model = full.model.eval()
    x = Tensor(np.random.default_rng(7).normal(size=(16, 1, 8, 8)).astype(np.float32))
    with no_grad():
        before = model(x).numpy()
    slim(model)
    with no_grad():
        np.testing.assert_allclose(model(x).numpy(), before, rtol=1e-4, atol=1e-5)
