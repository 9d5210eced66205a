"TSPerceiver's family: the perceiver Attention twin (cross-attention latents × time steps, latent self-attention)"
import copy, pickle
import numpy as np
import pytest, torch
import torch.nn as nn
from tsai.models.TSPerceiver import TSPerceiver, Attention, ScaledDotProductAttention
from tsai_attnviz.arch import swap_attention, unswap_attention, attention_layers, adapter_for, tokens_of, probe_spans
from tsai_attnviz.arch.perceiver import TSPerceiverAttention_With_Weights, TSPERCEIVER
from conftest import make_learner, no_leftovers, weighted_sum
from tsai_attnviz.core.stream import AttnConsumer, attached
from contextlib import nullcontext


def perceiver(seed=0, **kw):
    torch.manual_seed(seed)
    m = TSPerceiver(3, 4, 20, **{**dict(n_latents=6, d_latent=16, n_layers=4, cross_n_heads=2, self_n_heads=4,
                                        attn_dropout=0.2, fc_dropout=0.2), **kw})
    nn.init.normal_(m.latent_array)  # stock starts from zeros: the first cross-attention's queries would all be 0
    return m

def tab_input(bs=3, seed=3):
    "A batch with 2 categorical and 1 continuous feature: TSPerceiver takes (x_ts, (x_cat, x_cont))"
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bs, 3, 20, generator=g), (torch.stack([torch.randint(0, 3, (bs,), generator=g), torch.randint(0, 5, (bs,), generator=g)], 1),
                                                 torch.randn(bs, 1, generator=g))

class Recv(AttnConsumer):
    def __init__(self): self.got = []
    def receive(self, c): self.got.append((c.layer, c.positions[0], c.q0, c.softmax.clone(), c.logits.clone(), c.bias))

def layers_of(m): return [l for _, l in attention_layers(m)]

def stock_maps(model, x):
    "Every call's map, outside the package: forward hooks on a STOCK copy's ScaledDotProductAttention, which returns (context, attn)"
    m, got = copy.deepcopy(model).eval(), []
    names = {id(a.attn): n for n, a in m.named_modules() if type(a) is Attention}
    hs = [s.register_forward_hook(lambda mod, i, o: got.append((names[id(mod)], o[1])))
          for s in m.modules() if type(s) is ScaledDotProductAttention]
    with torch.no_grad(): m(x)
    for h in hs: h.remove()
    return got


# -- outputs and gradients bitwise --------------------------------------------------------------------------------------
def check_bitwise(stock, swapped, x):
    for train in (False, True):
        stock.train(train); swapped.train(train)
        for keep, recv in [(True, None), (False, None), (False, Recv()), (True, Recv())]:
            for l in layers_of(swapped): l.keep_weights = keep
            with attached(swapped, recv) if recv is not None else nullcontext():
                with torch.no_grad():
                    torch.manual_seed(1); o1 = stock(x)
                    torch.manual_seed(1); o2 = swapped(x)
                assert torch.equal(o1, o2), (train, keep)
                torch.manual_seed(2); o1 = stock(x)
                torch.manual_seed(2); o2 = swapped(x)
            assert torch.equal(o1, o2), (train, keep)
            weighted_sum(o1).backward()
            weighted_sum(o2).backward()
            for (n, a), b in zip(stock.named_parameters(), swapped.parameters()):
                assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), n
            stock.zero_grad(); swapped.zero_grad()

@pytest.mark.bitwise
@pytest.mark.parametrize('share_weights', [True, False])
def test_bitwise(share_weights):
    stock, swapped = perceiver(share_weights=share_weights), swap_attention(perceiver(share_weights=share_weights))
    assert {type(l) for l in layers_of(swapped)} == {TSPerceiverAttention_With_Weights}
    assert len(layers_of(swapped)) == (4 if share_weights else 8)
    check_bitwise(stock, swapped, torch.randn(3, 3, 20))

@pytest.mark.bitwise
def test_bitwise_with_categorical_and_continuous_inputs():
    kw = dict(cat_szs=[3, 5], n_cont=1, n_layers=2)
    check_bitwise(perceiver(**kw), swap_attention(perceiver(**kw)), tab_input())

