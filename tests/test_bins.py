"Issue 17 §4: regression bins beyond the training range: each bin's label covers the true targets of its items."
import re
import numpy as np, pytest, torch
import matplotlib.pyplot as plt
from tsai.basics import TSRegressor
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.all import *
from tsai_attnviz.cli import load_dataset

def _covers(label:str, v:np.ndarray)->np.ndarray:
    "Which values `v` a label as the figures write it ('y < a', 'y in [a, b)', 'y in [a, b]', 'y > b') covers: read from its text alone"
    num = r'(-?[\d.]+(?:e[-+]?\d+)?)'
    if m := re.fullmatch(rf'y < {num}', label): return v < float(m[1])
    if m := re.fullmatch(rf'y > {num}', label): return v > float(m[1])
    m = re.fullmatch(rf'y in \[{num}, {num}([)\]])', label)
    assert m, f'unreadable bin label {label!r}'
    a, b = float(m[1]), float(m[2])
    return (v >= a) & ((v <= b) if m[3] == ']' else (v < b))

def row_labels(fig)->list:
    "The mean maps' row labels ('Class 10 (n=4)', 'true y in [0.5, 1.2) (n=9)') in a figure, wherever it writes them (axis labels or texts)"
    texts = []
    for ax in fig.axes: texts += [ax.get_ylabel(), ax.get_title()] + [t.get_text() for t in ax.texts]
    texts += [t.get_text() for t in fig.texts]
    return [m for t in texts for m in re.findall(r'((?:Class \S+|(?:true|predicted) y .*?) \(n=\d+\))', t.replace('\n', ' '))]

@pytest.fixture(scope='module')
def beyond():
    "BasicMotions as a regression (mean of variable 0 over the last 20 steps), trained on the middle of the targets' range only"
    X, _, _ = load_dataset('BasicMotions')
    y = X[:, 0, -20:].mean(-1).astype('float32')
    order = np.argsort(y)
    lo, hi = int(len(y) * .2), int(len(y) * .8)
    splits = (sorted(order[lo:hi].tolist()), sorted(order[:lo].tolist() + order[hi:].tolist()))  # valid: below and above the training range
    learn = TSRegressor(X, y, splits=splits, arch=ConvTranPlus, bs=16, verbose=False, seed=0)
    yt, yv = y[splits[0]], y[splits[1]]
    assert (yv < yt.min()).sum() > 0 and (yv > yt.max()).sum() > 0  # the case of the issue, on both sides
    return learn, yv

def _check_labels(keys_n:dict, yv):
    "Every label covers its items and counts them, and the bins together hold every item once"
    covered = np.zeros(len(yv), int)
    for label, n in keys_n.items():
        m = _covers(label, yv)
        assert m.sum() == n, (label, int(m.sum()), n)
        covered += m
    assert (covered == 1).all(), covered

def test_bins_beyond_the_training_range(beyond):
    learn, yv = beyond
    rec = AttnRecorder(batches=None, samples=[], aggregate='bins', bins=4, max_len=20)
    with learn.no_bar(): learn.get_preds(cbs=[rec])
    r = rec.recording
    got = {k: n for k, (_, n) in r.aggregates['bins'].items()}
    _check_labels(got, yv)
    assert any(k.startswith('y < ') for k in got) and any(k.startswith('y > ') for k in got)
    # the figure writes the same labels, each with its count; the keys go back into the view as they are
    f = learn.show_attention(aggregate='bins', recorder=rec)
    assert row_labels(f) == [f'true {k} (n={n})' for k, n in got.items()] and list(got) == r.group_keys
    some = r.group_keys[::2]
    f = learn.show_attention(aggregate='bins', classes=some, recorder=rec)
    assert row_labels(f) == [f'true {k} (n={got[k]})' for k in some]
    torch.testing.assert_close(r.mean_map(some[0]), r.aggregates['bins'][some[0]][0].float() / got[some[0]])
    plt.close('all')

def test_given_edges_and_saved_recordings(beyond, tmp_path):
    "Edges given by hand: items outside them get bins of their own too; saving and loading keeps the keys"
    learn, yv = beyond
    edges = [float(np.quantile(yv, .3)), float(np.quantile(yv, .7))]
    rec = AttnRecorder(batches=None, samples=[], aggregate='bins', bins=edges, max_len=20)
    with learn.no_bar(): learn.get_preds(cbs=[rec])
    got = {k: n for k, (_, n) in rec.recording.aggregates['bins'].items()}
    _check_labels(got, yv)
    assert len(got) == 3
    r2 = AttnRecording.load(rec.recording.save(tmp_path/'r.npz'))
    assert r2.group_keys == rec.recording.group_keys and {k: n for k, (_, n) in r2.aggregates['bins'].items()} == got
