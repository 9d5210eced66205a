"Relevance over time against independent computations: hand-written forwards, stock hooks, models built to be known."
import numpy as np, pytest, torch, torch.nn as nn
import matplotlib.pyplot as plt
from tsai.models.ConvTranPlus import ConvTranPlus, Attention, Attention_Rel_Scl
from tsai.models.TST import TST, _MultiHeadAttention
from tsai_attnviz.explain.relevance import METHODS, model_relevance, attention_rollout, fill_steps, plot_relevance
from tsai_attnviz.arch import ADAPTERS
from tsai_attnviz.arch.convtranplus import ConvTranPlusWithAttn
from conftest import make_learner, no_leftovers, hand_convtran

def toy_convtran(n_heads, c_out=3, seed=0):
    torch.manual_seed(seed)
    m = ConvTranPlus(2, c_out, 8, d_model=8, n_heads=n_heads).eval()
    with torch.no_grad(): m.backbone.attention_layer.relative_bias_table.normal_(0, 0.05)  # a bias that matters
    return m

def test_hand_forward_is_the_stock_forward():
    "The hand forward used below is checked against stock (which only runs eRPE with 8 heads)"
    m, x = toy_convtran(8), torch.randn(4, 2, 8)
    with torch.no_grad(): assert torch.allclose(hand_convtran(m, x)[0], m(x), atol=1e-5)

@pytest.mark.parametrize('part', ['effective', 'softmax'])
def test_grad_attention_and_value_norm_by_hand(part):
    m, x = toy_convtran(2), torch.randn(5, 2, 8)
    logits, A, sm, v = hand_convtran(m, x)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    W = A.detach() if part == 'effective' else sm
    want = (W * A.grad).clamp(min=0).mean(1).mean(1)                                     # heads, then queries
    got = model_relevance(m, x, 'grad_attention', part=part)
    assert got.shape == (5, 8) and np.allclose(got, want.numpy(), atol=1e-6)
    assert np.allclose(model_relevance(m, x, 'value_norm', part=part), (W.abs().sum(2) * v.norm(dim=-1)).mean(1).numpy(), atol=1e-5)
    assert np.allclose(model_relevance(m, x, 'attention', part=part), W.mean(2).mean(1).numpy(), atol=1e-6)
    assert np.allclose(model_relevance(m, x, 'grad_attention', part=part, head=1),
                       (W * A.grad).clamp(min=0)[:, 1].mean(1).numpy(), atol=1e-6)

def test_grad_attention_other_class_and_regression():
    m, x = toy_convtran(2), torch.randn(3, 2, 8)
    logits, A, _, _ = hand_convtran(m, x)
    logits[:, 2].sum().backward()                                                        # class 2, predicted or not
    assert np.allclose(model_relevance(m, x, 'grad_attention', target=2), (A.detach() * A.grad).clamp(min=0).mean((1, 2)).numpy(), atol=1e-6)
    r = toy_convtran(2, c_out=2, seed=3)                                                 # regression: the sum of the outputs
    out, A, _, _ = hand_convtran(r, x)
    out.sum().backward()
    assert np.allclose(model_relevance(r, x, 'grad_attention', task='regression'),
                       (A.detach() * A.grad).clamp(min=0).mean((1, 2)).numpy(), atol=1e-6)

def test_rollout_one_layer_is_half_attention_plus_identity():
    m, x = toy_convtran(2), torch.randn(3, 2, 8)
    _, A, sm, _ = hand_convtran(m, x)
    for part, W in (('effective', A.detach()), ('softmax', sm)):
        Ah = 0.5 * W.mean(1) + 0.5 * torch.eye(8)
        assert np.allclose(model_relevance(m, x, 'rollout', part=part), (Ah / Ah.sum(-1, keepdim=True)).mean(1).numpy(), atol=1e-6)

