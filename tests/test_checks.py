"Issue 17 §7: every entry point checks its arguments through `tsai_attnviz.core.checks`, with the same message for the same mistake."
import numpy as np, pytest
import matplotlib; matplotlib.use('Agg')
from tsai.basics import TSClassifier, TSClassification
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.all import *

@pytest.fixture(scope='module')
def learn():
    "An untrained ConvTranPlus (8 heads) on 2 variables × 24 steps, with a recording of items 0 and 1"
    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 2, 24)).astype('float32'); y = np.array(['a', 'b'] * 16)
    l = TSClassifier(X, y, splits=(list(range(16)), list(range(16, 32))), arch=ConvTranPlus, bs=8, tfms=[None, TSClassification()], verbose=False)
    rec = AttnRecorder(idxs=[0, 1])
    l.add_cb(rec)
    with l.no_bar(): l.get_preds()
    return l

@pytest.mark.parametrize('kw,err,msg', [
    (dict(head='2'), TypeError, "head='2' is not a head number: use an int, or None for every head."),  # was "head=2 is not recorded"
    (dict(head=2.0), TypeError, "head=2.0 is not a head number"),
    (dict(head=9), IndexError, 'head=9 is not recorded: heads are [0, 1, 2, 3, 4, 5, 6, 7].'),
    (dict(layer=1.5), TypeError, 'layer=1.5 is not a layer: use a number or a name'),
    (dict(layer=3), IndexError, 'layer=3 is out of range: there are 1 layers recorded (layer 0..0)'),
    (dict(layer='attn'), IndexError, "layer='attn' is not recorded: layers are ['backbone.attention_layer']."),
    (dict(idx='0'), TypeError, "idx='0' is not a dataset index: use an int or a list of ints."),
    (dict(idx=5), IndexError, 'idx=5 is not recorded: recorded dataset indices are [0, 1].'),
    (dict(var='x'), TypeError, "var='x' is not a variable number: use an int."),
    (dict(view='grid'), ValueError, "view='grid' is not a view: use one of 'heatmap', 'series', 'relevance'."),
    (dict(part=0), TypeError, "part=0 is not a name: use one of 'effective', 'softmax', 'bias'."),
    (dict(aggregate='median'), ValueError, "aggregate='median' is not a kind of mean map: use one of 'mean', 'class', 'bins' or None."),
    (dict(X='X.npy'), TypeError, 'X is a str: pass a numpy array or a tensor [n_samples, 2, 24]'),
    (dict(X=np.ones((2, 3, 24))), ValueError, 'X has 3 variables (shape [2, 3, 24]); the model expects 2: [n_samples, 2, 24]'),
])
def test_show_attention_says_what_is_wrong(learn, kw, err, msg):
    n = len(learn.attn_recorder.recording)
    with pytest.raises(err) as e: learn.show_attention(**kw)
    assert msg in str(e.value), str(e.value)
    assert len(learn.attn_recorder.recording) == n  # a refused call records nothing on the spot

def test_record_attention_checks_X(learn):
    with pytest.raises(TypeError, match=r'X is a dict: pass a numpy array or a tensor \[n_samples, 2, 24\]'): learn.record_attention(X={'a': 1})
    x = np.ones((2, 2, 24)); x[1, 0, 3] = np.inf
    with pytest.raises(ValueError, match=r'X has 1 NaN or inf values \(first at \[1, 0, 3\]\)'): learn.record_attention(X=x)
    with pytest.raises(ValueError, match='X has seq_len 20'): learn.record_attention(X=np.ones((2, 2, 20)))
    assert len(learn.record_attention(X=np.ones((3, 2, 24)).tolist())) == 3  # nested lists of numbers are data too

@pytest.mark.parametrize('kw,err,msg', [
    (dict(idx='0'), TypeError, "idx='0' is not a dataset index: use an int or a list of ints."),   # the same message as show_attention's
    (dict(sample=[0, 'x']), TypeError, "is not a dataset index"),
    (dict(aggregate='median'), ValueError, "aggregate='median' is not a kind of mean map: use one of 'mean', 'class', 'bins' or None."),
    (dict(max_len=0), ValueError, 'max_len=0: use a positive number of cells a side'),
    (dict(X=np.zeros((2, 3, 24))), ValueError, 'has 3 variables'),
])
def test_attention_report_says_what_is_wrong(learn, tmp_path, kw, err, msg):
    "attention_report checks its arguments through the same module, before anything is recorded or written"
    n = len(learn.attn_recorder.recording)
    with pytest.raises(err, match=__import__('re').escape(msg)): learn.attention_report(tmp_path/'r.html', **kw)
    assert not (tmp_path/'r.html').exists() and len(learn.attn_recorder.recording) == n

def test_relevance_says_what_show_attention_says(learn):
    "relevance takes head, layer and idx through the same checks: the same mistake, the same words"
    with pytest.raises(TypeError, match="head='2' is not a head number: use an int in 0..7"): learn.relevance(head='2')
    with pytest.raises(TypeError, match="idx='0' is not a dataset index"): learn.relevance(idx='0')
    with pytest.raises(ValueError, match='has 3 variables'): learn.relevance(X=np.zeros((2, 3, 24)), method='occlusion')
