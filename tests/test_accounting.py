"""Weights and MACs: the golden totals of METHODS.md section 6, a hand count, sparse costs."""

from __future__ import annotations

import numpy as np
import pytest

from reference.accounting import LayerCost, format_table, profile, summarize, summarize_model, totals
from reference.autodiff import Tensor
from reference.errors import ConfigError, ShapeError
from reference.models import MODEL_NAMES, build_model, default_input_shape
from reference.nn import BatchNorm2d, Conv2d, GlobalAvgPool2d, Linear, MaxPool2d, ReLU, Sequential


def test_resnet50_golden_totals_at_224():
    model = build_model("resnet50", num_classes=1000)
    rows = profile(model, (3, 224, 224))
    t = totals(rows, model)
    assert t.weights == 25_502_912
    assert t.parameters == 25_557_032
    assert t.pool_macs == 100_352
    assert t.dense_macs == 4_089_284_608
    assert t.dense_macs_without_pool == 4_089_284_608 - 100_352
    assert t.sparse_macs == t.dense_macs and t.nonzeros == t.weights
    assert len([r for r in rows if r.kind == "conv"]) == 53
    assert [r.name for r in rows[:2]] == ["conv1", "layer1.0.conv1"]
    assert rows[0].output_shape == (64, 112, 112) and rows[0].dense_macs == 64 * 3 * 49 * 112 * 112
    assert [r.name for r in rows[-2:]] == ["avgpool", "fc"]
    assert rows[-2].output_shape == (2048,) and rows[-1].dense_macs == 2048 * 1000


def test_mobilenet_v1_golden_totals_at_224():
    model = build_model("mobilenet_v1", num_classes=1000)
    rows = profile(model, (1, 3, 224, 224))  # a batch dimension is accepted; counts stay per image
    t = totals(rows, model)
    assert t.weights == 4_209_088
    assert t.dense_macs_without_pool == 568_740_352
    assert t.dense_macs == 568_790_528
    assert t.pool_macs == 1024 * 7 * 7
    assert [r.kind for r in rows].count("dwconv") == 13
    first_dw = rows[1]
    assert first_dw.name == "features.1.dw" and first_dw.weight_shape == (32, 1, 3, 3)
    assert first_dw.dense_macs == 32 * 1 * 9 * 112 * 112


def test_a_small_network_counted_by_hand():
    rng = np.random.default_rng(0)
    model = Sequential(
        Conv2d(2, 4, 3, stride=2, padding=1, rng=rng),  # 6x6 -> 3x3: 4*2*9 = 72 weights, 72*9 = 648 MACs
        BatchNorm2d(4),
        ReLU(),
        Conv2d(4, 4, 3, padding=1, groups=4, rng=rng),  # depthwise, 3x3: 36 weights, 36*9 = 324 MACs
        MaxPool2d(2, stride=1),  # 3x3 -> 2x2, not counted
        GlobalAvgPool2d(),  # 4*2*2 = 16 MACs
        Linear(4, 3, rng=rng),  # 12 weights, 12 MACs
    )
    rows = profile(model, (2, 6, 6))
    assert rows == [
        LayerCost("0", "conv", (4, 2, 3, 3), 72, 72, (4, 3, 3), 648, 648),
        LayerCost("3", "dwconv", (4, 1, 3, 3), 36, 36, (4, 3, 3), 324, 324),
        LayerCost("5", "pool", None, 0, 0, (4,), 16, 16),
        LayerCost("6", "fc", (3, 4), 12, 12, (3,), 12, 12),
    ]
    t = totals(rows, model)
    assert (t.weights, t.dense_macs, t.pool_macs) == (120, 1000, 16)
    assert t.parameters == 120 + 2 * 4 + 3  # BN affine and the fc bias


def test_cifar_resnet20_counted_by_hand():
    # stem 3*16*9 at 32x32; stage 1: six 16x16x3x3 convs at 32x32; stage 2 (16x16): 16->32 conv,
    # the 16->32 projection and five 32x32x3x3 convs; stage 3 (8x8) likewise at 64; pool 64*8*8; fc 64*10
    weights = [432, 6 * 2304, 4608 + 512 + 5 * 9216, 18432 + 2048 + 5 * 36864, 640]
    macs = [432 * 1024, 6 * 2304 * 1024, (4608 + 512 + 5 * 9216) * 256, (18432 + 2048 + 5 * 36864) * 64]
    rows = profile(build_model("resnet20"), (3, 32, 32))
    t = totals(rows)
    assert t.weights == sum(weights) == 270_896
    assert t.dense_macs == sum(macs) + 64 * 64 + 640 == 40_817_280