@pytest.mark.bitwise
def test_res_attention_layer_bitwise():
    "The layer on its own with res_attention=True (TSPerceiver never sets it) also returns stock's scores"
    torch.manual_seed(0)
    a = Attention(16, n_heads=4, attn_dropout=0.3, res_attention=True)
    b = swap_attention(copy.deepcopy(a))
    x = torch.randn(2, 5, 16, requires_grad=True)
    for train in (False, True):
        a.train(train); b.train(train)
        torch.manual_seed(0); oa, sa = a(x)
        torch.manual_seed(0); ob, sb = b(x)
        assert torch.equal(oa, ob) and torch.equal(sa, sb)
        assert torch.equal(b.attn_weights, torch.softmax(sa, -1))


# -- maps: every call's, exactly as stock computes them -------------------------------------------------------------------
@pytest.mark.bitwise
def test_maps_per_call_with_shared_weights():
    "With share_weights blocks 1, 2, 3 are one module: a consumer gets one map per call, equal to stock's"
    stock, swapped = perceiver(), swap_attention(perceiver(), keep_weights=False).eval()
    x = torch.randn(3, 3, 20)
    names = {id(l): n for n, l in attention_layers(swapped)}
    r = Recv()
    with attached(swapped, r), torch.no_grad(): swapped(x)
    ref = stock_maps(stock, x)
    assert [names[id(l)] for l, *_ in r.got] == [n for n, _ in ref] == \
           ['attn.0.0.attn', 'attn.0.1.layers.0.1'] + ['attn.1.0.attn', 'attn.1.1.layers.0.1'] * 3
    assert [tuple(sm.shape) for *_, sm, _, _ in r.got[:2]] == [(3, 2, 6, 20), (3, 4, 6, 6)]  # non-square cross-attention
    for (l, start, q0, sm, logits, bias), (_, w) in zip(r.got, ref):
        assert start == 0 and q0 == 0 and bias is None
        assert torch.equal(sm, w)
        assert torch.equal(torch.softmax(logits, -1), sm)
    assert all(l.attn_weights is None for l in layers_of(swapped))

@pytest.mark.bitwise
def test_kept_weights_are_the_last_call():
    stock, swapped = perceiver(), swap_attention(perceiver()).eval()
    x = torch.randn(3, 3, 20)
    with torch.no_grad(): swapped(x)
    ref = dict(stock_maps(stock, x))  # the last call of each layer
    for n, l in attention_layers(swapped):
        assert torch.equal(l.attn_weights, ref[n]) and torch.equal(l.attn_softmax, l.attn_weights)
    torch.testing.assert_close(swapped.attn[1][0].attn.attn_weights.sum(-1), torch.ones(3, 2, 6))


# -- tokens ---------------------------------------------------------------------------------------------------------------
def test_tokens():
    m = perceiver(cat_szs=[3, 5], n_cont=1, n_layers=2)
    cross, selfa = m.attn[0][0].attn, m.attn[0][1].layers[0][1]
    t = tokens_of(m, 'attn.0.0.attn', cross, 20, 6, 23)
    assert t['query'][0] == 'latent' and t['query'][1].tolist() == [[-1, -1]] * 6
    assert t['key'][0] == 'time step'
    assert t['key'][1].tolist() == [[i, i + 1] for i in range(20)] + [[-1, -1]] * 3  # then 2 categorical, 1 continuous
    t = tokens_of(m, 'attn.0.1.layers.0.1', selfa, 20, 6, 6)
    assert t['query'] [0] == t['key'][0] == 'latent' and t['key'][1].tolist() == [[-1, -1]] * 6
    # the cross-attention's keys as the model builds them (to_ts_emb of each step, plus position encodings), by gradients
    p = perceiver()
    assert probe_spans(lambda u: p.to_ts_emb(u.transpose(1, 2)) + p.ts_pos_enc + p.pos_enc, 3, 20).tolist() == [[i, i + 1] for i in range(20)]

def test_adapter_facts():
    m = perceiver()
    a = adapter_for(m)
    assert a is TSPERCEIVER and (a.token, a.maps, a.dropout) == ('latent', 'exact', 'none')
    assert [a.n_heads(l) for l in layers_of(m)] == [2, 4, 2, 4]  # cross_n_heads, self_n_heads
    assert a.input_shape(m) == (3, 20)
    assert a.input_shape(perceiver(cat_szs=[3], n_layers=2)) is None  # takes a tuple

