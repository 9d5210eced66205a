"Issue 3: the weight-exposing layers against stock tsai, on real Learners and bad input."
import io, pickle, copy
import cloudpickle, numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
from tsai.models.ConvTranPlus import ConvTranPlus, Attention_Rel_Scl
from tsai.basics import ts_learner, get_ts_dls, TSClassification
from tsai_attnviz.all import *
from conftest import make_learner, stock_effective_attention

def pair(rel, c_in=3, seq_len=30, d_model=16, n_heads=8, seed=0):
    "A stock model and a swapped copy with the very same weights"
    torch.manual_seed(seed)
    stock = ConvTranPlus(c_in, 4, seq_len, d_model=d_model, n_heads=n_heads, rel_pos_encode=rel)
    if rel == 'eRPE': nn.init.normal_(stock.backbone.attention_layer.relative_bias_table, std=0.05)  # stock starts at 0
    return stock, swap_attention(copy.deepcopy(stock))

CASES = [(rel, L, d, h, bs) for rel in ['eRPE', 'vector', None]
         for (L, d, h, bs) in [(30, 16, 8, 4), (57, 32, 8, 1), (12, 16, 4, 3), (40, 64, 16, 2)]
         if not (rel == 'eRPE' and h != 8)]  # stock eRPE only runs with 8 heads

@pytest.mark.bitwise
@pytest.mark.parametrize('rel,L,d,h,bs', CASES)
@pytest.mark.parametrize('keep', [True, False])
def test_eval_outputs_bitwise(rel, L, d, h, bs, keep):
    stock, swapped = pair(rel, seq_len=L, d_model=d, n_heads=h)
    swapped.backbone.attention_layer.keep_weights = keep
    x = torch.randn(bs, 3, L)
    with torch.no_grad(): assert torch.equal(stock.eval()(x), swapped.eval()(x))
    w = swapped.backbone.attention_layer.attn_weights
    assert (w is not None) == keep

@pytest.mark.bitwise
@pytest.mark.parametrize('rel', ['eRPE', 'vector', None])
def test_train_mode_outputs_and_grads_bitwise(rel):
    stock, swapped = pair(rel)
    x, y = torch.randn(6, 3, 30), torch.randint(0, 4, (6,))
    outs, grads = [], []
    for m in (stock, swapped):
        m.train(); torch.manual_seed(123)  # same dropout masks
        out = m(x); F.cross_entropy(out, y).backward()
        outs.append(out.detach()); grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert torch.equal(*outs)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]: assert torch.equal(grads[0][n], grads[1][n]), n

@pytest.mark.parametrize('rel', ['eRPE', 'vector', None])
def test_weights_are_faithful(rel):
    "Recompute the layer's output from the kept weights, the value projection and the output norm"
    _, m = pair(rel)
    layer = m.backbone.attention_layer
    z = torch.randn(3, 30, 16)
    with torch.no_grad(): out = layer(z)
    v = (z @ layer.value.weight.T).reshape(3, 30, 8, 2).transpose(1, 2)
    mixed = (layer.attn_weights @ v).transpose(1, 2).reshape(3, 30, 16)
    recomputed = F.layer_norm(mixed, (16,), layer.to_out.weight, layer.to_out.bias, layer.to_out.eps)
    torch.testing.assert_close(recomputed, out, rtol=1e-5, atol=1e-5)
    # and the weights themselves equal an independent computation from the stock model
    stock, m2 = pair(rel)
    x = torch.randn(2, 3, 30)
    with torch.no_grad(): m2.eval()(x)
    torch.testing.assert_close(m2.backbone.attention_layer.attn_weights, stock_effective_attention(stock, x), rtol=0, atol=1e-6)

def test_erpe_rows_need_not_sum_to_one():
    _, m = pair('eRPE')
    layer = m.backbone.attention_layer
    with torch.no_grad(): m.eval()(torch.randn(2, 3, 30))
    torch.testing.assert_close(layer.attn_softmax.sum(-1), torch.ones(2, 8, 30))
    assert (layer.attn_weights.sum(-1) - 1).abs().max() > 1e-2
    assert layer.relative_bias().shape == (8, 30, 30)  # input-independent, not per sample

@pytest.mark.parametrize('h', [1, 2, 4, 8, 16])
def test_erpe_any_heads(h):
    torch.manual_seed(0)
    m = swap_attention(ConvTranPlus(3, 2, 25, d_model=16, n_heads=h))
    with torch.no_grad(): out = m.eval()(torch.randn(2, 3, 25))
    assert out.shape == (2, 2) and m.backbone.attention_layer.attn_weights.shape == (2, h, 25, 25)

