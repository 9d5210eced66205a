"""TSTPlus's family (TSTPlus, MultiTSTPlus, TSiTPlus): the twin against stock tsai, its maps against tsai's own store_attn, hooks
on stock modules and hand computations, token spans against hand-computed ones, and a real Learner on BasicMotions."""
import pickle, warnings
from copy import deepcopy
import numpy as np, pytest, torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.learner import load_learner
from tsai.basics import TSClassifier, TSClassification, TSStandardize
from tsai.models.layers import MultiheadAttention
from tsai.models.TSTPlus import TSTPlus, MultiTSTPlus, _TSTEncoderLayer
from tsai.models.TSiTPlus import TSiTPlus
from tsai_attnviz.all import *
from tsai_attnviz.arch import tokens_of
from tsai_attnviz.arch.tstplus import TSTPLUS, MultiheadAttention_With_Weights
from conftest import no_leftovers, listen

warnings.filterwarnings('ignore', category=UserWarning)

def tst(seed=0, **kw):
    "TSTPlus over 40 steps, downsampled to 16 tokens, res_attention (tsai's default), attention dropout on"
    torch.manual_seed(seed)
    return TSTPlus(3, 2, 40, **{**dict(max_seq_len=16, d_model=8, n_heads=2, n_layers=2, d_ff=16, attn_dropout=0.3,
                                     dropout=0.1, store_attn=True), **kw})

def multi(seed=0, **kw):
    torch.manual_seed(seed)
    return MultiTSTPlus([2, 1], 2, 40, **{**dict(max_seq_len=16, d_model=8, n_heads=2, n_layers=2, d_ff=16, attn_dropout=0.3,
                                                dropout=0.1, store_attn=True), **kw})

def tsit(seed=0, **kw):
    torch.manual_seed(seed)
    return TSiTPlus(3, 2, 40, **{**dict(d_model=8, n_heads=2, depth=2, dropout=0.1, drop_path_rate=0.1, use_token=True,
                                      lsa=True, token_size=4, verbose=False), **kw})

causal = torch.triu(torch.ones(40, 40, dtype=torch.bool), 1)
MODELS = dict(tst=tst, multi=multi, tsit=tsit,
              tst_plain=lambda: tst(max_seq_len=None, res_attention=False, norm='LayerNorm', pre_norm=True, attn_mask=causal),
              tsit_pre=lambda: tsit(pre_norm=True, lsa=False, use_token=False, token_size=None))

def grads(model): return {n: p.grad for n, p in model.named_parameters()}

@pytest.mark.bitwise
@pytest.mark.parametrize('arch', list(MODELS))
@pytest.mark.parametrize('keep,receive', [(True, True), (False, False), (False, True)])
def test_outputs_and_gradients_bitwise(arch, keep, receive):
    stock = MODELS[arch]()
    twin = swap_attention(deepcopy(stock), keep_weights=keep)
    layers = [m for _, m in attention_layers(twin)]
    assert layers and all(type(m) is MultiheadAttention_With_Weights for m in layers)
    got = []
    if receive:
        listen(twin, lambda layer, attn, bias, logits, start, q0: got.append((layer, attn.detach().clone(), bias, start)))
    x = torch.randn(4, 3, 40)
    for train in (False, True):
        stock.train(train); twin.train(train)
        torch.manual_seed(1); ys = stock(x.clone())
        torch.manual_seed(1); yt = twin(x.clone())
        assert torch.equal(ys, yt)
        if train:
            ys.pow(2).sum().backward(); yt.pow(2).sum().backward()
            gs, gt = grads(stock), grads(twin)
            assert gs.keys() == gt.keys()
            for n in gs: assert (gs[n] is None and gt[n] is None) or torch.equal(gs[n], gt[n]), n
        assert all((m.attn_weights is not None) == keep for m in layers)
    if receive:  # one call per layer and forward, with the whole batch (start 0), in the model's order
        assert [g[0] for g in got] == layers * 2 and all(g[2] is None and g[3] == 0 for g in got)
        if keep: assert torch.equal(got[-1][1], layers[-1].attn_weights)

