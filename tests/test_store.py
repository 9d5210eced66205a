"Recordings on disk (tsai_attnviz.record.store): a real pass saved and opened draws as the one in memory; several shards as one; bad input"
import json, shutil, warnings
import numpy as np
import pytest, torch
import matplotlib.pyplot as plt
from tsai_attnviz.all import *
from tsai_attnviz.record.store import LazyRecord

@pytest.fixture(scope='module')
def saved(bm_learner, tmp_path_factory):
    "A whole validation pass of BasicMotions (40 items, class means, statistics) in memory, and saved to a directory and opened"
    rec = bm_learner.record_attention(batches=None, aggregate='class', max_len=32, stats=True, dtype='float16')
    d = tmp_path_factory.mktemp('store')/'rec'
    rec.save(d, model=bm_learner.model)
    return rec, AttnRecording.open(d), d

def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        if torch.is_tensor(a[k]): assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
        else: assert a[k] == b[k], k

@pytest.mark.bitwise
def test_round_trip_bitwise(saved):
    rec, o, d = saved
    assert len(o) == len(rec) == 40 and all(isinstance(r, LazyRecord) for r in o.records)
    for a, b in zip(rec.records, o.records): _same(a, b)
    assert o.meta['vocab'] == rec.meta['vocab'] and o.group_keys == rec.group_keys
    for c in rec.group_keys: assert torch.equal(o.mean_map(c), rec.mean_map(c))
    assert rec.biases and all(torch.equal(o.bias(l)['weights'], rec.bias(l)['weights']) for l in rec.biases)
    # numpy alone: the documented layout
    head = json.loads((d/'shard-000'/'shard.json').read_text())
    assert head['format'] == 'tsai-attnviz-shard' and head['version'] == 1 and head['complete']
    w = np.load(d/'shard-000'/'weights-0.npy', mmap_mode='r', allow_pickle=False)
    line = json.loads((d/'shard-000'/'records.jsonl').read_text().splitlines()[7])
    f, row = line['_rows']['weights']
    assert f == 'weights-0' and np.array_equal(w[row], rec.records[7]['weights'].numpy())

def test_views_from_opened(saved, bm_learner, tmp_path):
    rec, o, _ = saved
    for kw in (dict(idx=[0, 3]), dict(head=1, idx=2), dict(view='series', idx=5), dict(aggregate='class'), dict(idx=1, part='softmax'),
               dict(idx=4, relative_to='class')):
        fa, fb = bm_learner.show_attention(recorder=rec, **kw), bm_learner.show_attention(recorder=o, **kw)
        fa.canvas.draw(); fb.canvas.draw()
        assert np.array_equal(np.asarray(fa.canvas.buffer_rgba()), np.asarray(fb.canvas.buffer_rgba())), kw
        plt.close('all')
    assert o.stats_df().equals(rec.stats_df())
    assert o.part_stats().equals(rec.part_stats())
    assert o.to_html().html == rec.to_html().html

def test_shards_open_as_one(saved, bm_learner, tmp_path):
    rec, _, _ = saved
    a, b = rec.filter(batch=0), rec.filter(batch=1)
    for name, part in (('rank-0', a), ('rank-1', b)):
        w = RecordingWriter(tmp_path, shard=name, model=bm_learner.model, meta=rec.meta)
        for i in range(0, len(part), 7): w.add(part.records[i:i + 7])  # batches of another size than the pass's
        w.close()
    both = AttnRecording.open(tmp_path)
    assert both.idxs == a.idxs + b.idxs and len(both) == 32
    for x, y in zip(a.records + b.records, both.records): _same(x, y)

def test_bad_input(saved, bm_learner, tmp_path):
    rec, _, d = saved
    (tmp_path/'plain').mkdir(); (tmp_path/'plain'/'x.txt').write_text('hi')
    with pytest.raises(ValueError, match='is not a recording'): AttnRecording.open(tmp_path/'plain')
    v = tmp_path/'v'; shutil.copytree(d, v)
    h = json.loads((v/'shard-000'/'shard.json').read_text()); h['version'] = 2; (v/'shard-000'/'shard.json').write_text(json.dumps(h))
    with pytest.raises(ValueError, match='format version 2'): AttnRecording.open(v)
    m = tmp_path/'m'; shutil.copytree(d, m)
    RecordingWriter(m, model=torch.nn.Linear(2, 2), meta=rec.meta).close()
    with pytest.raises(ValueError, match='different models'): AttnRecording.open(m)
    with pytest.raises(ValueError, match='never into one already written'): rec.save(d)

def test_interrupted_write(saved, tmp_path):
    rec, _, _ = saved
    w = RecordingWriter(tmp_path, meta=rec.meta)
    w.add(rec.records[:16]); w.add(rec.records[16:32])
    s = w.streams['weights-0']  # the third batch stops midway: rows written, the header not updated, half a line
    s.f.write(memoryview(rec.records[32]['weights'].numpy()).cast('B')[:1000]); s.f.flush()
    w._lines.write('{"target": 1, "idx": 3'); w._lines.flush()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        o = AttnRecording.open(tmp_path)
    assert len(o) == 32 and o.idxs == rec.idxs[:32]
    msg = ' '.join(str(x.message) for x in ws)
    assert 'was not finished' in msg and '32 complete records' in msg and 'mean maps' in msg
    _same(rec.records[31], o.records[31])
