"Issue 10: items are named as tsai decodes them: regression and forecast values, label sets, class names after load_learner."
import warnings
import numpy as np, pytest, torch
import matplotlib.pyplot as plt
from fastai.learner import load_learner
from tsai.basics import TSRegressor, TSForecaster, TSClassifier, TSClassification, TSMultiLabelClassification
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.all import *
from tsai_attnviz.cli import load_dataset
from conftest import make_learner, no_leftovers
from test_bins import row_labels

@pytest.fixture(scope='module')
def regression():
    "BasicMotions as the users' task: c_out=1, a regression (target: each item's mean of variable 0 over the last 20 steps)"
    X, _, splits = load_dataset('BasicMotions')
    y = X[:, 0, -20:].mean(-1).astype('float32')
    learn = TSRegressor(X, y, splits=splits, arch=ConvTranPlus, bs=16, verbose=False, seed=0)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3)
    return learn, X, y, splits

def test_regression_titles_show_values(regression):
    learn, X, y, splits = regression
    rec = learn.record_attention(idxs=[3])
    r = rec.records[0]
    assert rec.meta['task'] == 'regression' and abs(r['target'] - y[splits[1][3]]) < 1e-6
    learn.add_cb(AttnRecorder(idxs=[3]))
    try:
        learn.get_preds()
        title = learn.show_attention(idx=3, head=0).axes[0].get_title().splitlines()[-1]
        assert title == f"True: {y[splits[1][3]]:.4g} · Pred: {learn.attn_recorder.recording.preds[0, 0].item():.4g}"
        series = learn.show_attention(view='series', idx=3).axes[0].get_title()
        assert series.startswith(f"True: {y[splits[1][3]]:.4g} · Pred: ")
    finally: learn.remove_cb(learn.attn_recorder); plt.close('all')

def test_regression_refuses_class_means_and_offers_bins(regression):
    learn, X, y, splits = regression
    with pytest.raises(ValueError, match="regression .*use aggregate='bins'"): learn.show_attention(aggregate='class')
    with pytest.raises(ValueError, match="aggregate='bins'"): learn.get_preds(cbs=[AttnRecorder(aggregate='class')])
    no_leftovers(learn.model)
    rec = AttnRecorder(batches=None, samples=[], aggregate='bins', bins=4, max_len=20)
    learn.get_preds(cbs=[rec])
    r = rec.recording
    edges = np.quantile(y[splits[0]], np.linspace(0, 1, 5))  # quartiles of the training targets, computed here
    # written with 4 significant digits (the figures write them exactly): within half a unit of the 4th digit
    np.testing.assert_allclose(r.meta['bin_edges'], edges, rtol=5e-4)
    e, yv = r.meta['bin_edges'], y[splits[1]]
    # by hand: below the first edge, the four bins (the last one closed), above the last edge
    parts = [yv < e[0]] + [(yv >= a) & (yv < b) for a, b in zip(e[:3], e[1:4])] + [(yv >= e[3]) & (yv <= e[4]), yv > e[4]]
    want = {k: int(m.sum()) for k, m in zip(bin_labels(e), parts) if m.any()}
    assert {k: v[1] for k, v in r.aggregates['bins'].items()} == want and sum(want.values()) == len(yv)
    learn.add_cb(rec)
    try:
        f = learn.show_attention(aggregate='bins')
        assert row_labels(f) == [f'true {k} (n={n})' for k, n in want.items()]
    finally: learn.remove_cb(rec); plt.close('all')

def test_forecaster_titles():
    X, y, splits = load_dataset('BasicMotions')
    Xin, yf = X[:, :, :80], X[:, 0, 80:86]  # forecast the next 6 steps of variable 0
    fc = TSForecaster(Xin, yf, splits=splits, arch=ConvTranPlus, bs=16, verbose=False, seed=0)
    rec = fc.record_attention(idxs=[0])
    r = rec.records[0]
    assert r['target'].shape == (6,) and torch.allclose(r['target'], torch.tensor(yf[splits[1][0]]))
    fc.add_cb(AttnRecorder(idxs=[0]))
    fc.get_preds()
    t = fc.show_attention(idx=0, head=1).axes[0].get_title().splitlines()[-1]
    assert t.startswith('True: [' + ', '.join(f'{v:.4g}' for v in yf[splits[1][0]][:4]) + ', … 6 values] · Pred: [')
    fc.remove_cb(fc.attn_recorder)
    # Multi-label titles are checked in nbs/04_data.ipynb: tsai 1.0.1's own validate()/get_preds() fail on multi-label
    # BasicMotions ('Target size ... must be the same as input size'), so no real multi-label pass can run here.
    plt.close('all')

