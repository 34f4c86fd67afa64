"""models.projection against torch's own modules: the same results, computed the other way round."""

import pytest
import torch

from engine_helpers import deploy_model, tiny_config
from transformers.models.longt5.modeling_longt5 import LongT5LayerNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

from models import projection
from models.projection import SMALL_WEIGHTS, feed_forward, layer_norm, project


@pytest.fixture
def choices(monkeypatch):
    """An empty cache of measured choices, restored afterwards."""
    monkeypatch.setattr(projection, "CHOICES", {})
    return projection.CHOICES


@pytest.mark.parametrize("rows", [1, 2, 5, 33])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_project_equals_linear_both_ways(rows, bias, transposed, monkeypatch):
    monkeypatch.setattr(projection, "uses_transposed", lambda weight, n: transposed)
    torch.manual_seed(rows)
    layer = torch.nn.Linear(256, 1024, bias=bias)
    x = torch.randn(rows, 3, 256)  # leading dims are kept
    out = project(layer, x)
    assert out.shape == (rows, 3, 1024) and out.is_contiguous()
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    if transposed and rows == 1:  # one row is the first row of a 2-row product
        single = x[:1, :1]
        assert torch.equal(project(layer, single), project(layer, torch.cat([single, single], dim=1))[:, :1])


def test_the_choice_is_measured_once_per_shape_rows_and_threads(choices, monkeypatch):
    measured = []

    def fake_faster(first, second, cold=True):
        measured.append(cold)
        return len(measured) % 2 == 1  # alternate answers: each key keeps its first

    monkeypatch.setattr(projection, "_faster", fake_faster)
    layer = torch.nn.Linear(256, 1024, bias=False)  # SMALL_WEIGHTS: the smallest that is measured
    for _ in range(3):
        project(layer, torch.randn(1, 256))
        project(layer, torch.randn(2, 256))
    assert measured == [True, True]  # two keys, each measured once, on cold weights
    assert choices == {("project", (1024, 256), torch.float32, 1, torch.get_num_threads()): True,
                       ("project", (1024, 256), torch.float32, 2, torch.get_num_threads()): False}


def test_a_real_measurement_gives_a_choice_and_a_correct_result(choices):
    layer = torch.nn.Linear(512, 1024, bias=True)
    x = torch.randn(3, 512)
    torch.testing.assert_close(project(layer, x), layer(x), rtol=1e-5, atol=1e-5)
    assert list(choices.values()) in ([True], [False])


def test_small_weights_many_rows_and_other_devices_are_not_measured(choices):
    small = torch.nn.Linear(48, 80)
    assert small.weight.numel() < SMALL_WEIGHTS
    x = torch.randn(5, 48)
    assert torch.equal(project(small, x), small(x))
    large = torch.nn.Linear(256, 1024)
    many = torch.randn(projection.MAX_CALIBRATED_ROWS + 1, 256)
    assert torch.equal(project(large, many), large(many))
    assert choices == {}


def test_project_calls_anything_but_a_plain_linear():
    class Doubled(torch.nn.Linear):  # an adapter-like subclass whose forward is not W x
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Doubled(512, 512)
    x = torch.randn(3, 512)
    assert torch.equal(project(layer, x), layer(x))


@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_feed_forward_equals_t5_layer_ff(proj, monkeypatch):
    monkeypatch.setattr(projection, "uses_transposed", lambda weight, rows: True)  # the feed-forward weights go W x^T
    model = deploy_model(tiny_config(feed_forward_proj=proj, d_model=256, d_ff=1024, num_layers=2), seed=3)
    ff = model.decoder.block[1].layer[2]
    hidden = torch.randn(4, 2, 256) * 3
    with torch.no_grad():
        torch.testing.assert_close(feed_forward(ff, hidden), ff(hidden), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feed_forward(ff, hidden[:1, :1]), ff(hidden[:1, :1]), rtol=1e-5, atol=1e-5)
        assert not torch.equal(feed_forward(ff, hidden), hidden)  # the sublayer does something


@pytest.mark.parametrize("norm_class", [T5LayerNorm, LongT5LayerNorm])
@pytest.mark.parametrize("d", [32, 128, 512, 1024])
@pytest.mark.parametrize("fused", [False, True])
def test_layer_norm_gives_the_modules_bits_in_float32(norm_class, d, fused, monkeypatch):
    monkeypatch.setattr(projection, "uses_fused_norm", lambda norm, rows, device: fused)
    torch.manual_seed(d)
    norm = norm_class(d, eps=1e-6)
    norm.weight.data = torch.randn(d)
    x = torch.randn(7, 3, d) * 5
    with torch.no_grad():
        assert torch.equal(layer_norm(norm, x), norm(x))
        # float64 is left to the module, which computes the variance in float32
        assert torch.equal(layer_norm(norm.double(), x.double()), norm(x.double()))


def test_the_norms_choice_is_measured_once(choices):
    norm = T5LayerNorm(64)
    for _ in range(3):
        layer_norm(norm, torch.randn(2, 1, 64))
    assert list(choices) == [("rms_norm", (64,), torch.float32, 2, torch.get_num_threads())]


def test_a_measurement_leaves_torchs_global_generator_as_it_was(choices):
    """A seeded caller samples the same draws whether or not a call measured kernels first."""
    layer = torch.nn.Linear(1024, 512, bias=False)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    projection.project(layer, torch.ones(2, 1024))
    assert choices, "nothing was measured: the test would be empty"
    assert torch.equal(torch.rand(3), expected)