def test_erpe_stock_fails_without_swap_for_4_heads():
    "Why the swap matters: stock eRPE with 4 heads does not run"
    m = ConvTranPlus(3, 2, 25, d_model=16, n_heads=4)
    with pytest.raises(RuntimeError): m(torch.randn(2, 3, 25))

@pytest.mark.bitwise
def test_state_dict_and_pickles():
    stock, swapped = pair('eRPE')
    assert list(stock.state_dict()) == list(swapped.state_dict())
    fresh = swap_attention(ConvTranPlus(3, 4, 30))
    fresh.load_state_dict(stock.state_dict())
    back = ConvTranPlus(3, 4, 30); back.load_state_dict(fresh.state_dict())
    x = torch.randn(2, 3, 30)
    with torch.no_grad():
        ref = stock.eval()(x)
        assert torch.equal(fresh.eval()(x), ref) and torch.equal(back.eval()(x), ref)
        swapped.eval()(x)  # keeps weights: they must not go into the pickles
    buf = io.BytesIO(); torch.save(swapped, buf); buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    cp = pickle.loads(cloudpickle.dumps(swapped))
    for m in (loaded, cp):
        assert type(m.backbone.attention_layer) is Attention_Rel_Scl_With_Weights
        assert m.backbone.attention_layer.attn_weights is None
        with torch.no_grad(): assert torch.equal(m.eval()(x), ref)
    assert len(cloudpickle.dumps(swapped)) < len(cloudpickle.dumps(stock)) * 1.01

@pytest.mark.bitwise
def test_fit_one_cycle_same_losses(bm_data):
    losses = []
    for swap in (False, True):
        learn = make_learner(*bm_data, seed=1)
        if swap: swap_attention(learn.model, keep_weights=False)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3)
        losses.append([l.item() for l in learn.recorder.losses] + learn.recorder.values[-1])
    assert losses[0] == losses[1]

def test_convtranpluswithattn_as_arch(bm_data):
    X, y, splits = bm_data
    learn = make_learner(X, y, splits, arch=ConvTranPlusWithAttn, arch_config=dict(seq_len=100, max_batches=3))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    learn.model.clear()
    learn.get_preds()
    aw = learn.model.attention_weights
    assert len(aw) == 3 and aw[0].shape == (16, 8, 100, 100) and aw[0].device.type == 'cpu'
    dls = get_ts_dls(X, y, splits=splits, tfms=[None, TSClassification()], bs=16)
    learn2 = ts_learner(dls, ConvTranPlusWithAttn, arch_config=dict(seq_len=100, n_heads=4))
    learn2.get_preds()
    assert learn2.model.attention_weights[-1].shape[1] == 4

def test_attention_stats_against_direct_computation():
    w = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    s = attention_stats(w)
    d = torch.arange(5)
    dist = (d[:, None] - d[None]).abs().float()
    for h in range(3):
        p = w[:, h]
        assert s[h]['entropy'] == pytest.approx(float(np.mean([-(r * np.log(r)).sum() for r in p.reshape(-1, 5).numpy()])), rel=1e-5)
        assert s[h]['mean_distance'] == pytest.approx(float((p * dist).sum(-1).mean()), rel=1e-5)
        assert s[h]['rowsum_min'] == pytest.approx(float(p.sum(-1).min()), rel=1e-6)

def test_seed_hook_prints(capsys):
    _, m = pair('eRPE')
    h = m.backbone.attention_layer.register_forward_hook(attention_hook)
    with torch.no_grad(): m.eval()(torch.randn(2, 3, 30))
    h.remove()
    assert 'min' in capsys.readouterr().out

# -- bad input ------------------------------------------------------------------------------
def test_swap_without_attention_names_types():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match='contains: Conv1d, ReLU, Sequential'): swap_attention(model)

def test_erpe_bad_heads_leaves_model_as_it_was():
    m = nn.Sequential(Attention_Rel_Scl(16, 10, n_heads=3), Attention_Rel_Scl(16, 10, n_heads=8))
    with pytest.raises(ValueError, match=r'n_heads=3 does not divide d_model=16.*Use n_heads in \[1, 2, 4, 8, 16\]'): swap_attention(m)
    assert [type(l) for l in m] == [Attention_Rel_Scl, Attention_Rel_Scl]
    with pytest.raises(ValueError, match='n_heads=5 does not divide'): ConvTranPlusWithAttn(3, 2, 10, n_heads=5)

@pytest.mark.parametrize('shape', [(2, 4, 30), (2, 3, 29), (3, 30)])
def test_wrong_input_shape(shape):
    m = ConvTranPlusWithAttn(3, 2, 30)
    with pytest.raises(ValueError, match=r'built for \[n_samples, n_vars=3, seq_len=30\]'): m(torch.randn(*shape))
    assert len(m.attention_weights) == 0
