"Issue 19: AttnRecorder(path=...) streams records to disk as they are made; what it writes is what the same pass records in memory"
import json, math, warnings
import numpy as np, pytest, torch
import matplotlib.pyplot as plt
from fastai.callback.core import Callback
from tsai_attnviz.all import *
from tsai_attnviz.record.store import LazyRecord
from conftest import no_leftovers

KW = dict(batches=None, aggregate='class', max_len=32, stats=True, dtype='float16')

@pytest.fixture
def learn(clean_bm_learner): return clean_bm_learner  # the shared learner, no AttnRecorder left on it after each test

@pytest.fixture(scope='module')
def both(bm_learner, tmp_path_factory):
    "The same whole validation pass of BasicMotions (40 items, class means, statistics), recorded in memory and to disk"
    d = tmp_path_factory.mktemp('disk')/'rec'
    return bm_learner.record_attention(**KW), bm_learner.record_attention(path=d, **KW), d

def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        if torch.is_tensor(a[k]): assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
        else: assert a[k] == b[k], k

def _pixels(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())

@pytest.mark.bitwise
def test_disk_equals_memory(both):
    mem, disk, d = both
    assert len(disk) == len(mem) == 40 and all(isinstance(r, LazyRecord) for r in disk.records)
    for a, b in zip(mem.records, disk.records): _same(a, b)  # the same computation, written and read back
    assert disk.group_keys == mem.group_keys
    for c in [None] + mem.group_keys: torch.testing.assert_close(disk.mean_map(c), mem.mean_map(c))
    assert mem.biases and all(torch.equal(disk.bias(l)['weights'], mem.bias(l)['weights']) for l in mem.biases)
    assert {k: v for k, v in mem.meta.items() if k != 'tokens'} == {k: v for k, v in disk.meta.items() if k != 'tokens'}
    head = json.loads((d/'shard-000'/'shard.json').read_text())
    assert head['complete'] and head['n'] == 40 and head['model']['arch'] == 'ConvTranPlus'
    reopened = AttnRecording.open(d)
    for a, b in zip(disk.records, reopened.records): _same(a, b)

def test_views_from_disk(both, learn):
    mem, disk, _ = both
    for kw in (dict(idx=[0, 3]), dict(head=1, idx=2), dict(view='series', idx=5), dict(aggregate='class'), dict(idx=1, part='bias')):
        a, b = _pixels(learn.show_attention(recorder=mem, **kw)), _pixels(learn.show_attention(recorder=disk, **kw))
        assert np.array_equal(a, b), kw
        plt.close('all')
    assert disk.stats_df().equals(mem.stats_df())
    assert learn.attention_report(recorder=disk).html == learn.attention_report(recorder=mem).html

def test_attached_recorder_and_shards(learn, tmp_path):
    rec = AttnRecorder(path=tmp_path/'acc', batches=None, aggregate='mean', accumulate=True)
    learn.add_cb(rec)
    learn.get_preds(); learn.get_preds()
    assert sorted(p.name for p in (tmp_path/'acc').iterdir()) == ['shard-000', 'shard-001']  # a shard per pass, opened as one
    r = rec.recording
    assert len(r) == 80 and r.idxs == list(range(40)) * 2 and r.aggregates['mean'][1] == 80
    plt.close(learn.show_attention(idx=3))  # the views read the attached recorder's recording
    learn.remove_cb(rec)
    fresh = AttnRecorder(path=tmp_path/'acc', batches=[1])  # no accumulate: this recorder's pass alone, beside the others
    learn.get_preds(cbs=[fresh])
    assert len(fresh.recording) == 16 and len(AttnRecording.open(tmp_path/'acc')) == 96

class Raise(Callback):
    "Raises in the after_pred of validation batch 1 (after the recorder, order 60, has stored that batch)"
    order = 70
    def after_pred(self):
        if self.iter == 1: raise RuntimeError('another callback failed')

