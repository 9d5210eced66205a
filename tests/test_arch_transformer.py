"TransformerModel's family: torch's TransformerEncoderLayer twin runs the stock forward (bitwise), maps recomputed beside it"
import copy, pickle
import numpy as np
import pytest, torch
import torch.nn as nn
from tsai.models.TransformerModel import TransformerModel
from tsai.models.TransformerRNNPlus import TransformerRNNPlus, TransformerLSTMPlus, TransformerGRUPlus
from tsai_attnviz.arch import swap_attention, unswap_attention, attention_layers, adapter_for, tokens_of, probe_spans
from tsai_attnviz.arch.transformer import TransformerEncoderLayer_With_Weights, TRANSFORMER
from conftest import make_learner, no_leftovers, weighted_sum
from tsai_attnviz.core.stream import AttnConsumer, attached
from contextlib import nullcontext


def tsai_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerModel(3, 4, **{**dict(d_model=16, n_head=2, d_ffn=32, n_layers=2, dropout=0.3), **kw})

def encoder(seed=0, batch_first=True, norm_first=False, n_layers=2, nested=False, dropout=0.3):
    "A plain torch encoder: with batch_first, eval and no_grad, each layer runs torch's one fused op"
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=nested)

class Recv(AttnConsumer):
    "A consumer that wants some samples and copies what it gets"
    def __init__(self, want=None): self.want, self.got = want, []
    def wanted(self, layer, bs): return list(range(bs)) if self.want is None else self.want
    def receive(self, c): self.got.append((c.layer, c.positions[0], c.q0, c.softmax.clone(), c.logits.clone()))

def layers_of(m): return [l for _, l in attention_layers(m)]

def mha_maps(stock, x, i=0, call=lambda m, x: m(x)):
    """Layer i's maps, outside the package: the input and masks its `self_attn` gets in a copy of the STOCK model
    (forward pre-hook), through torch's own MultiheadAttention with need_weights=True, average_attn_weights=False"""
    m, got = copy.deepcopy(stock).eval(), {}
    mha = [l for l in m.modules() if type(l) is nn.TransformerEncoderLayer][i].self_attn
    h = mha.register_forward_pre_hook(lambda mod, a, kw: got.update(q=a[0], kw=kw), with_kwargs=True)
    with torch.no_grad(): call(m, x)
    h.remove()
    kw = got['kw']
    with torch.no_grad():
        w = mha(got['q'], got['q'], got['q'], attn_mask=kw.get('attn_mask'), key_padding_mask=kw.get('key_padding_mask'),
                need_weights=True, average_attn_weights=False)[1]
    return w if w.dim() == 4 else w[None]  # [bs, H, L, L]


# -- outputs and gradients bitwise --------------------------------------------------------------------------------------
def check_bitwise(stock, swapped, x, call=lambda m, x: m(x)):
    for train in (False, True):
        stock.train(train); swapped.train(train)
        for keep, recv in [(True, None), (False, None), (False, Recv()), (True, Recv([1]))]:
            for l in layers_of(swapped): l.keep_weights = keep
            with attached(swapped, recv) if recv is not None else nullcontext():
                with torch.no_grad():
                    torch.manual_seed(1); o1 = call(stock, x)
                    torch.manual_seed(1); o2 = call(swapped, x)
                assert torch.equal(o1, o2), (train, keep, recv)
                torch.manual_seed(2); o1 = call(stock, x)
                torch.manual_seed(2); o2 = call(swapped, x)
            assert torch.equal(o1, o2), (train, keep, recv)
            weighted_sum(o1).backward()
            weighted_sum(o2).backward()
            for (n, a), b in zip(stock.named_parameters(), swapped.parameters()):
                assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), n
            stock.zero_grad(); swapped.zero_grad()
            if recv is not None: assert recv.got and all(sm.shape[0] == 1 for *_, sm, _ in recv.got)

@pytest.mark.bitwise
def test_tsai_transformer_model_bitwise():
    "tsai's TransformerModel (batch_first=False: the attention's batch is dimension 1), eval and train with dropout 0.3"
    stock, swapped = tsai_model(), swap_attention(tsai_model())
    assert [type(l).__name__ for l in layers_of(swapped)] == ['TransformerEncoderLayer_With_Weights'] * 2
    check_bitwise(stock, swapped, torch.randn(5, 3, 20))

@pytest.mark.bitwise
@pytest.mark.parametrize('norm_first', [False, True])
def test_batch_first_fused_path_bitwise(norm_first, monkeypatch):
    "batch_first layers in eval + no_grad run torch's fused layer op, stock and swapped alike: the twin adds no hook"
    stock, swapped = encoder(norm_first=norm_first), swap_attention(encoder(norm_first=norm_first))
    x = torch.randn(3, 11, 16)
    check_bitwise(stock, swapped, x)
    calls = []
    fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, '_transformer_encoder_layer_fwd', lambda *a: calls.append(1) or fused(*a))
    for m in (stock, swapped):
        calls.clear(); m.eval()
        with torch.no_grad(): m(x)
        assert len(calls) == 2, type(m.layers[0])  # one fused call per layer: MultiheadAttention.forward never ran
    l = swapped.layers[0]
    l.keep_weights = True
    calls.clear()
    with torch.no_grad(): swapped(x)
    assert len(calls) == 2 and l.attn_weights.shape == (3, 4, 11, 11)


