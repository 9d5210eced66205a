"TST's family: the twin against stock TST (bitwise outputs and gradients, maps from a hook on the stock layer), token spans by hand, a real Learner"
import copy, pickle
import numpy as np, pytest, torch
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from tsai.models.TST import TST, _MultiHeadAttention
from tsai_attnviz.all import *
from tsai_attnviz.arch import swap_attention, attention_layers, adapter_for, tokens_of
from tsai_attnviz.arch.tst import tst_spans
from conftest import make_learner, no_leftovers, seeded_run, hooked_attention, listen

# 16 channels, 3 heads of d_k=4 and d_v=7: d_k·n_heads ≠ d_model, which tsai allows
CONFIGS = {'linear': {}, 'max_seq_len': dict(max_seq_len=5), 'conv kwargs': dict(kernel_size=3, stride=2, padding=1)}

def make(seed=0, seq_len=12, **kw):
    torch.manual_seed(seed)
    return TST(3, 4, seq_len, d_model=16, n_heads=3, d_k=4, d_v=7, n_layers=2, d_ff=16, dropout=0.3, **kw)

run = seeded_run

def stock_maps(model, x, train): return hooked_attention(model, x, train, (_MultiHeadAttention,))

@pytest.mark.bitwise
@pytest.mark.parametrize('cfg', CONFIGS)
@pytest.mark.parametrize('keep', [True, False])
@pytest.mark.parametrize('receiver', [False, True])
def test_outputs_and_gradients_bitwise(cfg, keep, receiver):
    stock = make(**CONFIGS[cfg])
    swapped = swap_attention(copy.deepcopy(stock), keep_weights=keep)
    assert list(swapped.state_dict()) == list(stock.state_dict())
    got = []
    if receiver:
        listen(swapped, lambda l, sm, bias, logits, start, q0: got.append(sm.clone()))
    x = torch.randn(4, 3, 12)
    for train in (False, True):
        assert torch.equal(run(stock, x, train), run(swapped, x, train))
    for (n, a), b in zip(stock.named_parameters(), swapped.parameters()): assert torch.equal(a.grad, b.grad), n
    assert all((lay.attn_weights is not None) == keep for _, lay in attention_layers(swapped))
    assert len(got) == (4 if receiver else 0)  # 2 layers × 2 forwards

@pytest.mark.bitwise
@pytest.mark.parametrize('train', [False, True])
def test_maps_equal_what_the_stock_layer_returns(train):
    stock = make()
    swapped = swap_attention(copy.deepcopy(stock))
    got = []
    listen(swapped, lambda l, sm, bias, logits, start, q0: got.append((sm.clone(), logits.clone())))
    x = torch.randn(4, 3, 12)
    ref = stock_maps(stock, x, train)
    run(swapped, x, train)
    assert len(ref) == len(got) == 2
    for (z, a), (sm, logits), (_, lay) in zip(ref, got, attention_layers(swapped)):
        assert a.shape == (4, 3, 12, 12)  # the module's own n_heads
        assert torch.equal(lay.attn_weights, a) and torch.equal(sm, a)
        # the scores by hand from the stock layer's parameters: q·kᵀ/√d_k, d_k = 4
        q = (z @ lay.W_Q.weight.T).view(4, 12, 3, 4).transpose(1, 2)
        k = (z @ lay.W_K.weight.T).view(4, 12, 3, 4).transpose(1, 2)
        torch.testing.assert_close(logits, q @ k.transpose(-1, -2) / 4 ** 0.5, rtol=0, atol=1e-5)

def hull_of_dependence(wp, c_in, seq_len):
    "Spans from the Jacobian of the input encoding: first and last step each token depends on (empty: all padding)"
    torch.manual_seed(0)
    x = torch.randn(1, c_in, seq_len)
    J = torch.autograd.functional.jacobian(lambda x: wp(x), x)[0]  # [d_model, n_tokens, 1, c_in, seq_len]
    dep = J.abs().sum((0, 2, 3)) > 0                               # [n_tokens, seq_len]
    out = []
    for row in dep:
        t = row.nonzero().flatten()
        out.append([int(t[0]), int(t[-1]) + 1] if len(t) else None)
    return out

