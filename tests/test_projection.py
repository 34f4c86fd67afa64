"""models.projection against torch's own modules: the same results, computed the other way round."""

import pytest
import torch

from engine_helpers import deploy_model, tiny_config
from transformers.models.longt5.modeling_longt5 import LongT5LayerNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

from models.projection import SMALL_WEIGHTS, feed_forward, layer_norm, project


@pytest.mark.parametrize("rows", [1, 2, 5, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_project_equals_linear(rows, bias):
    torch.manual_seed(rows)
    layer = torch.nn.Linear(256, 1024, bias=bias)  # SMALL_WEIGHTS: the smallest that goes W x^T
    x = torch.randn(rows, 3, 256)  # leading dims are kept
    out = project(layer, x)
    assert out.shape == (rows, 3, 1024) and out.is_contiguous()
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    if rows == 1:  # one row is the first row of a 2-row product
        single = x[:1, :1]
        assert torch.equal(project(layer, single), project(layer, torch.cat([single, single], dim=1))[:, :1])


def test_small_weights_go_through_the_module():
    layer = torch.nn.Linear(48, 80)
    assert layer.weight.numel() < SMALL_WEIGHTS
    x = torch.randn(5, 48)
    assert torch.equal(project(layer, x), layer(x))


def test_project_calls_anything_but_a_plain_linear():
    class Doubled(torch.nn.Linear):  # an adapter-like subclass whose forward is not W x
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Doubled(512, 512)
    x = torch.randn(3, 512)
    assert torch.equal(project(layer, x), layer(x))


@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_feed_forward_equals_t5_layer_ff(proj):
    # d_ff x d_model = SMALL_WEIGHTS: the feed-forward weights go W x^T
    model = deploy_model(tiny_config(feed_forward_proj=proj, d_model=256, d_ff=1024, num_layers=2), seed=3)
    ff = model.decoder.block[1].layer[2]
    hidden = torch.randn(4, 2, 256) * 3
    with torch.no_grad():
        torch.testing.assert_close(feed_forward(ff, hidden), ff(hidden), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feed_forward(ff, hidden[:1, :1]), ff(hidden[:1, :1]), rtol=1e-5, atol=1e-5)
        assert not torch.equal(feed_forward(ff, hidden), hidden)  # the sublayer does something


@pytest.mark.parametrize("norm_class", [T5LayerNorm, LongT5LayerNorm])
@pytest.mark.parametrize("d", [32, 128, 512, 1024])
def test_layer_norm_gives_the_modules_bits_in_float32(norm_class, d):
    torch.manual_seed(d)
    norm = norm_class(d, eps=1e-6)
    norm.weight.data = torch.randn(d)
    x = torch.randn(7, 3, d) * 5
    with torch.no_grad():
        assert torch.equal(layer_norm(norm, x), norm(x))
        # float64 is left to the module, which computes the variance in float32
        assert torch.equal(layer_norm(norm.double(), x.double()), norm(x.double()))