@pytest.mark.bitwise
@pytest.mark.parametrize('build', [tst, multi, lambda: tst(res_attention=False)])
@pytest.mark.parametrize('train', [False, True])
def test_kept_maps_are_tsai_store_attn(build, train):
    "The kept maps (after attention dropout) equal what tsai's own store_attn keeps in the stock model"
    stock = build().train(train)
    twin = swap_attention(deepcopy(stock)).train(train)
    x = torch.randn(3, 3, 40)
    torch.manual_seed(2); stock(x.clone())
    torch.manual_seed(2); twin(x.clone())
    enc = [m for m in stock.modules() if isinstance(m, _TSTEncoderLayer)]
    mine = [m for _, m in attention_layers(twin)]
    assert len(enc) == len(mine) == 2 * (2 if build is multi else 1)
    for e, m in zip(enc, mine):
        assert torch.equal(e.attn, m.attn_weights)
        assert m.attn_weights.shape == (3, 2, 16, 16)
        torch.testing.assert_close(m.attn_softmax.sum(-1), torch.ones(3, 2, 16))
        assert train == (not torch.equal(m.attn_weights, m.attn_softmax))  # dropout in training only

@pytest.mark.bitwise
def test_res_attention_by_hand():
    "Each layer's map is the softmax of its own scores plus the previous layer's (computed from the stock parameters)"
    stock = tst(attn_dropout=0.).eval()
    twin = swap_attention(deepcopy(stock))
    qs = []
    hs = [e.self_attn.register_forward_pre_hook(lambda m, a: qs.append(a[0])) for e in stock.backbone.encoder.layers]
    x = torch.randn(2, 3, 40)
    with torch.no_grad(): stock(x), twin(x)
    for h in hs: h.remove()
    prev, own = None, []
    with torch.no_grad():
        for e, q_in in zip(stock.backbone.encoder.layers, qs):
            a = e.self_attn
            q = a.W_Q(q_in).reshape(2, 16, 2, -1).transpose(1, 2)   # [bs, H, L, d_k]
            k = a.W_K(q_in).reshape(2, 16, 2, -1).transpose(1, 2)
            s = q @ k.transpose(-1, -2) * a.sdp_attn.scale            # [bs, H, L, L]
            own.append(F.softmax(s, -1))
            s = s if prev is None else s + prev
            torch.testing.assert_close(e.attn, F.softmax(s, -1), atol=1e-6, rtol=0)
            prev = s
    mine = [m.attn_weights for _, m in attention_layers(twin)]
    for e, w in zip(stock.backbone.encoder.layers, mine): assert torch.equal(e.attn, w)
    assert (mine[1] - own[1]).abs().max() > 1e-3  # the second map is not the softmax of its own scores alone

@pytest.mark.bitwise
def test_scores_passed_on_are_never_written():
    "res_attention: layer 0's scores are layer 1's prev; a consumer and the twin leave them as they were"
    twin = swap_attention(tst()).train()
    l0, l1 = [m for _, m in attention_layers(twin)]
    seen = {}
    l0.register_forward_hook(lambda m, a, out: seen.update(ret=out[2], copy=out[2].detach().clone()))
    l1.register_forward_pre_hook(lambda m, a: seen.update(prev=a[3]))
    listen(twin, lambda *a: None)
    twin(torch.randn(3, 3, 40)).sum().backward()
    assert seen['prev'] is seen['ret'] and torch.equal(seen['ret'], seen['copy'])

@pytest.mark.bitwise
def test_receiver_logits_are_stock_scores():
    "A consumer's logits are the scores stock returns (res_attention): scaled, plus prev, masked with -inf"
    stock = tst(attn_dropout=0., attn_mask=torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)).eval()
    twin = swap_attention(deepcopy(stock), keep_weights=False)
    ref, got = [], []
    for _, m in attention_layers(stock): m.register_forward_hook(lambda m, a, out: ref.append(out[2]))
    listen(twin, lambda layer, attn, bias, logits, start, q0: got.append(logits.clone()))
    x = torch.randn(2, 3, 40)
    with torch.no_grad(): stock(x), twin(x)
    assert len(got) == len(ref) == 2
    for r, g in zip(ref, got): assert torch.equal(r, g) and g[..., 0, 1:].eq(-np.inf).all()

@pytest.mark.bitwise
def test_nan_padding_auto_mask():
    "key_padding_mask='auto': steps NaN in every variable are masked keys (weight 0); tsai sets the caller's NaN to 0"
    stock = tst(max_seq_len=None, attn_dropout=0.).eval()
    twin = swap_attention(deepcopy(stock))
    x = torch.randn(2, 3, 40)
    x[0, :, 30:] = float('nan')
    xs, xt = x.clone(), x.clone()
    with torch.no_grad(): ys, yt = stock(xs), twin(xt)
    assert torch.equal(ys, yt) and torch.isfinite(ys).all()
    assert not torch.isnan(xs).any() and (xs[0, :, 30:] == 0).all()  # tsai wrote into the caller's tensor
    for e, (_, m) in zip(stock.backbone.encoder.layers, attention_layers(twin)):
        assert torch.equal(e.attn, m.attn_weights)
        assert (m.attn_weights[0, ..., 30:] == 0).all() and (m.attn_weights[1, ..., 30:] > 0).all()