# -- maps against torch's MultiheadAttention(need_weights=True) ---------------------------------------------------------
def test_maps_tsai_model():
    stock, swapped = tsai_model(), swap_attention(tsai_model()).eval()
    x = torch.randn(5, 3, 20)
    with torch.no_grad(): swapped(x)
    for i, l in enumerate(layers_of(swapped)):
        assert l.attn_weights.shape == (5, 2, 20, 20) and l.attn_softmax is l.attn_weights
        torch.testing.assert_close(l.attn_weights, mha_maps(stock, x, i), rtol=0, atol=1e-6)
        assert not torch.allclose(l.attn_weights[0], l.attn_weights[1])  # each sample its own map: dimension 1 is the batch

@pytest.mark.parametrize('batch_first,norm_first', [(True, False), (False, True), (True, True)])
def test_maps_with_masks(batch_first, norm_first):
    "A causal bool mask and a key padding mask; with norm_first the attention's input is norm1(x)"
    stock = encoder(batch_first=batch_first, norm_first=norm_first)
    swapped = swap_attention(copy.deepcopy(stock)).eval()
    bs, L = 3, 9
    x = torch.randn(bs, L, 16) if batch_first else torch.randn(L, bs, 16)
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    pad = torch.arange(L)[None] >= torch.tensor([9, 6, 4])[:, None]                # [bs, L], True: padding
    call = lambda m, x: m(x, mask=causal, src_key_padding_mask=pad)
    with torch.no_grad(): call(swapped, x)
    for i, l in enumerate(layers_of(swapped)):
        w = l.attn_weights
        torch.testing.assert_close(w, mha_maps(stock, x, i, call), rtol=0, atol=1e-6)
        assert (w[:, :, torch.triu_indices(L, L, 1)[0], torch.triu_indices(L, L, 1)[1]] == 0).all()  # nothing ahead
        assert (w[2, :, :, 4:] == 0).all() and (w[1, :, :, 6:] == 0).all()                          # no padded key

def test_maps_float_mask_and_per_head_mask():
    "A float mask [bs·H, L, L] (one per sample and head) is added to the scores"
    stock = encoder(batch_first=True)
    swapped = swap_attention(copy.deepcopy(stock)).eval()
    x, bias = torch.randn(2, 7, 16), torch.randn(2 * 4, 7, 7)
    call = lambda m, x: m(x, mask=bias)
    with torch.no_grad(): call(swapped, x)
    torch.testing.assert_close(swapped.layers[0].attn_weights, mha_maps(stock, x, 0, call), rtol=0, atol=1e-6)

@pytest.mark.bitwise
def test_nested_fast_path(monkeypatch):
    "batch_first + key padding mask in eval: the encoder packs the batch as a nested tensor; each sample's map is its own length"
    stock = encoder(batch_first=True, nested=True).eval()
    swapped = swap_attention(copy.deepcopy(stock)).eval()
    lens = [9, 6, 4]
    x = torch.randn(3, 9, 16)
    pad = torch.arange(9)[None] >= torch.tensor(lens)[:, None]
    calls, nest = [], torch._nested_tensor_from_mask
    monkeypatch.setattr(torch, '_nested_tensor_from_mask', lambda *a, **k: calls.append(1) or nest(*a, **k))
    with torch.no_grad(): o1, o2 = stock(x, src_key_padding_mask=pad), swapped(x, src_key_padding_mask=pad)
    assert len(calls) == 2 and torch.equal(o1, o2)                                       # both ran nested
    w = swapped.layers[0].attn_weights                                                   # [bs, H, 9, 9], zero-padded
    assert w.shape == (3, 4, 9, 9)
    for p, n in enumerate(lens):
        with torch.no_grad():
            ref = stock.layers[0].self_attn(x[p:p+1, :n], x[p:p+1, :n], x[p:p+1, :n], need_weights=True, average_attn_weights=False)[1]
        torch.testing.assert_close(w[p:p+1, :, :n, :n], ref, rtol=0, atol=1e-6)
        assert (w[p, :, n:] == 0).all() and (w[p, :, :, n:] == 0).all()


# -- a consumer ---------------------------------------------------------------------------------------------------------
def test_receiver_gets_wanted_samples_only():
    stock, swapped = tsai_model(), swap_attention(tsai_model(), keep_weights=False).eval()
    x = torch.randn(5, 3, 20)
    r = Recv([1, 3])
    with attached(swapped, r), torch.no_grad(): swapped(x)
    l0, l1 = layers_of(swapped)
    assert [(l is l0, s, q0, tuple(sm.shape)) for l, s, q0, sm, _ in r.got] == \
           [(True, 1, 0, (1, 2, 20, 20)), (True, 3, 0, (1, 2, 20, 20)), (False, 1, 0, (1, 2, 20, 20)), (False, 3, 0, (1, 2, 20, 20))]
    assert l0.attn_weights is None and l1.attn_weights is None
    ref = mha_maps(stock, x, 0)
    torch.testing.assert_close(r.got[1][3][0], ref[3], rtol=0, atol=1e-6)
    torch.testing.assert_close(r.got[1][4].softmax(-1), r.got[1][3], rtol=0, atol=1e-7)
    r0 = Recv([])  # wants nothing: nothing computed
    with attached(swapped, r0, layers=[l0]), torch.no_grad(): swapped(x)
    assert r0.got == []