@pytest.mark.parametrize('attached', [False, True])
def test_failed_pass_keeps_complete_records(learn, tmp_path, attached):
    rec = AttnRecorder(path=tmp_path/'r', batches=None, aggregate='class')
    if attached: learn.add_cb(rec)
    with pytest.raises(RuntimeError, match='another callback failed'):
        learn.get_preds(cbs=[Raise()] + ([] if attached else [rec]))
    no_leftovers(learn.model)
    assert '_with_events' not in learn.__dict__
    assert not json.loads((tmp_path/'r'/'shard-000'/'shard.json').read_text())['complete']
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        r = AttnRecording.open(tmp_path/'r')
    assert r.idxs == list(range(32)) and 'was not finished' in str(ws[0].message)  # batches 0 and 1, stored before the error
    plt.close(learn.show_attention(recorder=r, idx=20))

def test_bad_path(tmp_path, both):
    (tmp_path/'f.npy').write_bytes(b'x')
    with pytest.raises(ValueError, match=r"is a file: pass a directory"): AttnRecorder(path=tmp_path/'f.npy')
    with pytest.raises(ValueError, match=r"is a shard of a recording, not a recording's directory: pass its parent"):
        AttnRecorder(path=both[2]/'shard-000')
    with pytest.raises(ValueError, match=r"can't be written there .*Pass a directory you can write to"):
        AttnRecorder(path=tmp_path/'f.npy'/'rec')
    with pytest.raises(ValueError, match=r"can't be written there"): AttnRecorder(path='/proc/attnviz-rec')

def test_max_mem_does_not_cap_disk(learn, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no 'stopped storing' warning
        r = learn.record_attention(path=tmp_path/'r', batches=None, max_len=None, max_mem=1)
    assert len(r) == 40 and r.records[0]['weights'].shape == (8, 100, 100)  # 40 full maps: 6 MB, past max_mem=1
    with pytest.warns(UserWarning, match='stopped storing'):
        assert len(learn.record_attention(batches=None, max_len=None, max_mem=1)) < 40

def test_auto_len_fits_one_batch(learn, tmp_path):
    # max_len='auto' on disk: the side that lets one batch's records (16 items, 8 heads, float32, a softmax part beside the map
    # and full-length key attention and entropy) fit max_mem, by hand: 50
    mb = (50 * 50 * 8 * 16 * 4 * 2 + 16 * 2 * 8 * 100 * 4) / 2**20 + 1e-4
    with pytest.warns(UserWarning, match='block-averaged to at most 50×50'):
        r = learn.record_attention(path=tmp_path/'r', batches=None, max_mem=mb)
    assert len(r) == 40 and r.records[0]['weights'].shape == (8, 50, 50)

def test_every_epoch_probe_on_disk(bm_data, tmp_path):
    from conftest import make_learner
    learn = make_learner(*bm_data)
    rec = AttnRecorder(path=tmp_path/'p', every_epoch=True, probe=[0, 3], log_to=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=[rec])
    assert rec.recording.epochs == [0, 0, 1, 1, 2, 2] and rec.recording.idxs == [0, 3] * 3
    plt.close(learn.show_attention_evolution(recorder=rec, idx=3))
    no_leftovers(learn.model)

def test_save_dispatch(both, tmp_path):
    mem = both[0]
    d = mem.save(tmp_path/'dir')
    assert (d/'shard-000'/'shard.json').exists()
    f = mem.save(tmp_path/'rec.npz')
    assert f.is_file() and f.suffix == '.npz'
    for a, b in zip(mem.records, AttnRecording.load(f).records): assert torch.equal(a['weights'], b['weights'])
    assert len(AttnRecording.open(tmp_path/'rec.npz')) == len(AttnRecording.open(d)) == 40

def test_accumulated_mean_maps_keep_one_size(learn, tmp_path):
    "A pass whose mean maps would not add to those of the shards before it is refused before it writes anything"
    rec = AttnRecorder(path=tmp_path/'r', batches=[0], aggregate='mean', max_len=50, accumulate=True)
    learn.get_preds(cbs=[rec])
    rec.max_len = 20
    with pytest.raises(ValueError, match='the mean maps recorded so far average blocks of 2 time steps; this pass would add blocks of 5'):
        learn.get_preds(cbs=[rec])
    no_leftovers(learn.model)
    assert [p.name for p in (tmp_path/'r').iterdir()] == ['shard-000'] and len(rec.recording) == 16
    assert rec.recording.aggregates['mean'][1] == 40