class IdentityAttention(nn.Module):
    "Two stock `Attention` layers forced to attend each token to itself: tokens one-hot [e_i, e_i], W_Q = W_K = I, scale 1"
    def __init__(self, L=8):
        super().__init__()
        e = 10 * torch.eye(L)
        self.register_buffer('z', torch.cat([e, e], 1)[None])
        self.layers = nn.ModuleList([Attention(2 * L, n_heads=2) for _ in range(2)])
        for a in self.layers:
            for lin in (a.query, a.key, a.value): nn.init.eye_(lin.weight)
            a.scale = 1.
        self.head = nn.Linear(2 * L, 2)
    def forward(self, x):
        z = self.z.expand(len(x), -1, -1) + 0 * x.mean((1, 2))[:, None, None]
        h = z
        for a in self.layers: h = z + 0 * a(h)
        return self.head(h.mean(1) + x.mean((1, 2))[:, None])

def test_rollout_of_identity_attention_is_identity():
    I = torch.eye(8)
    assert torch.equal(attention_rollout([I, I]), I)
    m, x = IdentityAttention(), torch.randn(3, 2, 8)
    maps = []
    hs = [a.register_forward_hook(lambda mod, i, o: maps.append(torch.softmax(
        mod.query(i[0]).reshape(3, 8, 2, -1).transpose(1, 2) @ mod.key(i[0]).reshape(3, 8, 2, -1).permute(0, 2, 3, 1), -1)))
        for a in m.layers]
    with torch.no_grad(): m(x)
    for h in hs: h.remove()
    assert all(torch.allclose(a, I.expand_as(a), atol=1e-30) for a in maps)               # the maps are the identity
    assert np.allclose(model_relevance(m, x, 'rollout'), 1 / 8, atol=1e-7)               # mean over queries of I
    no_leftovers(m)

def test_rollout_attention_value_norm_multi_layer_tst_by_hand():
    "A 2-layer TST: maps and values from hooks on the stock layers, rollout and value-norm by hand in numpy"
    torch.manual_seed(0)
    m = TST(3, 2, 10, n_layers=2, d_model=12, n_heads=3, d_k=5, d_v=6).eval()
    x, got = torch.randn(4, 3, 10), []
    hs = [l.self_attn.register_forward_hook(lambda mod, i, o: got.append((o[1].numpy(), i[2]))) for l in m.encoder.layers]
    with torch.no_grad(): m(x)
    for h in hs: h.remove()
    A = [a.mean(1) for a, _ in got]                                                      # [bs, L, L], heads averaged
    hat = lambda a: (0.5 * a + 0.5 * np.eye(10)) / (0.5 * a + 0.5 * np.eye(10)).sum(-1, keepdims=True)
    assert np.allclose(model_relevance(m, x, 'rollout'), (hat(A[1]) @ hat(A[0])).mean(1), atol=1e-5)
    assert np.allclose(model_relevance(m, x, 'rollout', layer=0), hat(A[0]).mean(1), atol=1e-5)
    assert np.allclose(model_relevance(m, x, 'attention', layer=0), A[0].mean(1), atol=1e-6)
    a1, V = got[1]
    mha = m.encoder.layers[1].self_attn
    with torch.no_grad():
        v = (V @ mha.W_V.weight.T).reshape(4, 10, 3, 6).numpy()                          # [bs, L, H, d_v]; TST: no bias
        WO = mha.W_O.weight.reshape(12, 3, 6).numpy()                                    # [d_model, H, d_v]
    f = np.linalg.norm(np.einsum('blhd,mhd->bhlm', v, WO), axis=-1)                      # ‖f_h(x_j)‖ [bs, H, L]
    assert np.allclose(model_relevance(m, x, 'value_norm'), (np.abs(a1).sum(2) * f).mean(1), atol=1e-4)
    no_leftovers(m)

class ReadsStep(nn.Module):
    "Output from x[:, :, 7] only"
    def __init__(self, c_out=2):
        super().__init__()
        self.lin = nn.Linear(2, c_out)
        with torch.no_grad(): self.lin.weight.copy_(torch.tensor([[2., 2.], [-2., -2.]])[:c_out]); self.lin.bias.zero_()
    def forward(self, x): return self.lin(x[:, :, 7])