def test_sparse_macs_are_dense_macs_times_density():
    model = build_model("resnet20")
    rng = np.random.default_rng(0)
    for layer in (model.conv1, model.layer2[0].downsample[0], model.layer3[2].conv2, model.fc):
        w = layer.weight.data
        w[rng.random(w.shape) < 0.7] = 0.0
    rows = profile(model, (3, 32, 32))
    for r in rows:
        assert (
            r.sparse_macs * r.params == r.dense_macs * r.nonzeros
            if r.params
            else r.sparse_macs == r.dense_macs
        )
        assert r.sparse_macs == pytest.approx(r.dense_macs * r.density)
    by_name = {r.name: r for r in rows}
    assert by_name["conv1"].nonzeros == np.count_nonzero(model.conv1.weight.data) < 432
    assert by_name["layer1.0.conv1"].density == 1.0
    assert by_name["fc"].sparse_macs == np.count_nonzero(model.fc.weight.data)
    t = totals(rows, model)
    assert t.nonzeros < t.weights and t.sparse_macs < t.dense_macs
    assert t.sparsity == pytest.approx(1 - t.nonzeros / t.weights)
    assert t.compression == pytest.approx(t.weights / t.nonzeros)


def test_nonzeros_come_from_the_effective_weight():
    class MaskedConv(Conv2d):
        def effective_weight(self):
            mask = np.zeros_like(self.weight.data)
            mask[: self.out_channels // 2] = 1.0
            return Tensor(self.weight.data * mask)

    model = Sequential(MaskedConv(3, 8, 3, padding=1), GlobalAvgPool2d())
    conv = profile(model, (3, 5, 5))[0]
    assert conv.params == 8 * 3 * 9 and conv.nonzeros == 4 * 3 * 9
    assert conv.sparse_macs == conv.dense_macs // 2 == 4 * 3 * 9 * 25
    assert np.count_nonzero(model[0].weight.data) == conv.params  # the latent weight is untouched


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_profiles_at_its_usual_input(name):
    model = build_model(name, num_classes=10, width=0.25 if name in ("resnet50", "mobilenet_v1") else 1.0)
    rows = profile(model, default_input_shape(name))
    assert rows[-1].kind == "fc" and rows[-1].output_shape == (10,)
    assert sum(r.kind == "pool" for r in rows) == 1
    assert totals(rows).weights == sum(
        m.weight.size for m in model.modules() if isinstance(m, (Conv2d, Linear))
    )


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v1", "resnet20", "digits_cnn"])
def test_traced_shapes_match_a_real_forward(name):
    model = build_model(name, width=0.25 if name in ("resnet50", "mobilenet_v1") else 1.0)
    seen: dict[str, tuple] = {}
    for layer_name, layer in model.named_modules():
        if isinstance(layer, (Conv2d, Linear, GlobalAvgPool2d)):

            def record(x, _layer=layer, _name=layer_name):
                out = type(_layer).forward(_layer, x)
                seen[_name] = out.shape[1:]
                return out

            layer.forward = record  # an instance attribute shadows the class's forward
    c = default_input_shape(name)[0]
    model(np.zeros((2, c, 19, 17), dtype=np.float32))
    rows = profile(model, (c, 19, 17))
    assert {r.name: r.output_shape for r in rows} == seen


def test_profile_rejects_inputs_that_do_not_fit():
    model = build_model("resnet20")
    with pytest.raises(ShapeError, match=r"expected input of shape \(N, 3, H, W\)"):
        profile(model, (1, 32, 32))
    with pytest.raises(ShapeError, match="expected input_shape"):
        profile(model, (32, 32))


def test_format_table_has_aligned_columns_separators_and_a_totals_row():
    model = build_model("mobilenet_v1", num_classes=1000)
    text = format_table(profile(model, (3, 224, 224)))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["layer", "kind"]
    assert lines[-1].startswith("total") and "4,209,088" in lines[-1] and "568,790,528" in lines[-1]
    assert "1,048,576" in text and "features.13.pw" in text
    # the last column is right-aligned numbers, so every line ends at the same column
    assert len({len(line) for line in lines}) == 1


def test_summarize_reports_the_golden_totals():
    text = summarize("resnet50")
    assert text.startswith("resnet50: input 3x224x224, 1000 classes")
    for number in ("25,502,912", "25,557,032", "4,089,284,608", "100,352", "4,089,184,256"):
        assert number in text
    small = summarize("digits_cnn")
    assert "input 1x8x8, 10 classes" in small and "23,824" in small
    custom = summarize("resnet20", input_size=16, num_classes=100)
    assert "input 3x16x16, 100 classes" in custom
    with pytest.raises(ConfigError, match="unknown model"):
        summarize("vgg16")


def test_summarize_model_reports_sparsity_and_compression():
    model = build_model("digits_cnn")
    model.conv3.weight.data[:32] = 0.0  # half of conv3: 9,216 of 23,824 weights
    text = summarize_model(model, (1, 8, 8))
    assert "14,608 nonzero" in text and "38.68%" in text and "1.63x" in text
