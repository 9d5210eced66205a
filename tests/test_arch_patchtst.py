"""PatchTST's family: the twin against stock tsai (bitwise), its maps against tsai's `store_attn` and a hand computation,
patch spans against hand-computed ones and gradients, and a real forecaster on BasicMotions."""
import copy, pickle
import numpy as np, pytest, torch, torch.nn.functional as F
from tsai.models.PatchTST import PatchTST, _ScaledDotProductAttention, _MultiheadAttention
from tsai_attnviz.arch import swap_attention, unswap_attention, attention_layers, adapter_for, probe_spans, tokens_of
from tsai_attnviz.arch.patchtst import PATCHTST, patch_spans, forecast_data
from conftest import no_leftovers, listen

def tiny(seed=0, **kw):
    "A stock PatchTST small enough for a loaded CPU"
    torch.manual_seed(seed)
    cfg = dict(c_in=3, c_out=1, seq_len=24, pred_dim=5, n_layers=2, n_heads=2, d_model=8, d_ff=16, patch_len=8, stride=4)
    return PatchTST(**{**cfg, **kw})

def sdps(model): return [m for m in model.modules() if isinstance(m, _ScaledDotProductAttention)]

# -- bitwise: outputs and gradients ---------------------------------------------------------------------------------------
CONFIGS = [dict(), dict(res_attention=False), dict(decomposition=True, kernel_size=5), dict(pre_norm=True, norm='LayerNorm'),
           dict(c_in=1, seq_len=23, patch_len=6, stride=5)]

@pytest.mark.bitwise
@pytest.mark.parametrize('cfg', CONFIGS, ids=lambda c: ','.join(f'{k}={v}' for k, v in c.items()) or 'default')
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_outputs_and_grads_bitwise(cfg, mode):
    "Same weights, same seed before each forward, attention and residual dropout on: outputs and every gradient equal"
    stock = tiny(attn_dropout=0.3, dropout=0.2, **cfg)
    x = torch.randn(4, cfg.get('c_in', 3), cfg.get('seq_len', 24))
    got = []
    def receiver(layer, attn, bias, logits, start, q0): got.append(attn.detach().clone())
    for keep, recv in [(True, None), (False, None), (False, receiver), (True, receiver)]:
        twin = swap_attention(copy.deepcopy(stock), keep_weights=keep)
        att = listen(twin, recv) if recv is not None else None
        res = []
        for m in (copy.deepcopy(stock), twin):
            m.train(mode == 'train'); torch.manual_seed(7)
            out = m(x); F.mse_loss(out, torch.zeros_like(out)).backward()
            res.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
        (o0, g0), (o1, g1) = res
        assert torch.equal(o0, o1)
        assert g0.keys() == g1.keys() and len(g0) > 10
        for n in g0: assert torch.equal(g0[n], g1[n]), n
        assert all((m.attn_weights is not None) == keep for m in sdps(twin))
        if att is not None: att.detach()
    assert len(got) == 2 * len(sdps(stock))  # the consumer saw each layer's forward, in both runs that had it

# -- the maps: tsai's own store_attn, and a hand computation --------------------------------------------------------------
@pytest.mark.bitwise
@pytest.mark.parametrize('decomposition', [False, True])
def test_kept_weights_are_store_attn(decomposition):
    "In training, with attention dropout: `attn_weights` is bitwise what tsai's `store_attn=True` keeps (after dropout)"
    stock = tiny(store_attn=True, attn_dropout=0.4, decomposition=decomposition, kernel_size=5).train()
    twin = swap_attention(copy.deepcopy(stock))
    x = torch.randn(3, 3, 24)
    for m in (stock, twin): torch.manual_seed(3); m(x)
    enc = [l for l in stock.modules() if type(l).__name__ == '_TSTiEncoderLayer']
    assert len(enc) == (4 if decomposition else 2)
    twin_sdps = sdps(twin)
    for l, t in zip(enc, twin_sdps):
        assert torch.equal(t.attn_weights, l.attn)
        assert (t.attn_weights == 0).any() and not (t.attn_softmax == 0).any()  # dropout zeroed some, not the softmax
        kept = t.attn_weights != 0
        torch.testing.assert_close(t.attn_weights[kept], (t.attn_softmax / 0.6)[kept], rtol=1e-6, atol=0)