@pytest.mark.parametrize('window', [0.05, 1, 3, 6])
def test_occlusion_ranks_the_step_read_first(window):
    x = torch.randn(6, 2, 20); x[:, :, 7] = 3.
    r = model_relevance(ReadsStep(), x, 'occlusion', window=window)
    assert (r.argmax(1) == 7).all() and (r[:, 7] > 0).all()
    if window == 1: assert (np.delete(r, 7, axis=1) == 0).all()
    if window == 3:  # windows start at every step; step t is covered by those starting at t-2, t-1, t: the mean of their drops
        lin = ReadsStep().lin
        with torch.no_grad():
            p0 = torch.softmax(lin(x[:, :, 7]), -1)
            D = (p0.max(1).values - torch.softmax(lin(x.mean(-1)), -1).gather(1, p0.argmax(1, keepdim=True))[:, 0]).numpy()
        want = np.zeros((6, 20)); want[:, 5], want[:, 6], want[:, 7], want[:, 8], want[:, 9] = D / 3, 2 * D / 3, D, 2 * D / 3, D / 3
        assert np.allclose(r, want, atol=1e-6)
    assert (model_relevance(ReadsStep(1), x, 'occlusion', task='regression', window=window).argmax(1) == 7).all()

@pytest.mark.bitwise
def test_fill_steps():
    x = torch.randn(3, 2, 9)
    m = torch.zeros(3, 9, dtype=torch.bool); m[:, 2:5] = True; m[1, 0] = True
    got = fill_steps(x, m, 'mean')
    assert torch.equal(got[m[:, None].expand_as(x)], x.mean(-1, keepdim=True).expand_as(x)[m[:, None].expand_as(x)])
    assert torch.equal(got[~m[:, None].expand_as(x)], x[~m[:, None].expand_as(x)])
    got = fill_steps(x, m, 'interpolate')
    for i in range(3):
        keep = ~m[i].numpy()
        for c in range(2): assert np.allclose(got[i, c].numpy(), np.interp(np.arange(9), np.arange(9)[keep], x[i, c].numpy()[keep]))

@pytest.fixture(scope='module')
def learner(bm_data):
    from tsai.basics import TSStandardize
    learn = make_learner(*bm_data, batch_tfms=TSStandardize(by_var=True), arch_config=dict(d_model=16))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3)
    return learn

@pytest.mark.parametrize('method', list(METHODS))
def test_learner_every_method(learner, bm_data, method):
    learner.model.train(); learner.model.zero_grad(set_to_none=True)
    r = learner.relevance(idx=[0, 7, 39], method=method)
    assert r.shape == (3, 100) and r.dtype == np.float32 and np.isfinite(r).all()
    assert r.std(1).min() > 0                                                             # it says something about steps
    no_leftovers(learner.model)
    assert learner.model.training and all(m.training for m in learner.model.modules())
    assert all(p.grad is None for p in learner.model.parameters())                       # parameters' .grad untouched
    X, y, splits = bm_data
    assert np.allclose(learner.relevance(X=X[[splits[1][7]]], method=method), r[1:2], atol=1e-5)  # X: the same transforms

def test_learner_errors(learner):
    with pytest.raises(IndexError, match=r'idx=40 is out of range: the validation set has 40 items \(0..39\)'): learner.relevance(idx=40)
    with pytest.raises(ValueError, match='use one of'): learner.relevance(method='shap')
    with pytest.raises(ValueError, match='has 5 variables'): learner.relevance(X=np.zeros((2, 5, 100)))
    with pytest.raises(ValueError, match='seq_len 90'): learner.relevance(X=np.zeros((2, 6, 90)))
    with pytest.raises(IndexError, match='head=8 is out of range: the model has 8 heads'): learner.relevance(head=8)
    no_leftovers(learner.model)

def test_restored_after_keyboard_interrupt(learner):
    def stop(m, i, o): raise KeyboardInterrupt
    learner.model.eval()
    h = learner.model.head.register_forward_hook(stop)
    try:
        with pytest.raises(KeyboardInterrupt): learner.relevance(method='grad_attention')
    finally: h.remove()
    no_leftovers(learner.model)
    assert not learner.model.training

def test_model_with_twins_keeps_them(bm_data):
    "ConvTranPlusWithAttn is built with twins: they stay, with their own settings"
    m = ConvTranPlusWithAttn(6, 4, 100).eval()
    a = m.backbone.attention_layer
    cls, kw = type(a), a.keep_weights
    r = model_relevance(m, torch.randn(2, 6, 100), 'value_norm')
    assert r.shape == (2, 100) and type(a) is cls and a.keep_weights == kw and not a.publishing

