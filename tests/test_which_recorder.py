"Issue 17 §2: which recorder `show_attention` and `attention_report` read: the last AttnRecorder added, or `recorder=`."
import numpy as np, pytest, torch
import matplotlib.pyplot as plt
from tsai_attnviz.all import *
from tsai_attnviz.show.report import read_report
from conftest import make_learner

@pytest.fixture(scope='module')
def two(bm_data):
    "Two recorders whose selections differ (items 3 and 5), each filled by a pass of its own, then both attached"
    X, y, splits = bm_data
    learn = make_learner(X, y, splits)
    a, b = AttnRecorder(idxs=[3]), AttnRecorder(idxs=[5])
    for r in (a, b):
        with learn.no_bar(): learn.get_preds(cbs=[r])
    assert a.recording.idxs == [3] and b.recording.idxs == [5]
    learn.add_cbs([a, b])
    yield learn, a, b
    learn.remove_cbs([a, b]); plt.close('all')

def _idx_of(fig): return fig.axes[0].get_title() + ' ' + ' '.join(ax.get_ylabel() for ax in fig.axes)

def test_the_last_added_recorder_by_default(two):
    learn, a, b = two
    n = len(b.recording)
    assert '(idx 5)' in _idx_of(learn.show_attention(head=0))
    assert '(idx 5)' in _idx_of(learn.show_attention())
    # an item only the other recorder holds is not drawn from it, nor recorded on the spot: the error names what b holds
    with pytest.raises(IndexError, match=r'idx=3 is not recorded: recorded dataset indices are \[5\]'): learn.show_attention(idx=3)
    assert len(b.recording) == n and a.recording.idxs == [3]
    assert [it['idx'] for it in read_report(learn.attention_report())['items'] if it['kind'] == 'item'] == [5]

def test_recorder_argument(two):
    learn, a, b = two
    assert '(idx 3)' in _idx_of(learn.show_attention(head=0, recorder=a))
    assert '(idx 3)' in _idx_of(learn.show_attention(recorder=a.recording))  # or its recording
    assert [it['idx'] for it in read_report(learn.attention_report(recorder=a))['items'] if it['kind'] == 'item'] == [3]
    c = AttnRecorder(idxs=[7])  # never attached: used with get_preds(cbs=[c]), which removes it after the pass
    with learn.no_bar(): learn.get_preds(cbs=[c])
    assert '(idx 7)' in _idx_of(learn.show_attention(head=0, recorder=c))

def test_bad_recorder_argument(two):
    learn, a, b = two
    with pytest.raises(ValueError, match='recorder= holds no records'): learn.show_attention(recorder=AttnRecorder())
    with pytest.raises(ValueError, match='recorder= holds no records'): learn.attention_report(recorder=AttnRecorder())
    with pytest.raises(TypeError, match="recorder='a': pass an AttnRecorder"): learn.show_attention(recorder='a')
    with pytest.raises(ValueError, match='recorder= .* or dl=/X='): learn.show_attention(recorder=a, X=np.zeros((2, 6, 100), 'float32'))
