"Issue 10: bad input is refused, or skipped with a warning, the same way at every entry point; figures stay drawable."
import warnings
import numpy as np, pytest, torch
import matplotlib.pyplot as plt
from tsai_attnviz.all import *
from tsai_attnviz.cli import load_dataset
from conftest import make_learner, no_leftovers

@pytest.fixture(scope='module')
def learn(bm_data):
    learn = make_learner(*bm_data)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3)
    return learn

def nan_X(X):
    X = X[:6].copy(); X[2, 1, 7] = np.nan; X[4, 0, 0] = np.inf
    return X

def test_nan_is_refused_by_entry_points_that_take_X(learn, bm_data):
    X = nan_X(bm_data[0])
    for f in (lambda: learn.show_attention(X=X), lambda: learn.record_attention(X=X), lambda: learn.show_attention(X=X, aggregate='mean')):
        with pytest.raises(ValueError, match=r'X has 2 NaN or inf values \(first at \[2, 1, 7\]\); expected finite numbers'): f()
    no_leftovers(learn.model)

def test_nan_in_a_recorded_pass_warns_and_keeps_finite_items_drawable(learn, bm_data):
    X = nan_X(bm_data[0])
    rec = AttnRecorder(batches=None, aggregate='mean', max_len=None)
    learn.add_cb(rec)
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter('always')
            learn.get_X_preds(X)
        msg = [str(w.message) for w in ws if 'AttnRecorder' in str(w.message)]
        assert msg and 'batch 0 has 2 NaN or inf values (first at [2, 1, 7])' in msg[0] and 'Items [2, 4]' in msg[0]
        r = rec.recording
        assert r.idxs == [0, 1, 3, 5] and torch.isfinite(r.weights).all()
        assert r.aggregates['mean'][1] == 4 and torch.isfinite(r.mean_map()).all()  # means over the finite items only
        f = learn.show_attention(batch=0, sample=[0, 1, 3])
        assert all(np.isfinite(a.images[0].get_clim()).all() for a in f.axes[:8])
        learn.show_attention(view='series', idx=3)
    finally: learn.remove_cb(rec); plt.close('all')

@pytest.mark.bitwise
def test_integer_and_univariate_2d_X_are_taken_as_the_cli_takes_them(learn, bm_data):
    X = bm_data[0][:4]
    r_int = learn.record_attention(X=np.round(X * 100).astype('int64'), samples=[0])
    r_f = learn.record_attention(X=np.round(X * 100).astype('float32'), samples=[0])
    assert torch.equal(r_int.weights, r_f.weights)
    Xg, yg, sg = load_dataset('GunPoint')
    gp = make_learner(Xg, yg, sg)
    r2 = gp.record_attention(X=Xg[sg[1][:3], 0], samples=[1])  # [n, seq_len] for a univariate model
    r3 = gp.record_attention(X=Xg[sg[1][:3]], samples=[1])
    assert torch.equal(r2.weights, r3.weights)

def test_messages_name_what_is_allowed(learn):
    with pytest.raises(ValueError, match=r'max_mem=0: use a positive number of MB'): AttnRecorder(max_mem=0)
    with pytest.raises(ValueError, match=r"max_len=0: use a positive number of cells, None \(full maps\) or 'auto'"): AttnRecorder(max_len=0)
    rec = AttnRecorder(heads=[2, 5], samples=[0])
    learn.add_cb(rec)
    try:
        learn.get_preds()
        with pytest.raises(IndexError, match=r'head=3 is not recorded: heads are \[2, 5\]\.$'): learn.show_attention(head=3)
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter('always')
            learn.get_preds(cbs=[AttnRecorder(samples=[0, 40])])
        assert any('samples=[40] were not in this pass, which had batches of at most' in str(w.message) for w in ws)
    finally: learn.remove_cb(rec)
    with pytest.raises(ValueError, match=r'X has 5 variables \(shape \[3, 5, 100\]\)'): learn.record_attention(X=np.zeros((3, 5, 100)))

def test_default_recorder_at_the_users_length_records_reduced_maps():
    "AttnRecorder() at seq_len=3000: one full sample (288 MB) passes max_mem=256, so maps are reduced to fit, and it says so"
    from tsai.basics import TSRegressor
    from tsai.models.ConvTranPlus import ConvTranPlus
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 3, 3000)).astype('float32'); y = rng.standard_normal(4).astype('float32')
    learn = TSRegressor(X, y, splits=([0, 1], [2, 3]), arch=ConvTranPlus, bs=2, verbose=False)
    rec = AttnRecorder()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn.get_preds(cbs=[rec])
    r = rec.recording
    assert len(r) == 2 and r.weights.shape[-1] < 3000 and r.nbytes <= 256 * 2**20
    assert sum("max_len='auto'" in str(w.message) for w in ws) == 1
    assert r.key_attn.shape[-1] == 3000  # attention received stays at full resolution