def test_plot_relevance(learner):
    rels, x = {}, None
    for m in METHODS:
        r, x = learner.relevance(idx=[5], method=m, with_input=True)
        rels[m] = r[0]
    fig = plot_relevance(x[0], rels, title='BasicMotions item 5')
    assert len(fig.axes) == 1 + len(METHODS) and len(fig.axes[0].lines) == 6
    for a in fig.axes[1:]: assert list(a.lines[0].get_ydata()) == [0, 0]                  # the explicit 0 line
    fig.savefig('/tmp/relevance_methods.png', dpi=80); plt.close(fig)
    fig, ax = plt.subplots()
    assert plot_relevance(x[0], rels, ax=ax) is fig and len(ax.lines) == len(METHODS) + 1
    with pytest.raises(ValueError, match='rel has 50 time steps but x has 100'): plot_relevance(x[0], np.zeros(50))
    plt.close('all')

@pytest.mark.skipif(not any(a.name == 'TSTPlus' for a in ADAPTERS), reason="TSTPlus's family is not merged into main yet")
def test_tstplus_learner(bm_data):
    from tsai.models.TSTPlus import TSTPlus
    learn = make_learner(*bm_data, arch=TSTPlus, arch_config=dict(d_model=16, n_heads=2, n_layers=2, d_ff=32))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    for method in METHODS:
        r = learn.relevance(idx=[0, 1], method=method)
        assert r.shape == (2, 100) and np.isfinite(r).all()
        no_leftovers(learn.model)

def _family_models():
    from tsai.models.TSTPlus import TSTPlus, MultiTSTPlus
    from tsai.models.TSiTPlus import TSiTPlus
    from tsai.models.PatchTST import PatchTST
    from tsai.models.TransformerModel import TransformerModel
    from tsai.models.TSPerceiver import TSPerceiver
    from tsai.models.RNNAttention import LSTMAttention
    torch.manual_seed(0)
    models = dict(TST=TST(4, 3, 32, n_layers=2, d_model=16, n_heads=2),
                TSTPlus=TSTPlus(4, 3, 32, n_layers=2, d_model=16, n_heads=2),
                TSTPlus_conv=TSTPlus(4, 3, 32, max_seq_len=16, n_layers=2, d_model=16, n_heads=2),  # tokens of 2 steps
                TSiTPlus=TSiTPlus(4, 3, 32, depth=2, d_model=16, n_heads=2),                          # a cls token
                MultiTSTPlus=MultiTSTPlus([1, 3], 3, 32, n_layers=2, d_model=16, n_heads=2),         # branches on views of a split
                PatchTST=PatchTST(4, 4, 32, 8, n_layers=2, d_model=16, n_heads=2, patch_len=8, stride=4),  # per variable, patches
                TransformerModel=TransformerModel(4, 3, d_model=16, n_head=2, n_layers=2),            # maps recomputed
                TSPerceiver=TSPerceiver(4, 3, 32, n_latents=8, d_latent=16, d_context=16, n_layers=1),  # cross-attention
                LSTMAttention=LSTMAttention(4, 3, 32, hidden_size=16, rnn_layers=1, encoder_layers=2, n_heads=2, d_k=8, d_v=8, d_ff=32))
    with torch.no_grad():  # parameters initialised to zero (TSPerceiver's latents) would make every map uniform
        for m in models.values():
            for p in m.parameters():
                if not p.any(): p.normal_(0, 0.5)
    return models

@pytest.mark.parametrize('name', list(_family_models()))
def test_every_family_every_method(name):
    m, x = _family_models()[name].eval(), torch.randn(3, 4, 32)
    task = 'regression' if name == 'PatchTST' else 'classification'
    for method in METHODS:
        if name == 'TSPerceiver' and method in ('rollout', 'grad_rollout'):
            with pytest.raises(ValueError, match='cross-attention'): model_relevance(m, x, method, task=task)
        else:
            r = model_relevance(m, x, method, task=task)
            assert r.shape == (3, 32) and np.isfinite(r).all() and r.std() > 0, method
            if method in ('attention', 'rollout'): assert np.allclose(r.sum(1), 1, atol=1e-4)  # rows of softmax maps sum to 1
        no_leftovers(m)

