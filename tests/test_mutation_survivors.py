"Mutation-pass survivors: each test compares against a computation made here, outside the package."
import numpy as np, pytest, torch
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib.backend_bases import MouseEvent
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from tsai.basics import TSRegressor, TSForecaster
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.all import *
from conftest import make_learner, stock_effective_attention, no_leftovers
from test_cli import demo, user_data, run  # noqa: F401 (fixtures)


# -- R03: a target exactly on a bin edge belongs to the bin that starts there ([e_i, e_i+1), last bin closed)
def test_bins_put_a_target_on_an_edge_in_the_bin_it_starts(bm_data):
    X, labels, splits = bm_data
    y = np.unique(labels, return_inverse=True)[1].astype('float32')        # 0., 1., 2., 3.: every target sits on an edge
    learn = TSRegressor(X, y, splits=splits, arch=ConvTranPlus, bs=16, verbose=False, seed=0)
    rec = AttnRecorder(batches=None, samples=[], aggregate='bins', bins=[0, 1, 2, 3], max_len=20)
    learn.get_preds(cbs=[rec])
    yv = y[splits[1]]
    want = {'y in [0, 1)': (yv == 0).sum(), 'y in [1, 2)': (yv == 1).sum(), 'y in [2, 3]': ((yv == 2) | (yv == 3)).sum()}  # the last bin closed
    assert {k: n for k, (_, n) in rec.recording.aggregates['bins'].items()} == {k: int(n) for k, n in want.items() if n}


# -- R13: every record made by one forward carries that forward's number
def test_records_of_one_forward_share_its_number(bm_learner):
    rec = AttnRecorder(batches=[0, 1], samples=[0, 3], stats=True)
    bm_learner.get_preds(cbs=[rec])
    f = rec.recording.forwards
    assert f == [f[0], f[0], f[0] + 1, f[0] + 1]                         # two batches: two forwards, two samples each
    assert len(rec.recording.stats_df(per='forward')) == 2 * 8           # one row per forward and head


# -- R15, G04: each record keeps its own block side, in memory and through save/load
def test_blocks_per_record_in_memory_and_on_disk(bm_learner, tmp_path):
    rec = AttnRecorder(idxs=[5], accumulate=True, max_len=None)
    bm_learner.add_cb(rec)
    try:
        bm_learner.get_preds()
        rec.max_len = 10
        bm_learner.get_preds()
    finally: bm_learner.remove_cb(rec)
    r = rec.recording
    want = [100 // x['weights'].shape[-1] for x in r.records]             # the block side each map was averaged with
    assert want == [1, 10] and r.blocks == want
    assert AttnRecording.load(r.save(tmp_path/'b.npz')).blocks == want


# -- R16: dataset indices with a plain fastai DataLoader (no `idxs` attribute) and a short last batch
def test_idxs_with_a_plain_dataloader_and_a_short_last_batch(bm_data):
    X, y, splits = bm_data
    Xv = torch.tensor(X[splits[1][:8]])
    dl = DataLoader(list(zip(Xv, torch.zeros(8, dtype=torch.long))), bs=3, shuffle=False)   # batches of 3, 3, 2
    torch.manual_seed(0)
    learn = Learner(DataLoaders(dl, dl), ConvTranPlus(6, 4, 100), loss_func=torch.nn.CrossEntropyLoss())
    rec = AttnRecorder(idxs=[7, 4])
    learn.get_preds(cbs=[rec])
    r = rec.recording
    assert sorted(r.idxs) == [4, 7]
    for x in r.records: assert torch.equal(x['input'], Xv[x['idx']])    # item 7 is the 2nd of the last batch


# -- G01: splits survive save/load (probe records; training and validation records)
def test_round_trip_keeps_splits(bm_data, tmp_path):
    learn = make_learner(*bm_data)
    probe, steps = AttnRecorder(every_epoch=True, probe=[0]), AttnRecorder(train=True, batches=[0], samples=[0])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=[probe])
        learn.fit(1, 1e-3, cbs=[steps])
    r2 = AttnRecording.load(probe.recording.save(tmp_path/'p.npz'))
    assert (r2.splits, r2.epochs) == (['probe', 'probe'], [0, 1])          # before training, after epoch 0
    r2 = AttnRecording.load(steps.recording.save(tmp_path/'s.npz'))
    assert (r2.splits, r2.epochs) == (['train', 'valid'], [0, 0])          # training batch 0, then validation batch 0


# -- G05: vector targets (a forecast) survive save/load
def test_round_trip_keeps_forecast_targets(bm_data, tmp_path):
    X, _, splits = bm_data
    Xin, yf = X[:, :, :80], X[:, 0, 80:86]
    fc = TSForecaster(Xin, yf, splits=splits, arch=ConvTranPlus, bs=16, verbose=False, seed=0)
    r2 = AttnRecording.load(fc.record_attention(idxs=[0, 3]).save(tmp_path/'f.npz'))
    for t, i in zip(r2.targets, r2.idxs): torch.testing.assert_close(t, torch.tensor(yf[splits[1][i]]))


# -- L04, L05: ConvTranPlusWithAttn keeps the latest eval forwards, and no training forward
def _stock_copy(m):
    s = ConvTranPlus(3, 2, 30)
    s.load_state_dict(m.state_dict())
    return s

