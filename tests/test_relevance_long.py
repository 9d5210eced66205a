"""Relevance at long sequences (issue 17 §6, §7): grad_attention through fused and recomputed layers against the exact model
and a hand computation, occlusion's default windows and memory-sized batches, and relevance's arguments checked before
any work. Small seq_len here: bench/relevance_long.py runs seq_len=3000."""
import copy, io, contextlib
import numpy as np, pytest, torch, torch.nn as nn
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai.models.TransformerModel import TransformerModel
from tsai_attnviz.explain.relevance import model_relevance, _windows, N_WINDOWS
from tsai_attnviz.arch.convtranplus_fast import fast_attention, exact_attention
from tsai_attnviz.arch import attention_layers
from conftest import no_leftovers


def users_model(L=48, rel='eRPE', c_out=1, seed=0):
    "The users' configuration (c_in=3, regression, d_model=16, 8 heads, eRPE) at a short seq_len, with a bias that matters"
    torch.manual_seed(seed)
    m = ConvTranPlus(3, c_out, L, d_model=16, n_heads=8, rel_pos_encode=rel).eval()
    a = m.backbone.attention_layer
    if hasattr(a, 'relative_bias_table'):
        with torch.no_grad(): a.relative_bias_table.normal_(0, 0.05)
    return m

def close(got, want, rel=1e-4):
    "Equal to a tolerance relative to the values' scale: the fused and exact kernels (and a hand forward) round differently"
    got, want = np.asarray(got), np.asarray(want)
    return got.shape == want.shape and np.abs(got - want).max() <= rel * np.abs(want).max()


# -- grad_attention through fused layers: the exact twin's maps, with gradients -------------------------------------------
@pytest.mark.parametrize('rel', ['eRPE', 'vector', None])
@pytest.mark.parametrize('part', ['effective', 'softmax'])
def test_grad_attention_fused_equals_exact(rel, part):
    exact, x = users_model(rel=rel), torch.randn(3, 3, 48)
    fused = fast_attention(copy.deepcopy(exact))
    for task, target in (('regression', None), ('regression', 0)):
        want = model_relevance(exact, x, 'grad_attention', task=task, target=target, part=part)
        got = model_relevance(fused, x, 'grad_attention', task=task, target=target, part=part)
        assert want.std() > 0 and close(got, want), (rel, part, target)
    assert close(model_relevance(fused, x, 'grad_attention', task='regression', head=3), model_relevance(exact, x, 'grad_attention', task='regression', head=3))
    assert type(fused.backbone.attention_layer).__name__.endswith('_Fast')              # fused again afterwards
    no_leftovers(fused)
    assert all(p.grad is None for p in fused.parameters())

def test_grad_attention_fused_classification_learner(bm_data):
    "Through a Learner: the fused model's grad_attention is the exact model's, for the predicted and for another class"
    from conftest import make_learner
    learn = make_learner(*bm_data, arch_config=dict(d_model=16))
    want = {t: learn.relevance(idx=[0, 5], method='grad_attention', target=t) for t in (None, 'Walking')}
    fast_attention(learn.model)
    for t, w in want.items(): assert close(learn.relevance(idx=[0, 5], method='grad_attention', target=t), w), t
    exact_attention(learn.model)


