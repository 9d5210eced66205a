"RNNAttention's family (RNN/LSTM/GRU, plain and Plus): twins against stock (bitwise, maps from a hook on the stock layer), tokens, a real Learner"
import copy, pickle
import pytest, torch, torch.nn as nn
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from tsai.models.RNNAttention import RNNAttention, LSTMAttention, GRUAttention, _MultiHeadAttention as MHA
from tsai.models.RNNAttentionPlus import RNNAttentionPlus, LSTMAttentionPlus, GRUAttentionPlus, _MultiHeadAttention as MHAPlus
from tsai_attnviz.all import *
from tsai_attnviz.arch import swap_attention, attention_layers, adapter_for, tokens_of
from conftest import make_learner, no_leftovers, seeded_run, hooked_attention, listen

ARCHS = [RNNAttention, LSTMAttention, GRUAttention, RNNAttentionPlus, LSTMAttentionPlus, GRUAttentionPlus]

def make(arch, seed=0, bidirectional=True, **kw):
    "Hidden size 8 (d_model 16 when bidirectional), 3 heads of d_k=4, d_v=7: d_k·n_heads ≠ d_model; dropout in the RNN and encoder"
    torch.manual_seed(seed)
    return arch(3, 4, 12, **{**dict(hidden_size=8, rnn_layers=2, rnn_dropout=0.3, encoder_layers=2, n_heads=3, d_k=4, d_v=7,
                                    d_ff=16, encoder_dropout=0.3, bidirectional=bidirectional), **kw})

run = seeded_run

def stock_maps(model, x, train): return hooked_attention(model, x, train, (MHA, MHAPlus))

def test_two_stock_classes_two_twins():
    assert MHA is not MHAPlus  # tsai copies the class into each module
    a = adapter_for(make(RNNAttention))
    assert set(a.twins) == {MHA, MHAPlus} and len(set(a.twins.values())) == 2
    assert all(t.__name__.endswith('_With_Weights') for t in a.twins.values())

@pytest.mark.bitwise
@pytest.mark.parametrize('arch', ARCHS, ids=lambda a: a.__name__)
@pytest.mark.parametrize('bidirectional', [False, True])
def test_outputs_and_gradients_bitwise(arch, bidirectional):
    x = torch.randn(4, 3, 12)
    for keep, receiver in [(True, False), (False, True)]:
        stock = make(arch, bidirectional=bidirectional)
        swapped = swap_attention(copy.deepcopy(stock), keep_weights=keep)
        assert list(swapped.state_dict()) == list(stock.state_dict())
        got = []
        if receiver:
            listen(swapped, lambda l, sm, bias, logits, start, q0: got.append(sm.clone()))
        for train in (False, True): assert torch.equal(run(stock, x, train), run(swapped, x, train))
        for (n, a), b in zip(stock.named_parameters(), swapped.parameters()): assert torch.equal(a.grad, b.grad), n
        assert all((lay.attn_weights is not None) == keep for _, lay in attention_layers(swapped))
        assert len(got) == (4 if receiver else 0)

@pytest.mark.bitwise
@pytest.mark.parametrize('arch', [LSTMAttention, GRUAttentionPlus], ids=lambda a: a.__name__)
@pytest.mark.parametrize('train', [False, True])
def test_maps_equal_what_the_stock_layer_returns(arch, train):
    stock = make(arch)
    swapped = swap_attention(copy.deepcopy(stock))
    got = []
    listen(swapped, lambda l, sm, bias, logits, start, q0: got.append((sm.clone(), logits.clone())))
    x = torch.randn(4, 3, 12)
    ref = stock_maps(stock, x, train)
    run(swapped, x, train)
    assert len(ref) == len(got) == 2
    for (z, a), (sm, logits), (_, lay) in zip(ref, got, attention_layers(swapped)):
        assert a.shape == (4, 3, 12, 12)
        assert torch.equal(lay.attn_weights, a) and torch.equal(sm, a)
        q = (z @ lay.W_Q.weight.T).view(4, 12, 3, 4).transpose(1, 2)  # by hand: q·kᵀ/√d_k, d_k = 4
        k = (z @ lay.W_K.weight.T).view(4, 12, 3, 4).transpose(1, 2)
        torch.testing.assert_close(logits, q @ k.transpose(-1, -2) / 4 ** 0.5, rtol=0, atol=1e-5)

@pytest.mark.parametrize('arch', [RNNAttention, LSTMAttentionPlus], ids=lambda a: a.__name__)
@pytest.mark.parametrize('bidirectional', [False, True])
def test_shape_and_tokens(arch, bidirectional):
    m = make(arch, bidirectional=bidirectional)
    a = adapter_for(m)
    assert a.name == 'RNNAttention' and a.input_shape(m) == (3, 12) and a.input_shape(nn.Sequential(m)) == (3, 12)
    for name, lay in attention_layers(m):
        t = tokens_of(m, name, lay, 12, 12, 12)
        for kind, sp in t.values(): assert kind == 'time step' and sp.tolist() == [[s, s + 1] for s in range(12)]

def test_a_custom_head_leaves_seq_len_open():
    head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4))
    m = RNNAttentionPlus(3, 4, 12, hidden_size=8, n_heads=2, encoder_layers=1, custom_head=head)
    with torch.no_grad(): m(torch.randn(2, 3, 20))  # other lengths run
    assert adapter_for(m).input_shape(m) is None

def test_learner_records_draws_and_exports_stock(bm_data, tmp_path):
    "A bidirectional LSTMAttentionPlus on BasicMotions: recorded maps are the stock layers' maps, one token per step"
    X, y, splits = bm_data
    learn = make_learner(X, y, splits, arch=LSTMAttentionPlus,
                         arch_config=dict(hidden_size=8, bidirectional=True, encoder_layers=1, n_heads=3, d_k=4, d_v=4, d_ff=16))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-3)
    rec = AttnRecorder()
    learn.add_cb(rec)
    with learn.no_bar(): learn.get_preds()
    r = rec.recording
    assert r.weights.shape == (16, 3, 100, 100) and r.heads == [0, 1, 2]
    no_leftovers(learn.model)
    ref = stock_maps(learn.model, r.inputs, False)
    torch.testing.assert_close(r.weights, ref[0][1], rtol=0, atol=1e-6)
    fig = learn.show_attention(path='/tmp/rnnattention_learner.png')
    assert len([ax for ax in fig.axes if ax.images]) == 3
    plt.close('all')
    no_leftovers(learn.model)
    assert b'tsai_attnviz' not in pickle.dumps(learn.model)
    learn.remove_cb(rec)
    learn.export(tmp_path/'rnn.pkl')
    assert b'tsai_attnviz' not in (tmp_path/'rnn.pkl').read_bytes()