def test_pickle_and_unswap():
    m = swap_attention(tsai_model()).eval()
    with torch.no_grad(): m(torch.randn(2, 3, 10))
    l = m.transformer_encoder.layers[0]
    with attached(m, Recv(), layers=[l]): c = pickle.loads(pickle.dumps(m))
    assert c.transformer_encoder.layers[0].attn_weights is None and not c.transformer_encoder.layers[0].publishing
    unswap_attention(m)
    no_leftovers(m)
    assert b'tsai_attnviz' not in pickle.dumps(m)


# -- tokens ---------------------------------------------------------------------------------------------------------------
def test_tokens_are_time_steps():
    m = tsai_model()
    l = m.transformer_encoder.layers[0]
    tok = tokens_of(m, 'transformer_encoder.layers.0', l, 5, 5, 5)
    for part in ('query', 'key'):
        assert tok[part][0] == 'time step'
        assert tok[part][1].tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]
    # tsai's tokenizer (permute to [L, bs, c_in], inlinear), probed by gradients, agrees
    assert probe_spans(lambda t: m.inlinear(m.permute(t)).transpose(0, 1), 3, 7).tolist() == [[i, i + 1] for i in range(7)]
    assert adapter_for(m).n_heads(l) == 2 and adapter_for(m).maps == 'recomputed'
    # a plain model whose layers see other than seq_len tokens: tokens of unknown span
    e = encoder()
    kind, spans = tokens_of(e, 'layers.0', e.layers[0], 40, 10, 10)['key']
    assert kind == 'token' and spans.tolist() == [[-1, -1]] * 10


# -- TransformerRNNPlus attends across the batch: refused -----------------------------------------------------------------
@pytest.mark.parametrize('arch', [TransformerRNNPlus, TransformerLSTMPlus, TransformerGRUPlus])
def test_transformer_rnn_plus_refused(arch):
    torch.manual_seed(0)
    m = arch(3, 4, 20, d_model=16, nhead=2, dim_feedforward=32).eval()
    x = torch.randn(4, 3, 20)
    x2 = x.clone(); x2[1] += 1                      # change sample 1 only
    enc, got = m.backbone.enc_layers[0], []
    h = enc.register_forward_hook(lambda mod, i, o: got.append(o))
    with torch.no_grad(): o, o2 = m(x), m(x2)
    h.remove()
    assert not torch.equal(o[0], o2[0])             # sample 0's prediction changed
    assert got[0].shape == (20, 4, 16)              # [seq_len, bs, d] into a batch_first layer: 20 "samples" of 4 tokens
    assert not torch.equal(got[0][:, 0], got[1][:, 0])  # the attention mixed sample 1 into sample 0
    with pytest.raises(ValueError, match='attends across the samples of a batch: its maps would be samples × samples'):
        swap_attention(m)
    assert type(enc) is nn.TransformerEncoderLayer  # left as it was
    assert TRANSFORMER.refuse(tsai_model()) is None


# -- a real Learner ---------------------------------------------------------------------------------------------------------
def test_learner_records_and_draws(bm_data, tmp_path):
    "A TransformerModel Learner on BasicMotions: recorded maps equal torch's MultiheadAttention on the inputs recorded"
    from tsai_attnviz.record.recorder import AttnRecorder
    import tsai_attnviz.show.learner  # noqa: F401  (Learner.show_attention)
    X, y, splits = bm_data
    learn = make_learner(X, y, splits, arch=TransformerModel, arch_config=dict(d_model=16, n_head=2, d_ffn=32, n_layers=2))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3)
    stock = copy.deepcopy(learn.model).cpu()
    learn.add_cb(AttnRecorder(max_len=None))
    with learn.no_bar(): learn.get_preds()
    rec = learn.attn_recorder.recording
    r0 = rec.filter(layer='transformer_encoder.layers.0')
    assert len(r0) == 16 and r0.weights.shape == (16, 2, 100, 100)
    torch.testing.assert_close(r0.weights.float(), mha_maps(stock, r0.inputs.float(), 0), rtol=0, atol=1e-5)
    assert rec.meta['maps'] == 'recomputed' and rec.meta['tokens']['transformer_encoder.layers.0']['key'] == \
           ('time step', [[i, i + 1] for i in range(100)])
    fig = learn.show_attention()
    fig.savefig('/tmp/transformer_show_attention.png')
    no_leftovers(learn.model)
    learn.remove_cb(learn.attn_recorder)
    learn.export(tmp_path/'learner.pkl')
    assert b'tsai_attnviz' not in (tmp_path/'learner.pkl').read_bytes()