def hand_maps(stock, x):
    "Logits and softmax of every layer of a stock PatchTST, from its parameters and the inputs of its _MultiheadAttention"
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.append((mod, a))) for m in stock.modules()
             if isinstance(m, _MultiheadAttention)]
    try:
        with torch.no_grad(): stock.eval()(x)
    finally:
        for h in hooks: h.remove()
    out = []
    with torch.no_grad():
        for mha, (Q, K, V, *prev) in inputs:  # with res_attention, the previous layer's scores come fourth
            prev = prev[0] if prev else None
            n, L, _ = Q.shape
            H = mha.n_heads
            dk = mha.W_Q.out_features // H
            q = F.linear(Q, mha.W_Q.weight, mha.W_Q.bias).reshape(n, L, H, dk).transpose(1, 2)
            k = F.linear(K, mha.W_K.weight, mha.W_K.bias).reshape(n, L, H, dk).transpose(1, 2)
            logits = q @ k.transpose(-1, -2) / dk ** 0.5 + (0 if prev is None else prev)
            out.append((logits, logits.softmax(-1)))
    return out

@pytest.mark.parametrize('cfg', [dict(), dict(res_attention=False), dict(n_heads=4, d_model=16)])
def test_received_maps_by_hand(cfg):
    "In eval: a consumer gets the softmax and the scaled scores (plus the previous layer's, with residual attention)"
    stock = tiny(**cfg)
    x = torch.randn(2, 3, 24)
    expected = hand_maps(stock, x)
    twin = swap_attention(copy.deepcopy(stock))
    got = []
    listen(twin, lambda layer, sm, bias, logits, start, q0: got.append((sm.clone(), logits.clone(), start)))
    with torch.no_grad(): twin.eval()(x)
    assert len(got) == len(expected) == 2
    H = cfg.get('n_heads', 2)
    for (sm, logits, start), (el, es), m in zip(got, expected, sdps(twin)):
        assert sm.shape == (2 * 3, H, 6, 6) and start == 0
        torch.testing.assert_close(logits, el, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sm, es, rtol=1e-6, atol=1e-7)
        assert torch.equal(m.attn_weights, sm) and torch.equal(m.attn_softmax, sm)
    if cfg.get('res_attention', True):  # layer 1's softmax came from its own scores plus layer 0's
        assert not torch.allclose(got[1][0], expected[0][1])

@pytest.mark.bitwise
def test_rows_are_items_times_variables():
    "Row r of the attention batch is item r // c_in, variable r % c_in: change one (item, variable), one row changes"
    twin = swap_attention(tiny(c_in=3)).eval()
    x = torch.randn(4, 3, 24)
    x2 = x.clone(); x2[2, 1] = torch.randn(24)
    with torch.no_grad():
        twin(x); a = [m.attn_weights for m in sdps(twin)]
        twin(x2); b = [m.attn_weights for m in sdps(twin)]
    layer = attention_layers(twin)[0][1]
    assert PATCHTST.n_vars(twin, layer) == 3
    for wa, wb in zip(a, b):
        changed = [r for r in range(12) if not torch.equal(wa[r], wb[r])]
        assert changed == [2 * 3 + 1]

# -- the adapter ----------------------------------------------------------------------------------------------------------
def test_adapter():
    m = tiny(n_heads=4, d_model=16)
    assert adapter_for(m) is PATCHTST and PATCHTST.token == 'patch' and PATCHTST.per_var and PATCHTST.dropout == 'after'
    names = [n for n, _ in attention_layers(m)]
    assert names == ['model.backbone.layers.0.self_attn.sdp_attn', 'model.backbone.layers.1.self_attn.sdp_attn']
    for _, l in attention_layers(m): assert PATCHTST.n_heads(l) == 4
    assert PATCHTST.input_shape(m) is None
    d = tiny(decomposition=True, kernel_size=5)
    names = [n for n, _ in attention_layers(d)]
    assert names == [f'model_{b}.backbone.layers.{i}.self_attn.sdp_attn' for b in ('trend', 'res') for i in (0, 1)]
    assert len({id(l) for _, l in attention_layers(d)}) == 4

def test_heads_are_the_modules_own():
    "_MultiheadAttention ignores the d_k it is given: the heads and scale are d_model // n_heads wide whatever d_k is"
    mha = _MultiheadAttention(16, 4, d_k=3, d_v=5)
    assert (mha.d_k, mha.d_v, mha.W_Q.out_features, mha.sdp_attn.scale.item()) == (4, 4, 16, 0.5)

