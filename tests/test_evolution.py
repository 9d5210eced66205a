"Issue 7: attention through training (probe per epoch), statistics, folds, and recording training steps."
import copy, random
import numpy as np, pytest, torch
import matplotlib; matplotlib.use('Agg')
from fastai.callback.core import Callback
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.all import *
from conftest import make_learner, stock_effective_attention, no_leftovers

class KeepWeights(Callback):
    "Copies of the model's weights before training and after each epoch, for independent checks"
    order = 100
    def before_fit(self): self.states = [copy.deepcopy(self.learn.model.state_dict())]
    def after_epoch(self): self.states.append(copy.deepcopy(self.learn.model.state_dict()))

class CheckMode(Callback):
    "After the recorder's probe (order 60), training batches still see a model in train mode"
    order = 61
    def before_batch(self):
        if self.training: assert self.learn.model.training

def fit(bm_data, cbs, epochs=3, seed=7):
    learn = make_learner(*bm_data, seed=seed)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3, cbs=cbs + [CheckMode()])
    learn.after_fit_draws = (random.random(), np.random.rand(), torch.rand(1).item())  # the random streams after fit
    return learn

@pytest.fixture(scope='module')
def runs(bm_data):
    keep = KeepWeights()
    rec = AttnRecorder(every_epoch=True, probe=[0, 13, 27], train=True, batches=[0], samples=[0])
    with_rec = fit(bm_data, [rec, keep])
    without = fit(bm_data, [])
    return with_rec, without, rec, keep

@pytest.mark.bitwise
def test_training_unaffected(runs):
    with_rec, without, *_ = runs
    assert [l.item() for l in with_rec.recorder.losses] == [l.item() for l in without.recorder.losses]
    assert with_rec.recorder.values == without.recorder.values
    a, b = with_rec.model.state_dict(), without.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # final weights, bitwise
    assert with_rec.after_fit_draws == without.after_fit_draws  # the same random streams
    no_leftovers(with_rec.model)

def test_probe_maps_per_epoch_equal_independent_forwards(runs, bm_data):
    _, _, rec, keep = runs
    r = rec.recording.filter(split='probe')
    assert sorted(set(r.epochs)) == [0, 1, 2, 3] and len(r) == 4 * 3
    X, y, splits = bm_data
    model = ConvTranPlus(6, 4, 100)
    for e in range(4):
        model.load_state_dict(keep.states[e])
        re = r.filter(epoch=e)
        assert re.idxs == [0, 13, 27]
        torch.testing.assert_close(re.weights, stock_effective_attention(model, re.inputs), rtol=0, atol=1e-6)
    w = [r.filter(epoch=e).weights for e in range(4)]
    assert sum(not torch.equal(w[i], w[i + 1]) for i in range(3)) >= 2  # maps change as training proceeds

def test_training_steps_recorded_detached(runs):
    _, _, rec, _ = runs
    tr = rec.recording.filter(split='train')
    assert len(tr) == 3 and tr.epochs == [0, 1, 2] and tr.batches == [0, 0, 0]
    assert all(x['idx'] is not None for x in tr.records)  # tsai's loaders tell the shuffled indices
    assert not tr.weights.requires_grad and tr.weights.grad_fn is None

def test_stats_table_against_direct_computation(runs, bm_data):
    _, _, rec, keep = runs
    df = rec.recording.stats_df()
    r = rec.recording.filter(split='probe', epoch=2, idx=13)
    model = ConvTranPlus(6, 4, 100)
    model.load_state_dict(keep.states[2])
    w = stock_effective_attention(model, r.inputs)[0]                      # [8, 100, 100]
    a = model.backbone.attention_layer
    i = torch.arange(100)
    p = w - a.relative_bias_table.detach()[i[:, None] - i[None] + 99].permute(2, 0, 1)   # the softmax part
    row = df[(df.split == 'probe') & (df.epoch == 2) & (df.idx == 13)].sort_values('head')
    ent = (-(p * p.log()).sum(-1)).mean(-1)
    dist = (i[:, None] - i[None]).abs().float()
    md = (p * dist).sum(-1).mean(-1)
    np.testing.assert_allclose(row['min'], w.amin((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(row['max'], w.amax((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(row['rowsum_max'], w.sum(-1).amax(-1), rtol=1e-5)
    np.testing.assert_allclose(row['entropy'], ent, rtol=1e-4)
    np.testing.assert_allclose(row['mean_distance'], md, rtol=1e-4)
    per_fwd = rec.recording.stats_df(per='forward')
    assert len(per_fwd) == len(df.groupby(['split', 'epoch', 'forward', 'head']))

def test_evolution_figures(runs, tmp_path):
    with_rec, _, rec, _ = runs
    with_rec.add_cb(rec)
    try:
        f = with_rec.show_attention_evolution(idx=13, path=tmp_path/'evo.png')
        assert len(f.axes) == 4 * 8 + 1 + 5  # epochs × heads, colour bar, 5 statistics (eRPE: the bias share too)
        f = with_rec.show_attention_evolution(head=2, path=tmp_path/'evo_h2.png')
        assert [a.get_title() for a in f.axes[:4]] == ['Epoch 0 (before training)', 'Epoch 1', 'Epoch 2', 'Epoch 3']
        f = plot_attention_stats(rec.recording.stats_df(), x='forward', path=tmp_path/'stats.png')
        assert len(f.axes) == 4
        with pytest.raises(IndexError, match=r'head=9 is not recorded'): with_rec.show_attention_evolution(head=9)
    finally: with_rec.remove_cb(rec)
    for n in ['evo', 'evo_h2', 'stats']: assert (tmp_path/f'{n}.png').stat().st_size > 20_000

def test_folds_saved_loaded_compared(bm_data, tmp_path):
    "Each fold's model sees the same held-out items; their recordings, saved and loaded, are drawn side by side"
    X, y, splits = bm_data
    test = np.array(splits[1][30:])                                   # held out from every fold
    pool = np.array(splits[0] + splits[1][:30])
    files = []
    for fold, va in enumerate(np.array_split(np.random.default_rng(0).permutation(pool), 2)):
        tr = sorted(set(pool) - set(va))
        learn = make_learner(X, y, (tr, sorted(va)), seed=fold)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
        rec = AttnRecorder(idxs=[2], tag=f'Fold {fold + 1}')
        learn.add_cb(rec)
        learn.get_X_preds(X[test])
        learn.remove_cb(rec)
        assert torch.equal(rec.recording.inputs[0], torch.from_numpy(X[test[2]]))
        files.append(rec.recording.save(tmp_path/f'fold{fold + 1}.npz'))
    recs = [AttnRecording.load(f) for f in files]
    f = plot_item_across_folds(recs, idx=2, path=tmp_path/'folds.png')
    assert [a.get_ylabel().split('\n')[0] for a in f.axes[:-1] if a.get_ylabel()] == ['Fold 1, Batch 0', 'Fold 2, Batch 0']
    assert not torch.equal(recs[0].weights, recs[1].weights)           # two models, two maps
    with pytest.raises(ValueError, match='idx=3 is in none of the recordings'): plot_item_across_folds(recs, idx=3)
