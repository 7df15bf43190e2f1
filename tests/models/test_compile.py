"""``train.compile``: StaticCompiled (a graph per input shape, bounded, logged) and compiled CAM passes == eager."""
import logging

import pytest
import torch

from tests._utils import assert_close
from tscd.models import StaticCompiled, create_model, encode_pass, multi_scale_cam


def _counting(sc: StaticCompiled) -> list:
    calls = []
    inner = sc.compiled
    sc.compiled = lambda *a: calls.append(a[0].shape) or inner(*a)
    return calls


def test_static_compiled_one_graph_per_shape_then_eager(caplog):
    torch._dynamo.reset()
    try:
        sc = StaticCompiled(lambda x, k: x * k + 1, "the test function", max_graphs=2, backend="eager")
        compiled_calls = _counting(sc)
        a, b, c = torch.randn(2, 3), torch.randn(4, 3), torch.randn(5, 3)
        with caplog.at_level(logging.INFO, logger="tscd.models._compile"):
            for x in (a, a, b, a):
                assert_close(sc(x, 3), x * 3 + 1, rtol=0, atol=1e-6, name="compiled")
            assert len(sc.graphs) == 2 and len(compiled_calls) == 4
            compiling = [r for r in caplog.records if "compiling the test function" in r.getMessage()]
            assert len(compiling) == 2 and "[2, 3]" in compiling[0].getMessage()
            # a third shape, and the same shape with another python argument: past max_graphs, eager, one warning
            assert_close(sc(c, 3), c * 3 + 1, rtol=0, atol=1e-6, name="eager")
            assert_close(sc(a, 2), a * 2 + 1, rtol=0, atol=1e-6, name="eager")
        assert len(sc.graphs) == 2 and len(compiled_calls) == 4
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "more than 2 input shapes" in warnings[0].getMessage()
    finally:
        torch._dynamo.reset()


def test_static_compiled_signature_sees_grad_mode_and_module_mode():
    torch._dynamo.reset()
    try:
        lin = torch.nn.Linear(3, 2)
        sc = StaticCompiled(lambda m, x: m(x), "the test module", backend="eager")
        x = torch.randn(2, 3)
        sc(lin, x)
        with torch.no_grad():
            sc(lin, x)
        lin.eval()
        sc(lin, x)
        assert len(sc.graphs) == 3
    finally:
        torch._dynamo.reset()


def _bn_state(net):
    bn = net.decoder.fuse.bn
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def _net():
    torch.manual_seed(0)
    return create_model("tscd_mit_tiny", num_classes=4, decoder_dim=16, drop_path_rate=0.2).train()


def _cams(net, images, seed, encode_fn=None):
    torch.manual_seed(seed)
    cam, aff = multi_scale_cam(net, images, scales=(1.0, 0.5), decoder=True, affinity=True, encode_fn=encode_fn)
    return cam, aff, _bn_state(net), torch.get_rng_state()


@pytest.mark.slow  # inductor generates and compiles C++ for two encoder graphs (about 40 s on 2 cores)
def test_compiled_cam_passes_equal_eager():
    """Inductor, train mode, drop-path and decoder dropout on, decoder statistics and affinity: the compiled passes
    give eager's CAMs, affinity and BatchNorm statistics and leave the RNG where eager leaves it (the random ops
    draw from the eager generator in eager order: ``fallback_random``)."""
    torch._dynamo.reset()
    images = torch.randn(2, 3, 32, 48)
    try:
        sc = StaticCompiled(encode_pass, "the CAM pass")
        compiled = _cams(_net(), images, 1, sc)
        assert len(sc.graphs) == 2  # one per scale
    finally:
        torch._dynamo.reset()
    eager = _cams(_net(), images, 1)
    other_draw = _cams(_net(), images, 2)
    assert (other_draw[0] - eager[0]).abs().max() > 1e-3  # drop-path matters here: the draws must be the same
    assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5, name="cams")
    assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-5, name="affinity")
    for i, name in enumerate(("running_mean", "running_var")):
        assert_close(compiled[2][i], eager[2][i], rtol=1e-4, atol=1e-6, name=name)
    assert compiled[2][2] == eager[2][2]
    assert torch.equal(compiled[3], eager[3])