def test_spans_by_hand():
    # seq_len=40, max_seq_len=16: kernel = stride = ceil(40/16) = 3, padding 48 − 40 = 8 → (4, 4); token i reads
    # padded positions 3i..3i+2 = steps 3i−4..3i−2: token 0 is all padding, token 1 is steps 0..1, token 15 all padding
    m = make(seq_len=40, max_seq_len=16)
    kind, sp = tst_spans(m, 40)
    assert kind == 'patch' and len(sp) == 16 == m.W_pos.shape[0]
    assert sp[:3].tolist() == [[0, 0], [0, 2], [2, 5]] and sp[-2:].tolist() == [[38, 40], [40, 40]]
    dep = hull_of_dependence(m.W_P, 3, 40)
    assert dep[0] is None and dep[-1] is None and [list(s) for s in sp[1:-1]] == dep[1:-1]
    # seq_len=10, max_seq_len=4: kernel 3, padding (1, 1): [0, 2), [2, 5), [5, 8), [8, 10)
    assert tst_spans(make(seq_len=10, max_seq_len=4), 10)[1].tolist() == [[0, 2], [2, 5], [5, 8], [8, 10]]
    # seq_len=12, max_seq_len=5: kernel 3, padding 15 − 12 = 3 → (1, 2), the odd one on the right
    m = make(max_seq_len=5)
    assert tst_spans(m, 12)[1].tolist() == [[0, 2], [2, 5], [5, 8], [8, 11], [11, 12]] == hull_of_dependence(m.W_P, 3, 12)
    # conv kwargs kernel 3, stride 2, padding 1 on 12 steps: 6 tokens, token i reads steps 2i−1..2i+1
    m = make(**CONFIGS['conv kwargs'])
    assert tst_spans(m, 12)[1].tolist() == [[0, 2], [1, 4], [3, 6], [5, 8], [7, 10], [9, 12]] == hull_of_dependence(m.W_P, 3, 12)
    # dilation 2, kernel 3, padding 2 on 13 steps: token i reads steps 2i−2, 2i, 2i+2 (hull [2i−2, 2i+3))
    m = make(seq_len=13, kernel_size=3, stride=2, dilation=2, padding=2)
    assert tst_spans(m, 13)[1].tolist() == [[0, 3], [0, 5], [2, 7], [4, 9], [6, 11], [8, 13], [10, 13]] == hull_of_dependence(m.W_P, 3, 13)
    # 'same' with an even kernel: PyTorch pads 1 on the left, 2 on the right: token t reads t−1..t+2
    m = make(seq_len=6, kernel_size=4, padding='same')
    assert tst_spans(m, 6)[1].tolist() == [[0, 3], [0, 4], [1, 5], [2, 6], [3, 6], [4, 6]] == hull_of_dependence(m.W_P, 3, 6)
    # a reflecting pad repeats steps: token 0 reads steps 1, 0, 1; the last reads 4, 5, 4
    m = make(seq_len=6, kernel_size=3, padding=1, padding_mode='reflect')
    assert tst_spans(m, 6)[1].tolist() == [[0, 2], [0, 3], [1, 4], [2, 5], [3, 6], [4, 6]] == hull_of_dependence(m.W_P, 3, 6)
    # no downsampling: one token per step
    kind, sp = tst_spans(make(), 12)
    assert kind == 'time step' and sp.tolist() == [[t, t + 1] for t in range(12)]

def test_registry_shape_and_tokens():
    m = make(max_seq_len=5)  # kernel ceil(12/5) = 3, padding 15 − 12 = 3 → (1, 2)
    a = adapter_for(m)
    assert a.name == 'TST' and a.input_shape(m) == (3, 12) and a.input_shape(torch.nn.Sequential(m)) == (3, 12)
    name, lay = attention_layers(m)[1]
    t = tokens_of(m, name, lay, 12, 5, 5)
    assert t['query'][0] == t['key'][0] == 'patch'
    assert t['key'][1].tolist() == [[0, 2], [2, 5], [5, 8], [8, 11], [11, 12]]
    with pytest.raises(ValueError, match='attends over 4 tokens'): tokens_of(m, name, lay, 12, 4, 4)
    assert pickle.loads(pickle.dumps(swap_attention(m))).encoder.layers[0].self_attn.attn_weights is None

def test_learner_records_draws_and_exports_stock(bm_data, tmp_path):
    "A TST downsampling BasicMotions' 100 steps to 25 patches of 4: recorded maps are the stock layers' maps"
    X, y, splits = bm_data
    learn = make_learner(X, y, splits, arch=TST, arch_config=dict(d_model=16, n_heads=3, d_k=4, d_v=7, n_layers=2, d_ff=16,
                                                                  max_seq_len=25))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-3)
    rec = AttnRecorder()
    learn.add_cb(rec)
    with learn.no_bar(): learn.get_preds()
    r = rec.recording
    names = [n for n, _ in attention_layers(learn.model)]
    assert r.layers == [names[0]] * 16 + [names[1]] * 16 and r.heads == [0, 1, 2]
    assert r.weights.shape == (32, 3, 25, 25)
    no_leftovers(learn.model)
    ref = stock_maps(learn.model, r.inputs[:16], False)
    torch.testing.assert_close(r.weights[:16], ref[0][1], rtol=0, atol=1e-6)
    torch.testing.assert_close(r.weights[16:], ref[1][1], rtol=0, atol=1e-6)
    fig = learn.show_attention(path='/tmp/tst_learner.png')
    assert len([ax for ax in fig.axes if ax.images]) == 3
    plt.close('all')
    no_leftovers(learn.model)
    assert b'tsai_attnviz' not in pickle.dumps(learn.model)
    learn.remove_cb(rec)
    learn.export(tmp_path/'tst.pkl')
    assert b'tsai_attnviz' not in (tmp_path/'tst.pkl').read_bytes()