def test_swap_roundtrip_and_pickle():
    m = tiny()
    ref = copy.deepcopy(m)
    swap_attention(swap_attention(m))
    assert all(type(l).__name__ == '_ScaledDotProductAttention_With_Weights' for l in sdps(m))
    assert m.state_dict().keys() == ref.state_dict().keys()
    with torch.no_grad(): m.eval()(torch.randn(2, 3, 24))
    assert sdps(m)[0].attn_weights is not None and pickle.loads(pickle.dumps(sdps(m)[0])).attn_weights is None
    unswap_attention(unswap_attention(m))
    no_leftovers(m)
    assert all(type(l) is _ScaledDotProductAttention and 'attn_weights' not in l.__dict__ for l in sdps(m))
    assert b'tsai_attnviz' not in pickle.dumps(m)

# -- spans ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('L,P,S,expected', [
    # padded by S copies of x[0]; patch p is padded steps [p·S, p·S + P), input steps [(p−1)·S, (p−1)·S + P)
    (20, 8, 4, [(0, 4), (0, 8), (4, 12), (8, 16), (12, 20)]),    # (20 − 8) % 4 = 0: every step seen
    (23, 6, 5, [(0, 1), (0, 6), (5, 11), (10, 16), (15, 21)]),   # patch 0 = 5 pads + x[0]; steps 21, 22 never seen
    (100, 16, 8, [(0, 8)] + [(8 * p - 8, 8 * p + 8) for p in range(1, 12)]),  # tsai's defaults on 100 steps: 12 patches
])
def test_spans_by_hand_and_by_gradients(L, P, S, expected):
    assert patch_spans(L, P, S).tolist() == [list(s) for s in expected]
    for padding_patch in (True, False, 'end', None):  # stored by tsai and never read: the padding is always there
        m = tiny(c_in=2, seq_len=L, patch_len=P, stride=S, padding_patch=padding_patch).eval()
        assert m.patch_num == len(expected)
        got = {}
        def f(x):
            got.clear()
            h = m.model.backbone.layers[0].register_forward_pre_hook(lambda mod, a: got.setdefault('z', a[0]))
            try: m(x)
            finally: h.remove()
            return got['z'][:1]  # row 0: item 0, variable 0
        assert probe_spans(f, 2, L).tolist() == [list(s) for s in expected]
        layer = attention_layers(m)[0][1]
        t = tokens_of(m, 'l0', layer, L, len(expected), len(expected))
        assert t['query'][0] == t['key'][0] == 'patch'
        assert t['query'][1].tolist() == t['key'][1].tolist() == [list(s) for s in expected]

def test_spans_of_a_padding_only_patch():
    "patch_len <= stride: patch 0 holds copies of x[0] only, so its span is (0, 1)"
    assert patch_spans(20, 4, 6).tolist() == [[0, 1], [0, 4], [6, 10], [12, 16]]
    assert patch_spans(10, 3, 3).tolist() == [[0, 1], [0, 3], [3, 6], [6, 9]]

def test_decomposition_spans_are_patch_positions():
    "With decomposition each branch's patch p is at the patch's steps; its values are moving averages reaching k//2 further"
    k, L, P, S = 5, 24, 8, 4
    m = tiny(c_in=1, decomposition=True, kernel_size=k).eval()
    for bb, name in ((m.model_trend, 'model_trend'), (m.model_res, 'model_res')):
        layer = [l for n, l in attention_layers(m) if n.startswith(name)][0]
        assert tokens_of(m, name, layer, L, 6, 6)['key'][1].tolist() == patch_spans(L, P, S).tolist()
        got = {}
        def f(x):
            h = bb.backbone.layers[0].register_forward_pre_hook(lambda mod, a: got.__setitem__('z', a[0]))
            try: m(x)
            finally: h.remove()
            return got['z']
        left, right = (k - 1) // 2, k - 1 - (k - 1) // 2  # tsai's MovingAverage pads (k-1)//2 left, the rest right
        wide = [[max(0, a - left), min(L, b + right)] for a, b in patch_spans(L, P, S).tolist()]
        assert probe_spans(f, 1, L).tolist() == wide