def test_pickle_and_unswap():
    m = swap_attention(perceiver()).eval()
    with torch.no_grad(): m(torch.randn(2, 3, 20))
    with attached(m, Recv(), layers=[m.attn[0][0].attn]): c = pickle.loads(pickle.dumps(m))
    assert all(l.attn_weights is None and not l.publishing for l in layers_of(c))
    unswap_attention(m)
    no_leftovers(m)
    assert b'tsai_attnviz' not in pickle.dumps(m)


# -- a real Learner ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def perceiver_learner(bm_data):
    "TSPerceiver trained 2 epochs on BasicMotions: cross-attention 1 head, latent self-attention 2 heads, blocks 1-2 shared"
    X, y, splits = bm_data
    learn = make_learner(X, y, splits, arch=TSPerceiver,
                         arch_config=dict(seq_len=100, n_latents=8, d_latent=16, n_layers=3, self_n_heads=2))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3)
    return learn

def test_learner_records_and_draws(perceiver_learner, tmp_path):
    "Records of each call, the cross-attention's [H, n_latents, seq_len], equal to stock's maps of the inputs recorded"
    from tsai_attnviz.record.recorder import AttnRecorder
    import tsai_attnviz.show.learner  # noqa: F401  (Learner.show_attention)
    learn = perceiver_learner
    stock = copy.deepcopy(learn.model).cpu()
    learn.add_cb(AttnRecorder(max_len=None))
    with learn.no_bar(): learn.get_preds()
    rec = learn.attn_recorder.recording
    cross = rec.filter(layer='attn.0.0.attn')
    assert len(cross) == 16 and cross.weights.shape == (16, 1, 8, 100)
    ref = stock_maps(stock, cross.inputs.float())
    torch.testing.assert_close(cross.weights.float(), dict(ref)['attn.0.0.attn'], rtol=0, atol=1e-6)
    # block 2 reuses block 1's layers (share_weights): one record per call, each equal to that call's stock map
    shared = rec.filter(layer='attn.1.0.attn')
    assert sorted({r['call'] for r in shared.records}) == [0, 1]
    for c in (0, 1):
        got = shared.filter(call=c).weights.float()
        torch.testing.assert_close(got, [w for n, w in ref if n == 'attn.1.0.attn'][c], rtol=0, atol=1e-6)
    assert rec.meta['tokens']['attn.0.0.attn'] == dict(query=('latent', [[-1, -1]] * 8), key=('time step', [[i, i + 1] for i in range(100)]))
    # tsai's zero-initialised latents stay alike through training: every row of the map is the same, to rounding (rows of one
    # product: a BLAS may compute the tail rows of its tiles by another instruction sequence, so not bitwise on every CPU)
    w = cross.weights.float()
    for i in range(8): torch.testing.assert_close(w[:, :, i], w[:, :, 0], rtol=0, atol=1e-6 * w.abs().max().item())
    learn.show_attention().savefig('/tmp/perceiver_show_attention.png')
    learn.show_attention(view='series').savefig('/tmp/perceiver_series.png')  # what each time step receives
    no_leftovers(learn.model)
    learn.remove_cb(learn.attn_recorder)
    learn.export(tmp_path/'learner.pkl')
    assert b'tsai_attnviz' not in (tmp_path/'learner.pkl').read_bytes()

def test_learner_draws_a_layer_with_more_heads_than_the_first(perceiver_learner):
    from tsai_attnviz.record.recorder import AttnRecorder
    import tsai_attnviz.show.learner  # noqa: F401
    learn = perceiver_learner
    learn.add_cb(AttnRecorder(max_len=None))
    try:
        with learn.no_bar(): learn.get_preds()
        fig = learn.show_attention(layer='attn.0.1.layers.0.1')  # latents × latents, 2 heads
        fig.savefig('/tmp/perceiver_self_attention.png')
        assert len([ax for ax in fig.axes if ax.get_title().startswith('Head')]) == 2
    finally: learn.remove_cb(learn.attn_recorder)