@pytest.mark.bitwise
def test_tsit_lsa_and_ignored_attn_dropout():
    "TSiTPlus: LSA masks the diagonal (exactly 0); attn_dropout is never handed to the encoder (no attention dropout)"
    stock = tsit(attn_dropout=0.5)
    assert [m.sdp_attn.attn_dropout.p for _, m in attention_layers(stock)] == [0., 0.]
    assert all(m.sdp_attn.scale.requires_grad for _, m in attention_layers(stock))  # LSA learns its temperature
    twin = swap_attention(deepcopy(stock))
    outs = []
    for _, m in attention_layers(stock): m.register_forward_hook(lambda m, a, out: outs.append(out[1]))
    x = torch.randn(3, 3, 40)
    for train in (False, True):
        stock.train(train); twin.train(train); outs.clear()
        torch.manual_seed(3); stock(x)
        torch.manual_seed(3); twin(x)
        for o, (_, m) in zip(outs, attention_layers(twin)):
            assert torch.equal(o, m.attn_weights) and torch.equal(m.attn_weights, m.attn_softmax)  # no dropout in training
            assert m.attn_weights.shape == (3, 2, 11, 11)
            assert (m.attn_weights.diagonal(dim1=-2, dim2=-1) == 0).all()
            assert (m.attn_weights + torch.eye(11) > 0).all()
    twin.eval()
    got = []
    listen(twin, lambda layer, attn, bias, logits, start, q0: got.append(logits.clone()))
    with torch.no_grad(): twin(x)
    assert all(g.diagonal(dim1=-2, dim2=-1).eq(-np.inf).all() and torch.isfinite(g.masked_fill(torch.eye(11, dtype=torch.bool), 0)).all() for g in got)

def test_spans_tstplus():
    m = tst()
    name, layer = attention_layers(m)[0]
    q, k = tokens_of(m, name, layer, 40, 16, 16).values()
    hand = [[0, 0], [0, 2], [2, 5], [5, 8], [8, 11], [11, 14], [14, 17], [17, 20], [20, 23], [23, 26], [26, 29], [29, 32],
            [32, 35], [35, 38], [38, 40], [40, 40]]  # kernel 3, stride 3, padding (4, 4)
    assert q[0] == k[0] == 'token' and q[1].tolist() == k[1].tolist() == hand
    assert (m.backbone.W_P[0].padding, m.backbone.W_P[1].kernel_size, m.backbone.W_P[1].stride) == ((4, 4), (3,), (3,))
    assert TSTPLUS.input_shape(m) == (3, 40)
    m = tst(max_seq_len=None)
    kind, spans = tokens_of(m, name, attention_layers(m)[0][1], 40, 40, 40)['key']
    assert kind == 'time step' and spans.tolist() == [[t, t + 1] for t in range(40)]
    m = tst(max_seq_len=None, kernel_size=3, stride=2, padding=1)  # kwargs: tsai's Conv1d makes the tokens
    assert TSTPLUS.input_shape(m) is None  # stride 2: several seq_len give 20 tokens
    kind, spans = tokens_of(m, name, attention_layers(m)[0][1], 40, 20, 20)['key']
    assert kind == 'token' and spans.tolist() == [[max(0, 2*i - 1), 2*i + 2] for i in range(20)]

def test_spans_tsit():
    m = tsit()
    name, layer = attention_layers(m)[0]
    kind, spans = tokens_of(m, name, layer, 40, 11, 11)['query']
    assert kind == 'token' and spans.tolist() == [[-1, -1]] + [[4*i, 4*i + 4] for i in range(10)]  # cls token first
    m = tsit(use_token=False, token_size=None, lsa=False)
    assert tokens_of(m, name, attention_layers(m)[0][1], 40, 40, 40)['key'][0] == 'time step'
    m = tsit(token_size=None, lsa=False)
    kind, spans = tokens_of(m, name, attention_layers(m)[0][1], 40, 41, 41)['key']
    assert kind == 'token' and spans.tolist() == [[-1, -1]] + [[t, t + 1] for t in range(40)]
    # a custom feature extractor: two strided convs, spans from gradients; by hand, token i covers steps [4i - 4, 4i + 5)
    fe = nn.Sequential(nn.Conv1d(3, 8, 5, stride=2, padding=2), nn.BatchNorm1d(8), nn.GELU(), nn.Conv1d(8, 8, 3, stride=2, padding=1))
    m = tsit(token_size=None, lsa=False, use_token=False, feature_extractor=fe).train()
    kind, spans = tokens_of(m, 'x', attention_layers(m)[0][1], 40, 10, 10)['key']
    assert kind == 'token' and spans.tolist() == [[max(0, 4*i - 4), min(40, 4*i + 5)] for i in range(10)]
    assert fe.training and TSTPLUS.input_shape(m) == (3, 40)
    # a custom tokenizer given as a callable (c_in, d_model) -> module
    m = tsit(token_size=None, lsa=False, tokenizer=lambda c, d: nn.Conv1d(c, d, 8, stride=8))
    assert tokens_of(m, 'x', attention_layers(m)[0][1], 40, 6, 6)['key'][1].tolist() == [[-1, -1]] + [[8*i, 8*i + 8] for i in range(5)]

