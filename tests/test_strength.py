"""Issue 17 §12, test strength: what a mutation audit found the suite missed, each against a computation made here (stock
tsai modules, gradients, a hand forward), each able to fail under the one-line bug named in its docstring."""
import copy
import numpy as np, pytest, torch, torch.nn as nn
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai.models.TSTPlus import TSTPlus, MultiTSTPlus
from tsai.models.TSPerceiver import TSPerceiver, Attention as PerceiverAttention, ScaledDotProductAttention as PerceiverSDP
from tsai_attnviz.all import *
from tsai_attnviz.arch import attention_layers, tokens_of
from tsai_attnviz.arch.tstplus import TSTPLUS
from tsai_attnviz.explain.relevance import model_relevance
from conftest import no_leftovers, hand_convtran


# -- TSTPlus token spans when tsai pads more on the right than on the left ---------------------------------------------
def gradient_spans(tokenize, c_in, seq_len):
    "Per token of a channels-first tokenizer: [first, last + 1) of the input steps its embedding's gradient reaches; None: none"
    torch.manual_seed(0)
    x = torch.randn(1, c_in, seq_len, requires_grad=True)
    tok = tokenize(x)                                                                    # [1, d_model, n_tokens]
    out = []
    for i in range(tok.shape[-1]):
        g, = torch.autograd.grad(tok[0, :, i].sum(), x, retain_graph=True)
        steps = g[0].abs().sum(0).nonzero().flatten()                                    # steps token i depends on
        out.append([int(steps[0]), int(steps[-1]) + 1] if len(steps) else None)
    return out

def test_tstplus_spans_with_asymmetric_padding():
    "Mutation caught: the left pad taken from the right side (every span one step off)"
    torch.manual_seed(0)
    m = TSTPlus(3, 2, 41, max_seq_len=16, d_model=8, n_heads=2, n_layers=1, d_ff=16).eval()
    assert tuple(m.backbone.W_P[0].padding) == (3, 4)  # 16 tokens of 3 steps: 48 − 41 = 7 padded steps, the odd one on the right
    want = gradient_spans(m.backbone.W_P, 3, 41)       # the stock tokenizer, differentiated: no package code
    name, layer = attention_layers(m)[0]
    kind, got = tokens_of(m, name, layer, 41, 16, 16)['key']
    assert kind == 'token' and len(got) == len(want) == 16
    for i, (g, w) in enumerate(zip(got.tolist(), want)):
        if w is None: assert g[0] == g[1], (i, g)      # padding only: an empty span
        else: assert g == w, (i, g, w)
    # by hand: token i reads padded positions 3i..3i+2, steps 3i−3..3i−1; tokens 0 and 15 are padding only
    assert want[0] is None and want[15] is None and want[1] == [0, 3] and want[14] == [39, 41]


# -- MultiTSTPlus: the variables a branch sees, with groups of different sizes ---------------------------------------------
@pytest.mark.bitwise
def test_multitstplus_variables_of_unequal_groups():
    "Mutation caught: every group given the first group's size ([[0, 1], [2, 3], [4, 5]])"
    torch.manual_seed(0)
    m = MultiTSTPlus([2, 3, 1], 2, 40, d_model=8, n_heads=2, n_layers=1, d_ff=16).eval()
    sel = attention_layers(m)
    got = [TSTPLUS.variables(m, l) for _, l in sel]
    assert got == [[0, 1], [2, 3, 4], [5]]
    # independently: change one input variable at a time; a branch sees the variables that change its attention layer's input
    # (tsai writes into its input, so no gradient to the input itself)
    ins = {}
    hs = [l.register_forward_pre_hook(lambda mod, a, n=n: ins.__setitem__(n, a[0].clone())) for n, l in sel]
    x = torch.randn(2, 6, 40)
    try:
        with torch.no_grad():
            m(x.clone()); base = dict(ins)
            seen = {n: [] for n, _ in sel}
            for v in range(6):
                x2 = x.clone(); x2[:, v] += 1
                m(x2)
                for n, _ in sel:
                    if not torch.equal(ins[n], base[n]): seen[n].append(v)
    finally:
        for h in hs: h.remove()
    assert [seen[n] for n, _ in sel] == got


# -- relevance(target=...) for a class no item is predicted as -----------------------------------------------------------
def grad_attention_by_hand(model, x, target):
    "(A ⊙ ∂logit_target/∂A)⁺, mean over heads and queries [bs, L], and the predicted classes; no parameter's .grad touched"
    logits, A, _, _ = hand_convtran(model, x)
    with torch.no_grad(): torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)  # the hand forward is the stock one
    g, = torch.autograd.grad(logits[:, target].sum(), A)
    return (A.detach() * g).clamp(min=0).mean((1, 2)).cpu().numpy(), logits.argmax(1)

def unpredicted(model, x, n_classes):
    "A class none of the items of x is predicted as"
    with torch.no_grad(): pred = model(x).argmax(1)
    c = next((c for c in range(n_classes) if not (pred == c).any()), None)
    assert c is not None, pred
    return c

def test_relevance_target_no_item_is_predicted_as():
    "Mutation caught: `target` ignored, the predicted class explained"
    torch.manual_seed(0)
    m = ConvTranPlus(2, 5, 8, d_model=16, n_heads=8).eval()
    with torch.no_grad(): m.backbone.attention_layer.relative_bias_table.normal_(0, 0.05)  # stock starts it at 0
    x = torch.randn(4, 2, 8)
    c = unpredicted(m, x, 5)
    want, pred = grad_attention_by_hand(m, x, c)
    got = model_relevance(m, x, 'grad_attention', target=c)
    scale = np.abs(want).max()
    assert scale > 0 and np.allclose(got, want, rtol=0, atol=1e-5 * scale)  # float32 rounding of two orders of the same sums
    other, _ = grad_attention_by_hand(m, x, pred)                           # the test tells the two classes apart
    assert np.abs(other - want).max() > 1e-2 * scale
    no_leftovers(m)