# -- grad_attention through recomputed layers: TransformerModel against a hand forward --------------------------------------
def hand_transformer(m, x, leaf):
    "tsai's TransformerModel written out from its stock modules, layer `leaf`'s softmax a leaf tensor (its .grad after backward)"
    z = m.relu(m.inlinear(x.permute(2, 0, 1))).transpose(0, 1)                            # [bs, L, d_model]
    for i, lay in enumerate(m.transformer_encoder.layers):
        mha, (bs, L, E) = lay.self_attn, z.shape
        H = mha.num_heads
        q, k, v = [(z @ w.T + b).reshape(bs, L, H, -1).transpose(1, 2) for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3))]
        A = torch.softmax(q @ k.transpose(-1, -2) / (E // H) ** 0.5, -1)                   # [bs, H, L, L]
        if i == leaf % len(m.transformer_encoder.layers): A = A.detach().requires_grad_(); leafA = A
        z = lay.norm1(z + mha.out_proj((A @ v).transpose(1, 2).reshape(bs, L, E)))
        z = lay.norm2(z + lay.linear2(lay.activation(lay.linear1(z))))
    z = m.transformer_encoder.norm(z)
    return m.outlinear(m.relu(z.max(1)[0])), leafA

def test_grad_attention_transformer_by_hand():
    torch.manual_seed(0)
    m, x = TransformerModel(4, 3, d_model=16, n_head=2, d_ffn=32, n_layers=2).eval(), torch.randn(3, 4, 20)
    with torch.no_grad(): assert torch.allclose(hand_transformer(m, x, -1)[0], m(x), atol=1e-5)  # the hand forward is the model's
    for leaf, layer in ((1, None), (0, 0), (1, 'transformer_encoder.layers.1')):
        for target in (None, 2):
            out, A = hand_transformer(m, x, leaf)
            c = out.argmax(1) if target is None else torch.full((3,), target)
            out.gather(1, c[:, None]).sum().backward()
            want = (A.detach() * A.grad).clamp(min=0).mean(1).mean(1).numpy()             # heads, then queries
            got = model_relevance(m, x, 'grad_attention', layer=layer, target=target)
            assert want.std() > 0 and close(got, want), (layer, target)
    assert all(type(l) is nn.TransformerEncoderLayer and 'forward' not in l.__dict__ for _, l in attention_layers(m))
    no_leftovers(m)

def test_grad_attention_torch_encoder_batch_first_norm_first():
    "Any model of nn.TransformerEncoderLayers, batch_first and norm_first: grad_attention against autograd through torch's MultiheadAttention"
    torch.manual_seed(0)
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(2, 16)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0., batch_first=True, norm_first=True), 1,
                                             enable_nested_tensor=False)
            self.out = nn.Linear(16, 3)
        def forward(self, x): return self.out(self.enc(self.inp(x.transpose(1, 2))).mean(1))
    m, x = Enc().eval(), torch.randn(2, 2, 12)
    # by hand: torch's own MultiheadAttention returns the weights it multiplied the values by; replace them by a leaf
    lay = m.enc.layers[0]
    z = lay.norm1(m.inp(x.transpose(1, 2)))
    w = lay.self_attn(z, z, z, need_weights=True, average_attn_weights=False)[1].detach().requires_grad_()  # [bs, H, L, L]
    E, H = 16, 4
    v = (z @ lay.self_attn.in_proj_weight[2 * E:].T + lay.self_attn.in_proj_bias[2 * E:]).reshape(2, 12, H, -1).transpose(1, 2)
    h = m.inp(x.transpose(1, 2)) + lay.self_attn.out_proj((w @ v).transpose(1, 2).reshape(2, 12, E))
    h = h + lay._ff_block(lay.norm2(h))
    out = m.out(h.mean(1))
    with torch.no_grad(): assert torch.allclose(out, m(x), atol=1e-5)
    out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
    assert close(model_relevance(m, x, 'grad_attention'), (w.detach() * w.grad).clamp(min=0).mean((1, 2)).numpy())


# -- occlusion at long sequences --------------------------------------------------------------------------------------------
def test_default_windows():
    "About 40 windows of 5% at any seq_len: tens at 3000; every start at short seq_len; every step covered"
    for L, n, w, s in ((3000, 39, 150, 75), (1000, 39, 50, 25), (100, 49, 5, 2), (40, 39, 2, 1), (8, 8, 1, 1)):
        M = _windows(L, 0.05, None)
        assert (len(M), int(M[0].sum()), int(M[1].float().argmax())) == (n, w, s), L
        assert M.any(0).all() and M[-1, -1]
    assert len(_windows(3000, 0.05, 1)) == 2851                                             # the old default: every start
    with pytest.raises(ValueError, match='stride=0'): _windows(100, 0.05, 0)

class Counts(nn.Module):
    "A model from a fixed step, which counts the items of each forward"
    def __init__(self, t=7, c_out=2):
        super().__init__()
        self.t, self.lin, self.sizes = t, nn.Linear(3, c_out), []
        with torch.no_grad(): self.lin.weight.normal_()
    def forward(self, x): self.sizes.append(len(x)); return self.lin(x[:, :, self.t])

def test_occlusion_batches_by_max_mem():
    "Copies per forward follow the budget (one forward of a single item first, to measure it); the relevance does not depend on it"
    x = torch.randn(3, 3, 60); x[:, :, 7] += 3
    m = Counts()
    small = model_relevance(m, x, 'occlusion', max_mem=1e-3)                               # about a KB: one copy a forward
    n_copies = 3 * len(_windows(60, 0.05, None))
    assert m.sizes == [1] * (3 + n_copies)
    m.sizes = []
    big = model_relevance(m, x, 'occlusion')
    assert m.sizes == [1, 2, n_copies]                                                     # item 0, items 1-2, every copy at once
    assert np.allclose(small, big, atol=1e-6) and (big.argmax(1) == 7).all()
    alone = np.concatenate([model_relevance(m, x[i:i + 1], 'occlusion') for i in range(3)])  # copies of several items in one forward
    assert np.allclose(big, alone, atol=1e-6)                                               # are each their own item's
    with pytest.raises(ValueError, match='max_mem=0'): model_relevance(m, x, 'occlusion', max_mem=0)