def test_convtranpluswithattn_drops_the_oldest_forwards():
    torch.manual_seed(0)
    one = 2 * 8 * 30 * 30 * 4                                            # bytes of one forward of 2 items
    m = ConvTranPlusWithAttn(3, 2, 30, max_mem=2.5 * one / 2**20).eval()  # room for 2 forwards
    xs = [torch.randn(2, 3, 30) for _ in range(4)]
    with torch.no_grad():
        for x in xs: m(x)
    got = list(m.attention_weights)
    assert len(got) == 2
    s = _stock_copy(m)
    for w, x in zip(got, xs[2:]): torch.testing.assert_close(w, stock_effective_attention(s, x))

def test_convtranpluswithattn_stores_no_training_forward():
    torch.manual_seed(0)
    m = ConvTranPlusWithAttn(3, 2, 30).train()
    m(torch.randn(4, 3, 30)).sum().backward()
    assert len(m.attention_weights) == 0                                  # store='eval': training forwards are not kept
    x = torch.randn(2, 3, 30)
    with torch.no_grad(): m.eval()(x)
    assert len(m.attention_weights) == 1
    torch.testing.assert_close(m.attention_weights[0], stock_effective_attention(_stock_copy(m), x))


# -- N01, N03: heads recorded out of order / a subset: show_attention's head is the model's head number
def test_show_attention_head_is_the_models_head_number(bm_learner):
    rec = AttnRecorder(heads=[5, 2], samples=[0])
    bm_learner.add_cb(rec)
    try:
        bm_learner.get_preds()
        want = stock_effective_attention(bm_learner.model, rec.recording.inputs)[0, 2]   # head 2 of the model, here
        f = bm_learner.show_attention(head=2)
        np.testing.assert_allclose(np.asarray(f.axes[0].images[0].get_array()), want.numpy(), rtol=1e-5, atol=1e-7)
        for h in (0, 1):                                                  # in range as positions, but not recorded
            with pytest.raises(IndexError, match=rf'head={h} is not recorded: heads are \[5, 2\]\.$'): bm_learner.show_attention(head=h)
    finally: bm_learner.remove_cb(rec); plt.close('all')


# -- P01: a non-finite map leaves the shared scale to the finite values
def test_shared_scale_ignores_nonfinite_values():
    torch.manual_seed(0)
    w = torch.rand(2, 3, 10, 10)
    w[1, 2] = float('nan')                                                # one panel not finite (a NaN input)
    fin = w[torch.isfinite(w)]
    f = plot_head_grid(w)
    for a in f.axes[:6]: assert a.images[0].get_clim() == pytest.approx((fin.min().item(), fin.max().item()))
    plt.close('all')


# -- P02, P03: the over-the-series view: bars from 0, shading cells centred on their time steps
def test_series_view_baseline_and_shading_cells():
    torch.manual_seed(0)
    L = 50
    x, a = torch.randn(2, L), torch.rand(4, L) * 0.05 + 0.01              # every value >= 0
    f = plot_attention_over_series(x, a, figsize=(10, 4.4))
    top, bottom, _ = f.axes
    assert bottom.get_ylim()[0] == 0                                      # attention received drawn from 0
    im = top.images[0]
    assert im.get_array().shape[-1] == L                                  # one cell per step at this size
    np.testing.assert_allclose(im.get_array()[0], a.mean(0).numpy(), rtol=1e-6)
    assert list(im.get_extent()[:2]) == [-0.5, L - 0.5]                   # cell t spans t-0.5 .. t+0.5, centred on the point at t
    plt.close('all')


# -- P04: the heatmap shows map[q, k] at (key k, query q)
def test_heatmap_cell_under_key_and_query():
    L = 20
    m = torch.zeros(1, 1, L, L)
    m[0, 0, 3, 11] = 1.                                                   # query 3 attends to key 11
    f = plot_attention_weights([m])
    ax = f.axes[0]
    f.canvas.draw()
    for q, k in [(3, 11), (11, 3), (16, 11)]:
        x, y = ax.transData.transform((k + 0.5, q + 0.5))
        ev = MouseEvent('motion_notify_event', f.canvas, x, y)
        assert ax.images[0].get_cursor_data(ev) == m[0, 0, q, k].item(), (q, k)
    plt.close('all')


# -- C03: --idxs past the data is refused (off by one)
def test_show_idxs_one_past_the_end(demo, user_data):
    out, _ = demo
    p = run('show', out/'learner.pkl', '--data', user_data/'X.npy', '--idxs', '6')
    assert p.returncode == 2 and '--idxs [6] out of range: --data has 6 samples (0..5)' in p.stderr, p.stderr


# -- R09: a recorder given with fit(cbs=...) is removed by fastai however fit ends; removing it ends its pass
from fastai.callback.core import Callback

class FailBeforeFit(Callback):
    "Another callback's bug: raises in before_fit, after the recorder's before_fit (order 60) has run"
    order = 70
    def before_fit(self): raise RuntimeError('another callback failed')

def test_fit_cbs_failing_before_the_first_epoch_leave_no_guard(bm_data, tmp_path):
    learn = make_learner(*bm_data)
    with pytest.raises(RuntimeError, match='another callback failed'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[AttnRecorder(), FailBeforeFit()])
    assert '_with_events' not in learn.__dict__                          # the Learner's own method again
    no_leftovers(learn.model)
    learn.export(tmp_path/'l.pkl')                                         # nothing unpicklable left on the Learner
