"""Captum as the reference: the package's occlusion equals Captum's Occlusion on the same windows, and Captum's
attributions through `captum_relevance` equal Captum's own default calls on a tsai model (after its batch transforms)."""
import numpy as np, torch, torch.nn as nn
import pytest
from captum.attr import Occlusion, IntegratedGradients, Saliency
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.explain.relevance import model_relevance
from tsai_attnviz.explain.attributions import captum_relevance

@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return ConvTranPlus(3, 4, 40, d_model=16, n_heads=8).eval()  # tsai's eRPE assumes 8 heads

def test_occlusion_equals_captums_occlusion(model):
    "Same windows (w=8, stride=4: (40 - 8) % 4 == 0, so no extra last window), mean fill, the predicted class's probability"
    x = torch.randn(3, 3, 40)
    ours = model_relevance(model, x, 'occlusion', window=8, stride=4)
    with torch.no_grad(): c = model(x).argmax(-1)
    prob = lambda xx: model(xx).softmax(-1)
    ref = torch.stack([Occlusion(prob).attribute(x[i:i + 1], sliding_window_shapes=(3, 8), strides=(3, 4), target=int(c[i]),
                                                 baselines=x[i:i + 1].mean(-1, keepdim=True).expand(1, 3, 40))[0, 0]
                       for i in range(3)])                                       # [3, 40]: every variable the same
    # Captum takes each window's drop once per element it covers and divides by the count, as occlusion does: both sides
    # forward the same occluded inputs, but in batches of different sizes, so the last bits may differ: a drop is the
    # difference of two probabilities (scale 1), so its rounding is some float32 ulps of 1, whatever its own size
    np.testing.assert_allclose(ours, ref.detach().numpy(), atol=1e-6, rtol=0)
    assert np.abs(ours).max() > 1e-4                                             # the drops are far above that tolerance

@pytest.mark.parametrize('method,cls', [('integrated_gradients', IntegratedGradients), ('saliency', Saliency)])
def test_captum_default_call(model, method, cls):
    x = torch.randn(4, 3, 40)
    with torch.no_grad(): c = model(x).argmax(-1)
    ref = cls(model).attribute(x, target=c).detach().sum(1).numpy()            # Captum's default call, summed over variables
    got = captum_relevance(model, x, method, bs=8)                               # batched differently: rounding only
    # integration steps batched differently: float32 sums in another order, so 1e-4 of the scale
    np.testing.assert_allclose(got, ref, atol=1e-4 * float(np.abs(ref).max()), rtol=1e-4)
    per = captum_relevance(model, x, method, per_var=True)
    assert per.shape == (4, 3, 40)
    np.testing.assert_allclose(per.sum(1), got, atol=1e-5 * float(np.abs(ref).max()), rtol=1e-4)

def test_a_model_that_writes_into_its_input():
    "TSTPlus writes into its input: Captum's leaf must not be the tensor it writes into, and the caller's x is left alone"
    from tsai.models.TSTPlus import TSTPlus
    torch.manual_seed(0)
    m = TSTPlus(3, 2, 24, d_model=16, n_heads=2, n_layers=1, d_ff=32).eval()
    x = torch.randn(2, 3, 24); x0 = x.clone()
    for method in ('integrated_gradients', 'saliency', 'input_x_gradient', 'gradient_shap'):
        r = captum_relevance(m, x, method, n_steps=8) if method == 'integrated_gradients' else captum_relevance(m, x, method)
        assert r.shape == (2, 24) and np.isfinite(r).all() and np.abs(r).sum() > 0, method
    assert torch.equal(x, x0)