def test_occlusion_budget_from_the_family():
    "The exact layer's [H, L, L] scores count: at the same budget the stock model runs fewer copies per forward than the fused one"
    L, sizes = 128, {}
    stock = users_model(L); fused = fast_attention(copy.deepcopy(stock))
    x = torch.randn(1, 3, L)
    for name, m in (('stock', stock), ('fused', fused)):
        got = []
        h = m.register_forward_pre_hook(lambda mod, a: got.append(len(a[0])))
        r = model_relevance(m, x, 'occlusion', task='regression', max_mem=4)               # 4 MB: 3 × 8 × 128² floats are 1.5 MB a copy
        h.remove()
        sizes[name] = (max(got), r)
    assert sizes['stock'][0] == 2 and sizes['fused'][0] > 2                              # fused: no [H, L, L] scores
    assert close(sizes['fused'][1], sizes['stock'][1], 1e-4)

def test_progress_bar_silent_when_not_a_terminal():
    x = torch.randn(2, 3, 60)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): model_relevance(Counts(), x, 'occlusion', max_mem=1e-3)
    assert buf.getvalue() == ''
    with contextlib.redirect_stdout(buf): model_relevance(Counts(), x, 'occlusion', max_mem=1e-3, progress=True)
    assert buf.getvalue() != ''                                                             # asked for: shown


# -- every argument checked before any work (§7) ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def reg_learner():
    "The users' configuration at seq_len=48, regression, untrained"
    from tsai.basics import TSRegressor
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(24, 3, 48)).astype('float32'), rng.normal(size=24).astype('float32')
    return TSRegressor(X, y, splits=(list(range(16)), list(range(16, 24))), arch=ConvTranPlus,
                       arch_config=dict(d_model=16, n_heads=8), bs=8, verbose=False, seed=0), X

BAD = [(dict(head='2'), TypeError, r"head='2' is not a head number: use an int in 0..7, or None"),
       (dict(head=8), IndexError, r'head=8 is out of range: the model has 8 heads \(0..7\)'),
       (dict(head=-1), IndexError, r'head=-1 is out of range: the model has 8 heads \(0..7\)'),
       (dict(head=2.0), TypeError, 'head=2.0 is not a head number'),
       (dict(layer=3), IndexError, r'layer=3 is out of range: there are 1 layers in the model \(layer 0..0\)'),
       (dict(layer='attn'), ValueError, "layer='attn' is not in the model: layers are \\['backbone.attention_layer'\\]"),
       (dict(layer=0.5), TypeError, 'layer=0.5 is not a layer'),
       (dict(idx='3'), TypeError, r"idx='3' is not a dataset index: use an int or a list of ints in 0..7"),
       (dict(idx=[0, 8]), IndexError, r'idx=\[8\] is out of range: the validation set has 8 items \(0..7\)'),
       (dict(idx=[]), ValueError, 'idx is empty'),
       (dict(method=3), TypeError, "method=3 is not a name: use one of 'attention'"),
       (dict(method='lime'), ValueError, "method='lime' is not a relevance method: use one of 'attention'"),
       (dict(method='occlusion', head=0), ValueError, 'model-agnostic: it takes no layer= or head='),
       (dict(method='rollout', head=0), ValueError, 'rollout averages the heads'),
       (dict(target=3), ValueError, r'target=3 is not an output number: the model has 1 outputs \(0..0\)'),
       (dict(target='y'), ValueError, "target='y' is not an output number"),
       (dict(part='bias'), ValueError, "part='bias': use 'effective' or 'softmax'")]

@pytest.mark.parametrize('kw,err,msg', BAD, ids=[str(k) for k, _, _ in BAD])
def test_arguments_checked_before_any_work(reg_learner, kw, err, msg):
    learn, X = reg_learner
    calls = []
    h = learn.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(err, match=msg): learn.relevance(**kw)
    finally: h.remove()
    assert calls == []                                                                     # no forward ran
    no_leftovers(learn.model)

@pytest.mark.parametrize('method', ['attention', 'grad_attention', 'occlusion'])
def test_X_shape_checked_for_every_method(reg_learner, method):
    "X with the wrong variables: the same clear error for every method, occlusion included (it was the convolution's own)"
    learn, X = reg_learner
    with pytest.raises(ValueError, match=r'X has 2 variables \(shape \[2, 2, 48\]\); the model expects 3'): learn.relevance(X=X[:2, :2], method=method)
    with pytest.raises(ValueError, match='X has seq_len 40'): learn.relevance(X=X[:2, :, :40], method=method)
    r = learn.relevance(X=X[:2], method=method)
    assert r.shape == (2, 48) and np.isfinite(r).all()
