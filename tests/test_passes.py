"Issue 10: whatever way a pass ends, the model is left stock and recorded data is kept or replaced, never corrupted."
import pickle, warnings
import numpy as np, pytest, torch
from fastai.callback.core import Callback, CancelFitException
from tsai_attnviz.all import *
from conftest import make_learner, no_leftovers

class Raise(Callback):
    "Raises `exc` in the after_pred of training batch 1 of epoch `epoch`: an interrupt or another callback's bug"
    order = 70
    def __init__(self, exc, epoch=0): self.exc,self.ep = exc,epoch
    def after_pred(self):
        if self.training and self.epoch == self.ep and self.iter == 1: raise self.exc

@pytest.fixture
def learn(bm_data):
    learn = make_learner(*bm_data)
    with learn.no_bar(), learn.no_logging(): yield learn

def stock_pickle(learn):
    "The exported learner holds stock tsai classes only (it loads without tsai_attnviz)"
    learn.export('/dev/null')  # fails if anything in it can't be pickled
    return b'tsai_attnviz' not in pickle.dumps(learn.model)

@pytest.mark.parametrize('exc', [KeyboardInterrupt(), RuntimeError('another callback failed'), CancelFitException()])
@pytest.mark.parametrize('attached', [False, True])
def test_any_exit_from_fit_leaves_the_model_stock(learn, exc, attached):
    rec = AttnRecorder(train=True, batches=None, samples=[0], every_epoch=False)
    if attached: learn.add_cb(rec)
    try: learn.fit(2, 1e-3, cbs=[Raise(exc)] + ([] if attached else [rec]))
    except type(exc): pass
    no_leftovers(learn.model)
    assert '_with_events' not in learn.__dict__  # the guard is gone too
    assert stock_pickle(learn)
    if attached: learn.remove_cb(rec)
    n = len(rec.recording)
    learn.get_preds()  # a removed recorder receives nothing
    assert len(rec.recording) == n

def test_an_interrupted_probe_fit_keeps_what_it_recorded(learn):
    rec = AttnRecorder(every_epoch=True, probe=[0, 3])
    learn.add_cb(rec)
    with pytest.raises(KeyboardInterrupt): learn.fit(3, 1e-3, cbs=[Raise(KeyboardInterrupt(), epoch=1)])
    no_leftovers(learn.model)
    assert rec.recording.epochs == [0, 0, 1, 1]  # before training and after epoch 0: the probes made before the interrupt

def test_remove_cb_detaches_and_export_is_stock(learn):
    rec = AttnRecorder(restore=False)  # keeps the swapped classes between passes...
    learn.add_cb(rec)
    learn.get_preds()
    assert type(learn.model.backbone.attention_layer).__name__.endswith('_With_Weights')
    learn.remove_cb(rec)  # ...until it is removed: no consumer stays behind
    assert learn.model.backbone.attention_layer.__dict__.get('_subs') is None
    n = len(rec.recording)
    learn.get_preds()
    assert len(rec.recording) == n

def test_passes_that_are_not_fits_keep_the_probe_history(learn):
    rec = AttnRecorder(every_epoch=True, probe=[2])
    learn.add_cb(rec)
    learn.fit(2, 1e-3)
    epochs = rec.recording.epochs
    learn.validate(); learn.get_preds(); learn.get_X_preds(learn.dls.valid.dataset[0][0][None].numpy())
    assert rec.recording.epochs == epochs == [0, 1, 2]
    learn.show_attention_evolution(idx=2)
    no_leftovers(learn.model)

def test_lr_find_runs_no_probe(learn, tmp_path):
    learn.path = tmp_path  # lr_find saves the model there for a moment
    rec = AttnRecorder(every_epoch=True)
    learn.add_cb(rec)
    learn.fit(1, 1e-3)
    forwards = rec._fwd.count
    learn.lr_find(show_plot=False)
    assert rec._fwd.count == forwards and rec.recording.epochs == [0, 1]
    no_leftovers(learn.model)

def test_a_refused_pass_keeps_the_recording(learn, bm_data):
    X, y, splits = bm_data
    rec = AttnRecorder(samples=[0, 1])
    learn.add_cb(rec)
    learn.get_preds()
    before = rec.recording.weights.clone()
    with pytest.raises(ValueError, match='does not fit'): learn.get_X_preds(X[:4, :3])  # 3 variables: refused
    assert torch.equal(rec.recording.weights, before)
    no_leftovers(learn.model)
    with pytest.raises(IndexError): learn.show_attention(head=12)  # bad calls leave it too
    assert torch.equal(rec.recording.weights, before)

def test_accumulate_chooses_the_pass_and_saves_mixed_sizes(learn, tmp_path):
    rec = AttnRecorder(idxs=[5], accumulate=True, max_len=None)
    learn.add_cb(rec)
    learn.get_preds()
    with torch.no_grad(): learn.model.backbone.attention_layer.relative_bias_table.add_(0.5)  # the model changes
    rec.max_len = 10  # and the next pass reduces its maps
    learn.get_preds()
    r = rec.recording
    assert [tuple(w.shape) for w in (x['weights'] for x in r.records)] == [(8, 100, 100), (8, 10, 10)]
    first, last = sorted(r.forwards)
    assert learn.show_attention(idx=5, forward=first).axes[0].images[0].get_array().shape == (100, 100)
    assert learn.show_attention(idx=5).axes[0].images[0].get_array().shape == (10, 10)  # default: the latest
    r2 = AttnRecording.load(r.save(tmp_path/'mixed.npz'))
    assert [torch.equal(a['weights'], b['weights']) for a, b in zip(r.records, r2.records)] == [True, True]

def test_accumulated_aggregates_refuse_another_size_before_adding(learn):
    rec = AttnRecorder(batches=None, samples=[], aggregate='mean', accumulate=True, max_len=20)
    learn.add_cb(rec)
    learn.get_preds()
    s, n = rec.recording.aggregates['mean']
    rec.max_len = 10
    with pytest.raises(ValueError, match='Keep max_len the same'): learn.get_preds()
    assert rec.recording.aggregates['mean'][1] == n and torch.equal(rec.recording.aggregates['mean'][0], s)
    no_leftovers(learn.model)

def test_convtranplus_with_attn_as_arch_stores_eval_forwards_only(bm_data):
    X, y, splits = bm_data
    learn = make_learner(X, y, splits, arch=ConvTranPlusWithAttn, arch_config=dict(seq_len=100, max_mem=16))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    stored = learn.model.attention_weights
    assert sum(len(w) for w in stored) == len(splits[1])  # the validation forwards; the training ones are not kept
    assert sum(w.numel() * 4 for w in stored) <= 16 * 2**20  # and within max_mem
    learn.model.max_mem = 2  # past it, the oldest forwards go first
    learn.get_preds()
    assert sum(w.numel() * 4 for w in learn.model.attention_weights) <= 2 * 2**20

def test_show_attention_draws_what_idxs_recorded(learn):
    rec = AttnRecorder(idxs=[17])
    learn.add_cb(rec)
    try:
        learn.get_preds()
        t = learn.show_attention(head=1).axes[0].get_title().splitlines()  # no batch=0/sample=0 needed
        assert t[1].endswith('(idx 17)') and t[2].startswith('True: ')
    finally: learn.remove_cb(rec)