@pytest.mark.bitwise
def test_perceiver_default_layer_is_the_cross_attention():
    "The latents' self-attention has no time steps for keys: the default is the last layer whose keys are steps"
    m, x = _family_models()['TSPerceiver'].eval(), torch.randn(2, 4, 32)
    from tsai_attnviz.arch import attention_layers
    cross = [n for n, l in attention_layers(m) if l.to_kv.in_features == 16 and n.startswith('attn.0.0')]
    assert np.array_equal(model_relevance(m, x, 'attention'), model_relevance(m, x, 'attention', layer=cross[0]))
    assert (model_relevance(m, x, 'attention', layer=-1) == 0).all()                     # keys are latents: no time step

def test_transformer_value_norm_by_hand():
    "torch's TransformerEncoderLayer: maps and f(x_j) from self_attn's in- and out-projections, by hand"
    m, x = _family_models()['TransformerModel'].eval(), torch.randn(2, 4, 32)
    lay, got = m.transformer_encoder.layers[1], {}
    h = lay.register_forward_pre_hook(lambda mod, a: got.setdefault('src', a[0]))
    with torch.no_grad(): m(x)
    h.remove()
    mha, z = lay.self_attn, got['src'].transpose(0, 1)                                    # [bs, L, 16]
    with torch.no_grad():
        q, k, v = [(z @ w.T + b).reshape(2, 32, 2, 8).transpose(1, 2) for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3))]
        A = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)                          # [bs, H, L, L]
        f = torch.einsum('bhld,mhd->bhlm', v, mha.out_proj.weight.reshape(16, 2, 8)).norm(dim=-1)
    assert np.allclose(model_relevance(m, x, 'value_norm'), (A.sum(2) * f).mean(1).numpy(), atol=1e-5)
    assert np.allclose(model_relevance(m, x, 'attention'), A.mean((1, 2)).numpy(), atol=1e-6)

def test_fused_layers_give_the_exact_relevance():
    "ConvTranPlus's fused layers hand the maps in chunks of query rows: the sums and the joined maps are those of the exact layers"
    from tsai_attnviz.arch.convtranplus_fast import fast_attention
    torch.manual_seed(0)
    m, x = ConvTranPlus(4, 3, 32).eval(), torch.randn(3, 4, 32)
    exact = {meth: model_relevance(m, x, meth) for meth in ('attention', 'value_norm', 'rollout', 'grad_attention')}
    fast_attention(m)
    for meth, r in exact.items(): assert np.allclose(model_relevance(m, x, meth), r, atol=1e-5), meth  # grad_attention: as its exact twin

def test_grad_rollout_by_hand_on_two_layers():
    "grad_rollout (Chefer et al. 2021 across layers) against the stock TST's own maps and their gradients, read with hooks"
    from tsai.models.TST import TST, _MultiHeadAttention
    torch.manual_seed(0)
    model = TST(3, 2, 20, n_layers=2, d_model=16, n_heads=2, d_ff=32, dropout=0.).eval()
    x = torch.randn(4, 3, 20)
    maps = []
    hs = [m.register_forward_hook(lambda m, i, o: maps.append(o[1])) for m in model.modules() if type(m) is _MultiHeadAttention]
    try:
        out = model(x)
        c = out.argmax(-1)
        gs = torch.autograd.grad(out.gather(1, c[:, None]).sum(), maps)               # ∂y/∂A_l, [bs, H, L, L]
    finally:
        for h in hs: h.remove()
    A1, A2 = [(A * g).clamp(min=0).mean(1).detach().double() for A, g in zip(maps, gs)]  # Ā_l: heads averaged
    I = torch.eye(20, dtype=torch.double)
    want = ((I + A2) @ (I + A1) - I).mean(-2).float().numpy()                          # tokens are time steps here
    got = model_relevance(model, x, 'grad_rollout')
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))  # float32 sums, other order
    no_leftovers(model)
    # one layer: the same as grad_attention of that layer
    one = model_relevance(model, x, 'grad_attention', layer=0)
    np.testing.assert_allclose(model_relevance(model, x, 'grad_rollout', layer=0), one, rtol=1e-5, atol=1e-7 * float(np.abs(one).max()))
    with pytest.raises(ValueError, match='grad_rollout averages the heads'): model_relevance(model, x, 'grad_rollout', head=0)