def test_multitstplus_branches():
    m = multi()
    sel = attention_layers(m)
    assert [n for n, _ in sel] == [f'backbone.0.branches.{b}.encoder.layers.{l}.self_attn' for b in (0, 1) for l in (0, 1)]
    assert [TSTPLUS.variables(m, l) for _, l in sel] == [[0, 1]] * 2 + [[2]] * 2
    assert TSTPLUS.input_shape(m) == (3, 40)
    for n, l in sel: assert tokens_of(m, n, l, 40, 16, 16)['key'][1][[0, 1, 14, 15]].tolist() == [[0, 0], [0, 2], [38, 40], [40, 40]]
    m = MultiTSTPlus([[0, 2], [1]], 2, 40, d_model=8, n_heads=2, n_layers=1, d_ff=16)
    assert [TSTPLUS.variables(m, l) for _, l in attention_layers(m)] == [[0, 2], [1]] and TSTPLUS.input_shape(m) is None

def test_check_pickle_and_unswap():
    m = tst(store_attn=False)  # tsai's store_attn would pickle its own copy of the maps
    n0 = len(pickle.dumps(m))
    swap_attention(m).eval()
    assert all(TSTPLUS.n_heads(l) == 2 for _, l in attention_layers(m))
    with torch.no_grad(): m(torch.randn(64, 3, 40))  # kept: 2 layers × [64, 2, 16, 16]
    assert all(l.attn_weights is not None for _, l in attention_layers(m))
    m2 = pickle.loads(pickle.dumps(m))
    assert len(pickle.dumps(m)) < n0 + 2_000  # kept weights (260 kB) stay out of the pickle
    assert all(type(l) is MultiheadAttention_With_Weights and l.attn_weights is None for _, l in attention_layers(m2))
    unswap_attention(m)
    no_leftovers(m)
    assert all(type(l) is MultiheadAttention and 'keep_weights' not in l.__dict__ for _, l in attention_layers(m))
    m.backbone.encoder.layers[1].self_attn.sdp_attn = nn.Identity()
    with pytest.raises(ValueError, match="not tsai's ScaledDotProductAttention"): swap_attention(m)
    assert type(m.backbone.encoder.layers[0].self_attn) is MultiheadAttention  # checked before any was swapped

# ---------------------------------------------------------------- a real Learner (BasicMotions: 6 variables, 100 steps)

def learner(bm_data, arch, **cfg):
    X, y, splits = bm_data
    learn = TSClassifier(X, y, splits=splits, arch=arch, arch_config=cfg, tfms=[None, TSClassification()],
                         batch_tfms=TSStandardize(by_var=True), bs=16, verbose=False, seed=0)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    return learn

def stock_maps(model, x):
    "Maps of the stock model for x, from forward hooks on the stock MultiheadAttention layers"
    got = []
    hs = [m.register_forward_hook(lambda m, a, out: got.append(out[1])) for _, m in attention_layers(model)]
    model.eval()
    try:
        with torch.no_grad(): model(x.clone())
    finally:
        for h in hs: h.remove()
    return got