# -- forecasting data -----------------------------------------------------------------------------------------------------
def test_forecast_data(bm_data):
    X = bm_data[0]
    Xh, y = forecast_data(X, 20)
    assert Xh.shape == (len(X), 6, 80) and y.shape == (len(X), 6, 20)
    assert np.array_equal(Xh, X[:, :, :80]) and np.array_equal(y, X[:, :, 80:])
    with pytest.raises(ValueError, match=r'horizon=0 but the series have 100 steps: use an int in 1..99'): forecast_data(X, 0)
    with pytest.raises(ValueError, match=r'horizon=2.5'): forecast_data(X, 2.5)

# -- a real forecaster ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def forecaster(bm_data):
    from tsai.basics import TSForecaster, set_seed
    X, _, splits = bm_data
    Xh, y = forecast_data(X, 20)
    set_seed(0, reproducible=True)
    learn = TSForecaster(Xh, y, splits=splits, arch='PatchTST', bs=16, seed=0, verbose=False,
                         arch_config=dict(d_model=16, n_heads=2, d_ff=32, n_layers=2, patch_len=16, stride=8))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3)
    return learn

def test_forecaster_shapes(forecaster):
    "tsai reads pred_dim from y: the model maps [bs, 6, 80] to [bs, 6, 20]"
    xb, yb = forecaster.dls.valid.one_batch()
    assert xb.shape[1:] == (6, 80) and yb.shape[1:] == (6, 20)
    with torch.no_grad(): assert forecaster.model.eval()(xb).shape == yb.shape
    assert forecaster.model.patch_num == 10  # int((80 − 16) / 8 + 1) + 1

def test_recorder_on_a_forecaster(forecaster, tmp_path):
    "One record per (item, variable) and layer, equal to the stock model's maps by hand; figures draw; nothing left swapped"
    import matplotlib.pyplot as plt
    from tsai_attnviz.all import AttnRecorder
    learn = forecaster
    rec = AttnRecorder()
    learn.add_cb(rec)
    with learn.no_bar(): learn.get_preds()
    no_leftovers(learn.model)
    r = rec.recording
    names = [n for n, _ in attention_layers(learn.model)]
    n = len(r) // 12  # items recorded (the first batch): 6 variables × 2 layers each
    assert n > 1 and r.layers == [names[0]] * 6 * n + [names[1]] * 6 * n
    assert [x['var'] for x in r.records[:12]] == list(range(6)) * 2 and r.samples[:12] == [0] * 6 + [1] * 6
    assert r.weights.shape == (12 * n, 2, 10, 10) and r.meta['per_var'] and r.meta['dropout'] == 'after'
    assert r.meta['tokens'][names[0]]['key'] == ('patch', patch_spans(80, 16, 8).tolist())
    x = r.inputs[:6 * n:6]  # each item's input, once: [n, 6, 80]
    ref = hand_maps(learn.model, x)  # rows: item · 6 + variable, as the records
    for l in range(2): torch.testing.assert_close(r.weights[6 * n * l:6 * n * (l + 1)], ref[l][1], rtol=0, atol=1e-6)
    fig = learn.show_attention(path='/tmp/patchtst_heatmap.png')
    assert len([ax for ax in fig.axes if ax.images]) == 2  # one panel per head
    learn.show_attention(view='series', path='/tmp/patchtst_series.png')
    learn.show_attention(layer='all', path='/tmp/patchtst_all.png')
    plt.close('all')
    learn.remove_cb(rec)
    no_leftovers(learn.model)
    learn.export(tmp_path/'f.pkl')
    assert b'tsai_attnviz' not in (tmp_path/'f.pkl').read_bytes()

def test_recorder_tells_decomposition_branches_apart(bm_data):
    from tsai.basics import TSForecaster
    X, _, splits = bm_data
    Xh, y = forecast_data(X[:, :2], 20)
    learn = TSForecaster(Xh, y, splits=splits, arch='PatchTST', bs=8, seed=0, verbose=False,
                         arch_config=dict(d_model=8, n_heads=2, d_ff=8, n_layers=1, patch_len=16, stride=8,
                                          decomposition=True, kernel_size=5))
    with learn.no_bar(): r = learn.record_attention(X=Xh[:3])
    assert sorted(set(r.layers)) == ['model_res.backbone.layers.0.self_attn.sdp_attn', 'model_trend.backbone.layers.0.self_attn.sdp_attn']
    assert len(r) == 3 * 2 * 2  # items × variables × branches
    no_leftovers(learn.model)