def test_rollouts_stay_in_their_branch():
    "MultiTSTPlus: a branch's rollout goes through that branch's layers only, not the branches computed before it"
    from tsai.models.TSTPlus import MultiTSTPlus
    from tsai_attnviz.explain.relevance import _stacked
    names = ['backbone.0.branches.0.encoder.layers.0.self_attn', 'backbone.0.branches.0.encoder.layers.1.self_attn',
             'backbone.0.branches.1.encoder.layers.0.self_attn', 'backbone.0.branches.1.encoder.layers.1.self_attn']
    assert [_stacked(n, names[3]) for n in names] == [False, False, True, True]
    assert _stacked('backbone.attention_layer', 'backbone.attention_layer') and not _stacked('a.0.b', 'a.0.c')
    torch.manual_seed(0)
    m, x = MultiTSTPlus([2, 3], 2, 16, n_layers=2, d_model=16, n_heads=2).eval(), torch.randn(2, 5, 16)
    last = 'backbone.0.branches.1.encoder.layers.1.self_attn'
    # the rollout of branch 1's two layers alone, from the stock maps read with hooks
    from tsai.models.layers import MultiheadAttention
    maps = []
    mods = dict(m.named_modules())
    hs = [mods[n].register_forward_hook(lambda mod, i, o: maps.append(o[1].detach())) for n in names[2:]]
    try:
        with torch.no_grad(): m(x)
    finally:
        for h in hs: h.remove()
    want = attention_rollout([a.mean(1) for a in maps]).mean(-2).numpy()
    np.testing.assert_allclose(model_relevance(m, x, 'rollout', layer=last), want, rtol=1e-5, atol=1e-7)

def test_gradient_methods_on_multitstplus():
    "MultiTSTPlus's branches write into views of its split (NaNs to 0 in place): every gradient method runs anyway, left as it was"
    from tsai.models.TSTPlus import MultiTSTPlus
    torch.manual_seed(0)
    m, x = MultiTSTPlus([2, 3], 2, 16, n_layers=1, d_model=16, n_heads=2).eval(), torch.randn(3, 5, 16)
    with pytest.raises(RuntimeError, match='is a view and is being modified inplace'): m(x.clone().requires_grad_()).sum().backward()
    # saliency by hand: |d logit(predicted) / dx| summed over variables, each branch on a copy of its part of the split
    xh = x.clone().requires_grad_()
    out = m.head(torch.cat([b(xi.clone()) for xi, b in zip(torch.split(xh, [2, 3], dim=1), m.backbone[0].branches)], 1))
    out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
    np.testing.assert_allclose(model_relevance(m, x, 'saliency'), xh.grad.abs().sum(1).numpy(), rtol=1e-5, atol=1e-7)
    last = 'backbone.0.branches.1.encoder.layers.0.self_attn'
    one = model_relevance(m, x, 'grad_attention', layer=last)
    assert np.isfinite(one).all() and np.abs(one).sum() > 0
    np.testing.assert_allclose(model_relevance(m, x, 'grad_rollout', layer=last), one, rtol=1e-5, atol=1e-7 * float(np.abs(one).max()))
    for method in ('integrated_gradients', 'input_x_gradient', 'gradient_shap'):
        assert np.isfinite(model_relevance(m, x, method)).all(), method
    assert sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in m.modules()) == 0

def test_relevance_view_hands_each_method_what_it_takes(learner, monkeypatch):
    "view='relevance': attention methods get layer= and part=, one-layer ones head= too, model-agnostic ones none of them"
    import tsai_attnviz.show.learner  # Learner.show_attention
    calls, orig = {}, learner.relevance
    def spy(**kw):
        calls[kw['method']] = {k: v for k, v in kw.items() if k in ('layer', 'part', 'head')}
        return orig(**kw)
    monkeypatch.setattr(learner, 'relevance', spy)
    fig = learner.show_attention(view='relevance', idx=3, method=['grad_attention', 'grad_rollout', 'saliency'], part='softmax', head=1)
    plt.close(fig)
    assert calls == {'grad_attention': dict(layer=None, part='softmax', head=1), 'grad_rollout': dict(layer=None, part='softmax'),
                     'saliency': {}}
    no_leftovers(learner.model)