def check_learner(learn, tmp_path, tag, L):
    rec = AttnRecorder(batches=[0], samples=[0, 3])
    learn.add_cb(rec)
    with learn.no_bar(): learn.get_preds()
    r = rec.recording
    names = [n for n, _ in attention_layers(learn.model)]
    assert len(r) == 2 * len(names) and tuple(r.weights.shape[1:]) == (2, L, L)
    no_leftovers(learn.model)
    # the stock model on the whole batch 0, as recorded: float32 maps of 2 items recomputed alone could differ in the last bits
    xb = learn.dls.valid.new(shuffle=False, drop_last=False).one_batch()[0]
    assert torch.equal(r.filter(layer=names[0]).inputs, xb[[0, 3]].cpu())
    ref = stock_maps(learn.model, xb)
    for n, w in zip(names, ref):
        assert torch.equal(r.filter(layer=n).weights, w[[0, 3]].cpu())
    fig = learn.show_attention(layer=len(names) - 1, path=f'/tmp/tstplus_{tag}.png')
    assert fig is not None
    no_leftovers(learn.model)
    learn.remove_cb(rec)
    learn.export(tmp_path/'l.pkl')
    assert b'tsai_attnviz' not in (tmp_path/'l.pkl').read_bytes()
    assert all(type(m) is MultiheadAttention for _, m in attention_layers(load_learner(tmp_path/'l.pkl').model))
    return r

@pytest.mark.bitwise
def test_learner_tstplus(bm_data, tmp_path):
    "TSTPlus over 100 steps with max_seq_len=32: 32 tokens of 4 steps (padding (14, 14)), res_attention"
    learn = learner(bm_data, TSTPlus, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_seq_len=32)
    r = check_learner(learn, tmp_path, 'tstplus', 32)
    hand = [[0, 0]] * 3 + [[0, 2]] + [[4*i - 14, 4*i - 10] for i in range(4, 28)] + [[98, 100]] + [[100, 100]] * 3  # kernel 4, padding (14, 14)
    for name, _ in attention_layers(learn.model): assert r.tokens(name) == dict(query=('token', hand), key=('token', hand))
    learn.show_attention(view='series', path='/tmp/tstplus_tstplus_series.png')  # records on the spot: each token over its steps
    no_leftovers(learn.model)

@pytest.fixture(scope='module')
def tsit_learn(bm_data):
    "TSiTPlus with a cls token, LSA and 10-step tokens"
    return learner(bm_data, TSiTPlus, d_model=16, n_heads=2, depth=2, use_token=True, lsa=True, token_size=10, verbose=False)

@pytest.mark.bitwise
def test_learner_tsitplus(tsit_learn, tmp_path):
    "TSiTPlus with a cls token, LSA and 10-step tokens: 11 × 11 maps with a zero diagonal"
    r = check_learner(tsit_learn, tmp_path, 'tsitplus', 11)
    assert (r.weights.diagonal(dim1=-2, dim2=-1) == 0).all()

@pytest.mark.bitwise
def test_learner_multitstplus(bm_data, tmp_path):
    "MultiTSTPlus with two branches (4 + 2 variables): each branch's layers recorded under their own names"
    torch.manual_seed(0)  # tsai's build_ts_model would pass c_in as feat_list: an instance takes the groups
    learn = learner(bm_data, MultiTSTPlus([4, 2], 4, 100, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_seq_len=50))
    r = check_learner(learn, tmp_path, 'multitstplus', 50)
    assert sorted(set(r.layers)) == ['backbone.0.branches.0.encoder.layers.0.self_attn', 'backbone.0.branches.1.encoder.layers.0.self_attn']


def test_learner_lsa_entropy(tsit_learn):
    "Masked scores (-inf on LSA's diagonal) give the recorded entropies of the recorded maps, computed by hand"
    rec = AttnRecorder(batches=[0], samples=[0], stats=True)
    tsit_learn.add_cb(rec)
    try:
        with tsit_learn.no_bar(): tsit_learn.get_preds()
    finally: tsit_learn.remove_cb(rec)
    for r in rec.recording.records:
        assert torch.isfinite(r['entropy']).all() and torch.isfinite(r['stats']).all()
        torch.testing.assert_close(r['entropy'], -torch.special.xlogy(r['weights'], r['weights']).sum(-1), atol=1e-5, rtol=0)

def test_learner_series_view_of_tokens(tsit_learn):
    "The cls token is no time step; the ten others cover 10 steps each, in the recording and in the series view"
    try:
        tsit_learn.show_attention(view='series', path='/tmp/tstplus_tsit_series.png')
        r = tsit_learn.record_attention(batches=[0], samples=[0])
        spans = [[-1, -1]] + [[10*i, 10*i + 10] for i in range(10)]
        assert r.tokens('backbone.encoder.encoder.0.mha') == dict(query=('token', spans), key=('token', spans))
    finally:
        for cb in [c for c in tsit_learn.cbs if isinstance(c, AttnRecorder)]: tsit_learn.remove_cb(cb)
        no_leftovers(tsit_learn.model)