def test_class_names_after_load_learner_and_integer_labels(tmp_path):
    X, y, splits = load_dataset('GunPoint')
    yi = y.astype(int)  # GunPoint's labels are the integers 1 and 2
    learn = make_learner(X, yi, splits)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    learn.export(tmp_path/'gp.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = load_learner(tmp_path/'gp.pkl')
    Xv, yv = X[splits[1][:12]], yi[splits[1][:12]]
    with pytest.raises(ValueError, match=r'pass X=\.\.\.'): loaded.show_attention()  # no data after loading: say what to pass
    loaded.add_cb(AttnRecorder(batches=None, samples=[0], aggregate='class', max_len=30))
    loaded.get_X_preds(Xv, yv)
    r = loaded.attn_recorder.recording
    assert r.meta['vocab'] == ['1', '2']
    title = loaded.show_attention(batch=0, sample=0, head=0).axes[0].get_title().splitlines()[-1]
    assert title.startswith(f'True: {yv[0]} · Pred: ')  # names, not positions, after load_learner
    f = loaded.show_attention(aggregate='class', classes=[1])  # class 1 is label 1, not position 1
    assert f.axes[0].get_ylabel().startswith(f'Class 1 (n={(yv == 1).sum()})')
    with pytest.raises(ValueError, match=r"class 3 is not one of the model's classes: \['1', '2'\]"):
        loaded.show_attention(aggregate='class', classes=[3])
    plt.close('all')

def test_class_means_group_by_true_label_not_prediction(bm_data):
    "On an untrained learner predictions differ from targets: means must follow the targets"
    X, y, splits = bm_data
    learn = make_learner(X, y, splits)  # untrained
    rec = AttnRecorder(batches=None, aggregate='class', max_len=None)
    learn.get_preds(cbs=[rec])
    r = rec.recording
    targets = torch.tensor(r.targets)
    assert (r.preds.argmax(-1) != targets).any()  # the case where grouping matters
    for c in targets.unique().tolist():
        torch.testing.assert_close(r.mean_map(learn.dls.vocab[c]), r.weights[targets == c].double().mean(0).float())  # keyed by label
    assert r.meta['agg_by'] == 'target'

def test_class_means_keyed_by_label_pigcvp(tmp_path):
    "Issue 17 §10: PigCVP's 52 classes ('1', '10', '11', ...): the keys the recording exposes go back into the views as they are"
    X, y, splits = load_dataset('PigCVP')
    X = X[:, :, :60]  # the first 60 steps: the labels are what matters here, not the length
    learn = make_learner(X, y, splits)
    rec = AttnRecorder(batches=None, samples=[], aggregate='class', max_len=10)
    with learn.no_bar(): learn.get_preds(cbs=[rec])
    r = rec.recording
    yv = y[splits[1]]
    assert r.group_keys == [c for c in learn.dls.vocab if c in set(yv)]  # labels, in tsai's vocab order
    assert {k: n for k, (_, n) in r.aggregates['class'].items()} == {c: int((yv == c).sum()) for c in set(yv)}  # counted by hand
    keys = sorted(r.aggregates['class'])[:2]
    f = learn.show_attention(aggregate='class', classes=keys, recorder=rec)
    assert row_labels(f) == [f"Class {k} (n={int((yv == k).sum())})" for k in keys]
    torch.testing.assert_close(r.mean_map(keys[0]), r.aggregates['class'][keys[0]][0].float() / int((yv == keys[0]).sum()))
    r2 = AttnRecording.load(r.save(tmp_path/'pig.npz'))
    assert r2.group_keys == r.group_keys and all(torch.equal(r2.mean_map(k), r.mean_map(k)) for k in keys)
    plt.close('all')

def test_old_recordings_load_with_label_keys(tmp_path):
    "A version 3 file keyed its class means by class number and its bins by bin number: loaded, both are keyed as the figures write them"
    import json
    rec = AttnRecording(aggregates={'mean': (torch.ones(2, 3, 3) * 6, 6), 'class': {0: (torch.ones(2, 3, 3), 1), 1: (torch.ones(2, 3, 3) * 5, 5)}},
                        meta=dict(task='classification', vocab=['1', '10'], heads=[0, 1]))
    p = rec.save(tmp_path/'old.npz')
    z = dict(np.load(p)); meta = json.loads(str(z['meta'])); meta['version'] = 3
    z['meta'] = np.array(json.dumps(meta)); z['agg_class_keys'] = np.array([0, 1]); np.savez(p, **z)
    r = AttnRecording.load(p)
    assert r.group_keys == ['1', '10'] and r.aggregates['class']['10'][1] == 5
    b = AttnRecording(aggregates={'bins': {0: (torch.ones(1, 2, 2), 2), 2: (torch.ones(1, 2, 2), 3)}},
                      meta=dict(task='regression', bin_edges=[0., 1., 2., 3.], heads=[0]))
    p = b.save(tmp_path/'oldb.npz')
    z = dict(np.load(p)); meta = json.loads(str(z['meta'])); meta['version'] = 3; meta.pop('bin_keys', None)
    z['meta'] = np.array(json.dumps(meta)); z['agg_bins_keys'] = np.array([0, 2]); np.savez(p, **z)
    r = AttnRecording.load(p)
    # the old end bins took every item beyond the edges: their labels are open
    assert list(r.aggregates['bins']) == ['y < 1', 'y ≥ 2'] and r.group_keys == ['y < 1', 'y ≥ 2']