def test_learner_relevance_target_label(bm_learner):
    "Learner.relevance(target=<label>) on BasicMotions for a class none of the items is predicted as; mutation caught: target dropped"
    learn, model = bm_learner, bm_learner.model
    was = model.training
    model.eval()
    try:
        x = torch.cat([xb for xb, _ in learn.dls.valid.new(shuffle=False, drop_last=False)])[:3]  # items 0..2 after the batch tfms
        c = unpredicted(model, x, len(learn.dls.vocab))
        want, _ = grad_attention_by_hand(model, x, c)
        got = learn.relevance(idx=[0, 1, 2], method='grad_attention', target=learn.dls.vocab[c])
        scale = np.abs(want).max()
        assert scale > 0 and np.allclose(got, want, rtol=0, atol=1e-5 * scale)
    finally: model.train(was)
    no_leftovers(model)


# -- value_norm for TSTPlus, by hand from the value projection ----------------------------------------------------------
def test_tstplus_value_norm_by_hand():
    "Σ_i |α_hij|·‖W_O,h (W_V,h x_j + b_V,h)‖, mean over heads, from hooks on the stock layer; mutation caught: W_K used for W_V"
    torch.manual_seed(0)
    m = TSTPlus(3, 2, 20, d_model=16, n_heads=2, n_layers=2, d_ff=32).eval()  # res_attention: layer 1's maps add layer 0's scores
    x, got = torch.randn(3, 3, 20), {}
    mha = m.backbone.encoder.layers[1].self_attn
    hs = [mha.register_forward_pre_hook(lambda mod, a: got.update(V=a[2])),     # called as self_attn(src, src, src, prev, ...)
          mha.register_forward_hook(lambda mod, a, o: got.update(A=o[1]))]     # [bs, H, L, L], the stock layer's maps
    with torch.no_grad(): m(x)
    for h in hs: h.remove()
    with torch.no_grad():
        WO = mha.to_out[0].weight.reshape(16, 2, 8)                              # [d_model, H, d_v]
        f = lambda proj: torch.einsum('blhd,mhd->bhlm', proj(got['V']).reshape(3, 20, 2, 8), WO).norm(dim=-1)  # [bs, H, L]
        want = (got['A'].abs().sum(2) * f(mha.W_V)).mean(1).numpy()             # [bs, L]
        with_keys = (got['A'].abs().sum(2) * f(mha.W_K)).mean(1).numpy()
    r = model_relevance(m, x, 'value_norm')
    scale = np.abs(want).max()
    assert r.shape == (3, 20) and np.allclose(r, want, rtol=0, atol=1e-5 * scale)
    assert np.abs(with_keys - want).max() > 1e-2 * scale                       # the key projection would give other numbers
    no_leftovers(m)


# -- AttnRecording save/load keeps each record's call number (layers TSPerceiver reuses) -----------------------------------
def stock_calls(model, x):
    "{layer name: [map of each call, in order]} of a STOCK copy, from forward hooks on its ScaledDotProductAttention"
    m, got = copy.deepcopy(model).eval(), {}
    names = {id(a.attn): n for n, a in m.named_modules() if type(a) is PerceiverAttention}
    hs = [s.register_forward_hook(lambda mod, i, o: got.setdefault(names[id(mod)], []).append(o[1]))
          for s in m.modules() if type(s) is PerceiverSDP]
    with torch.no_grad(): m(x)
    for h in hs: h.remove()
    return got

def test_perceiver_calls_survive_save_and_load(tmp_path):
    "Blocks 1 and 2 share their layers: after save/load each record keeps its call and its map; mutation caught: call dropped"
    torch.manual_seed(0)
    m = TSPerceiver(3, 4, 20, n_latents=6, d_latent=16, n_layers=3, self_n_heads=2)   # share_weights: blocks 1, 2 one module
    nn.init.normal_(m.latent_array)  # stock starts from zeros: every latent's map would be the same
    X = torch.randn(4, 3, 20)
    ref = stock_calls(m, X)
    shared = [n for n, maps in ref.items() if len(maps) == 2]
    assert sorted(shared) == ['attn.1.0.attn', 'attn.1.1.layers.0.1']
    dl = DataLoader(list(zip(X, torch.zeros(4, dtype=torch.long))), bs=4, shuffle=False)
    learn = Learner(DataLoaders(dl, dl), m, loss_func=nn.CrossEntropyLoss())
    rec = AttnRecorder(samples=[0, 2], max_len=None)
    learn.get_preds(cbs=[rec])
    no_leftovers(m)
    r = rec.recording
    r2 = AttnRecording.load(r.save(tmp_path/'perceiver.npz'))
    assert r2.calls == r.calls and r2.layers == r.layers
    for n in shared:
        assert sorted(r2.filter(layer=n).calls) == [0, 0, 1, 1]                        # two items, two calls each
        for c in (0, 1):
            got = r2.filter(layer=n, call=c)
            assert got.idxs == [0, 2]
            torch.testing.assert_close(got.weights.float(), ref[n][c][[0, 2]].cpu(), rtol=0, atol=1e-6)
    assert not torch.allclose(ref[shared[0]][0], ref[shared[0]][1])                    # the two calls' maps differ
