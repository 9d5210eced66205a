"Issue 4: AttnRecorder and show_attention on a real tsai Learner trained on BasicMotions."
import warnings
import numpy as np, pytest, torch
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from PIL import Image
from fastai.learner import load_learner
from tsai.models.InceptionTimePlus import InceptionTimePlus
from tsai_attnviz.all import *
from conftest import make_learner, stock_effective_attention, no_leftovers

@pytest.fixture
def learn(clean_bm_learner): return clean_bm_learner  # the shared learner, no AttnRecorder left on it after each test

def valid_batches(learn):
    "The validation batches after the batch transforms, as `get_preds` makes them (same batch size, same order)"
    return [xb for xb, _ in learn.dls.valid.new(shuffle=False, drop_last=False)]

def valid_inputs(learn):
    "Every validation item after the batch transforms, in order, gathered without the package"
    return torch.cat(valid_batches(learn)).cpu()  # recordings live on the CPU

@pytest.mark.bitwise
def test_records_selected_batches_and_samples_bitwise(learn):
    base, _ = learn.get_preds()
    rec = AttnRecorder(batches=[0, 2], samples=[1, 4])
    learn.add_cb(rec)
    preds, _ = learn.get_preds()
    r = rec.recording
    assert (r.batches, r.samples) == ([0, 0, 2, 2], [1, 4, 1, 4])
    assert r.idxs == [1, 4, 33, 36]
    assert torch.equal(preds, base)  # recording does not change predictions
    # independent, from the stock layers, on the very batches recorded: a float32 map also depends on the batch it was computed
    # in (kernels choose their blocking by shape), so bitwise only for the same batch composition
    bs = valid_batches(learn)
    expected = torch.cat([stock_effective_attention(learn.model, bs[b])[[1, 4]] for b in (0, 2)])
    assert torch.equal(r.weights, expected)
    assert torch.equal(r.inputs, valid_inputs(learn)[[1, 4, 33, 36]])
    torch.testing.assert_close(r.preds.softmax(-1), preds[[1, 4, 33, 36]])

def test_idxs_pick_dataset_items_after_batch_tfms(learn):
    learn.add_cb(AttnRecorder(idxs=[17, 3, 39]))
    learn.get_preds()
    r = learn.attn_recorder.recording
    assert sorted(r.idxs) == [3, 17, 39]
    order = [r.idxs.index(i) for i in [3, 17, 39]]
    assert torch.equal(r.inputs[order], valid_inputs(learn)[[3, 17, 39]])
    ys = learn.dls.valid.new(shuffle=False).dataset.tls[1]
    assert [r.targets[i] for i in order] == [int(ys[j]) for j in [3, 17, 39]]

def test_get_X_preds_validate_and_dl_each_record(learn, bm_data):
    X, y, splits = bm_data
    rec = AttnRecorder(samples=[0])
    learn.add_cb(rec)
    learn.get_X_preds(X[splits[1][5:9]])
    assert len(rec.recording) == 1 and torch.allclose(rec.recording.inputs[0], valid_inputs(learn)[5])
    learn.validate()
    assert len(rec.recording) == 1 and rec.recording.idxs == [0]
    dl = learn.dls.valid.new_dl(X[splits[1][20:]], y=y[splits[1][20:]])
    learn.get_preds(dl=dl)
    assert torch.allclose(rec.recording.inputs[0], valid_inputs(learn)[20])

def test_tag_and_accumulate(learn):
    rec = AttnRecorder(samples=[0], tag='fold 1', accumulate=True)
    learn.add_cb(rec)
    learn.get_preds()
    rec.tag = 'fold 2'
    learn.get_preds()
    assert rec.recording.tags == ['fold 1', 'fold 2']
    assert len(rec.recording.filter(tag='fold 2')) == 1

@pytest.mark.bitwise
def test_training_unaffected_and_not_recorded_by_default(bm_data):
    losses = []
    for with_rec in (False, True):
        learn = make_learner(*bm_data, seed=3)
        if with_rec: learn.add_cb(AttnRecorder(batches=None, samples=[0]))
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3)
        losses.append([l.item() for l in learn.recorder.losses])
    assert losses[0] == losses[1]
    r = learn.attn_recorder.recording
    assert set(r.epochs) == {0, 1} and len(r) == 2 * 3  # valid batches only: 3 a pass, 2 passes
    no_leftovers(learn.model)

def test_show_attention_without_recording_leaves_nothing(learn):
    _, targs, decoded = learn.get_preds(with_decoded=True)  # computed without the package
    vocab = learn.dls.vocab
    cbs = list(learn.cbs)
    fig = learn.show_attention(head=1)
    assert list(learn.cbs) == cbs
    no_leftovers(learn.model)
    assert fig.axes[0].get_title().splitlines() == ['backbone.attention_layer, Head 1', 'Sample 0, Batch 0 (idx 0)',
                                                    f'True: {vocab[targs[0]]} · Pred: {vocab[decoded[0]]}']
    plt.close('all')

def test_export_and_load_learner(learn, tmp_path):
    rec = AttnRecorder(batches=None)
    learn.add_cb(rec)
    learn.export(tmp_path/'empty.pkl')
    learn.get_preds()
    assert rec.recording.weights.numel() * 4 > 10e6  # > 10 MB recorded
    learn.export(tmp_path/'full.pkl')
    s0, s1 = (tmp_path/'empty.pkl').stat().st_size, (tmp_path/'full.pkl').stat().st_size
    assert abs(s1 - s0) < 20_000, (s0, s1)  # the pickle does not grow with the recording
    learn2 = load_learner(tmp_path/'full.pkl')
    assert not any(isinstance(cb, AttnRecorder) for cb in learn2.cbs)  # an export holds no recorder, as it holds no recording
    X = valid_inputs(learn)[:4].numpy()
    learn2.add_cb(AttnRecorder(batches=None))
    p2 = learn2.get_X_preds(X)[0]
    assert len(learn2.attn_recorder.recording) == 4  # a new recorder on the loaded learner records
    no_leftovers(learn2.model)
    assert torch.allclose(p2, learn.get_X_preds(X)[0])

# -- figures --------------------------------------------------------------------------------
def _not_blank(path):
    a = np.asarray(Image.open(path).convert('L'), dtype=float)
    return a.std() > 10 and a.shape[0] > 200

def test_figures(learn, tmp_path):
    learn.add_cb(AttnRecorder(batches=[0, 1], samples=[0, 1], aggregate='class'))
    learn.get_preds()
    f = learn.show_attention(head=2, path=tmp_path/'single.png')
    ax, cbar = f.axes
    assert (ax.get_title().splitlines()[:2], ax.get_xlabel(), ax.get_ylabel()) == (
        ['backbone.attention_layer, Head 2', 'Sample 0, Batch 0 (idx 0)'], 'Key timestep', 'Query timestep')
    assert ax.images[0].get_cmap().name == 'viridis' and cbar.get_ylim()[1] > cbar.get_ylim()[0]
    assert cbar.get_ylabel() == 'attention: softmax + relative bias (eRPE)'  # the colour bar says what the colour is
    f = learn.show_attention(path=tmp_path/'grid.png')
    assert len(f.axes) == 8 + 1 and [a.get_title() for a in f.axes[:8]] == [f'Head {h}' for h in range(8)]
    lims = {a.images[0].get_clim() for a in f.axes[:8]}
    assert len(lims) == 1  # one shared colour scale
    f = learn.show_attention(batch=[0, 1], sample=[0, 1], path=tmp_path/'samples_heads.png')
    assert len(f.axes) == 4 * 8 + 1 and f.axes[3 * 8].get_ylabel().startswith('Sample 1, Batch 1')
    f = learn.show_attention(view='series', batch=1, sample=1, path=tmp_path/'series.png')
    top, bottom, cbar = f.axes
    assert top.get_title().startswith('True: ') and '· Pred: ' in top.get_title()
    assert len(top.lines) == 6 and bottom.get_ylabel().startswith('attention received')
    assert cbar.get_ylabel() == 'attention received (shading)'
    f = learn.show_attention(aggregate='class', path=tmp_path/'class.png')
    assert len(f.axes) == 4 * 8 + 1 and f.axes[0].get_ylabel().startswith('Class ')
    for n in ['single', 'grid', 'samples_heads', 'series', 'class']: assert _not_blank(tmp_path/f'{n}.png'), n
    assert not plt.get_fignums()  # figures written to a path are closed

def test_plot_attention_weights_seed_meaning():
    aw = [torch.rand(2, 8, 10, 10), torch.rand(3, 8, 10, 10)]
    f = plot_attention_weights(aw, layer_idx=1, batch_idx=2, head_idx=5)
    assert np.array_equal(f.axes[0].images[0].get_array(), aw[1][2, 5].numpy())
    plt.close('all')

# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize('kw,msg', [(dict(head=8), 'head=8 is not recorded: heads are [0, 1, 2, 3, 4, 5, 6, 7].'),
                                    (dict(layer=2), 'layer=2 is out of range'),
                                    (dict(sample=3), 'sample=3 is not recorded in batch 0: recorded samples are [0, 1]'),
                                    (dict(batch=7), 'batch=7 is not recorded: recorded batches are [0]'),
                                    (dict(idx=30), 'idx=30 is not recorded: recorded dataset indices are [0, 1]')])
def test_out_of_range_names_valid_range(learn, kw, msg):
    learn.add_cb(AttnRecorder(samples=[0, 1]))
    learn.get_preds()
    before = learn.attn_recorder.recording.weights.clone()
    with pytest.raises(IndexError, match=msg.replace('[', r'\[').replace(']', r'\]').replace('(', r'\(').replace(')', r'\)')):
        learn.show_attention(**kw)
    assert torch.equal(learn.attn_recorder.recording.weights, before)
    no_leftovers(learn.model)
    plt.close('all')

def test_recorder_heads_out_of_range_leaves_learner_usable(learn):
    with pytest.raises(ValueError, match=r'heads=\[8\] but the model has 8 heads \(0..7\)'):
        learn.get_preds(cbs=[AttnRecorder(heads=[8])])
    no_leftovers(learn.model)
    learn.get_preds()  # the Learner's lock was released

def test_model_without_attention(bm_data):
    learn = make_learner(*bm_data, arch=InceptionTimePlus)
    with pytest.raises(ValueError, match=r'no supported attention layer in InceptionTimePlus; it contains: .*Conv1d.*Supported architectures: ConvTranPlus'):
        learn.show_attention()
    assert not any(isinstance(c, AttnRecorder) for c in learn.cbs)

def test_missing_batches_warn(learn):
    rec = AttnRecorder(batches=[5])
    with pytest.warns(UserWarning, match=r'batches=\[5\] were not in this pass, which had 3 batches \(0..2\)'):
        learn.get_preds(cbs=[rec])
    assert len(rec.recording) == 0
    no_leftovers(learn.model)

def test_wrong_data_shape(learn):
    with pytest.raises(ValueError, match=r'X has seq_len 90 \(shape \[2, 6, 90\]\); the model expects 100: \[n_samples, 6, 100\]'):
        learn.show_attention(X=np.zeros((2, 6, 90), dtype='float32'))
    no_leftovers(learn.model)
    assert not any(isinstance(c, AttnRecorder) for c in learn.cbs)

def test_memory_budget_warns_once_and_keeps(learn):
    rec = AttnRecorder(batches=None, max_mem=1, max_len=None)  # full maps: past the budget, the recorder stops storing
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn.get_preds(cbs=[rec])
    assert sum('stopped storing' in str(w.message) for w in ws) == 1
    n = len(rec.recording)
    assert 0 < n < 40 and rec.recording.weights.numel() * 4 <= 2**20

def test_memory_budget_counts_the_heads_kept(learn):
    "heads=[0] records keep one head of eight: the budget counts that, so what one head's records take fits where eight heads' would not"
    per = (2 * 100 * 100 + 2 * 100) * 4  # one head: a full map and its softmax part (eRPE), key attention and entropy, float32 (BasicMotions: 40 validation items)
    rec = AttnRecorder(batches=None, heads=[0], max_mem=50 * per / 2**20, max_len=None)  # 50 such records: room for all 40, not for 8 heads'
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn.get_preds(cbs=[rec])
    assert not [w for w in ws if 'stopped storing' in str(w.message)]
    assert len(rec.recording) == 40 and rec.recording.weights.shape == (40, 1, 100, 100)

# -- plain PyTorch models, several layers, errors during fit ---------------------------------
class TwoTowers(torch.nn.Module):
    "A plain PyTorch model with two ConvTranPlus attention layers (found by type, not by path)"
    def __init__(self):
        super().__init__()
        from tsai.models.ConvTranPlus import ConvTranPlus
        self.a, self.b = ConvTranPlus(6, 4, 100, n_heads=8), ConvTranPlus(6, 4, 100, rel_pos_encode='vector', n_heads=4)
    def forward(self, x): return self.a(x) + self.b(x)

@pytest.mark.bitwise
def test_plain_pytorch_model_with_two_layers(bm_data):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    learn0 = make_learner(*bm_data)
    torch.manual_seed(0)
    learn = Learner(learn0.dls, TwoTowers(), loss_func=CrossEntropyLossFlat())
    assert [n for n, _ in attention_layers(learn.model)] == ['a.backbone.attention_layer', 'b.backbone.attention_layer']
    rec = AttnRecorder(layers=['b.backbone.attention_layer'], samples=[0])
    learn.get_preds(cbs=[rec])
    assert rec.recording.layers == ['b.backbone.attention_layer'] and rec.recording.weights.shape == (1, 4, 100, 100)
    # the vector layer's maps against the stock module's own computation (a forward hook, outside the package), on the whole
    # batch 0 as recorded: recomputed for one item, float32 maps differ in the last bits (batch size picks the kernels' blocking)
    xb = valid_batches(learn)[0]
    assert torch.equal(rec.recording.inputs[0], xb[0].cpu())
    assert torch.equal(rec.recording.weights[0], stock_effective_attention(learn.model.b, xb)[0])
    no_leftovers(learn.model)
    rec = AttnRecorder(samples=[0])
    learn.get_preds(cbs=[rec])
    assert rec.recording.layers == ['a.backbone.attention_layer', 'b.backbone.attention_layer']
    with pytest.raises(ValueError, match=r"layers=\['c'\] not in the model: its attention layers are"):
        learn.get_preds(cbs=[AttnRecorder(layers=['c'])])
    no_leftovers(learn.model)

def test_errors_during_fit_leave_nothing_behind(bm_data):
    learn = make_learner(*bm_data)
    with pytest.raises(ValueError, match=r'probe=\[99\] not in the validation set, which has 40 items \(0..39\)'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[AttnRecorder(every_epoch=True, probe=[99])])
    no_leftovers(learn.model)

def test_restore_false_keeps_the_swap_without_consumer(learn):
    learn.get_preds(cbs=[AttnRecorder(restore=False)])
    layer = learn.model.backbone.attention_layer
    assert type(layer).__name__ == 'Attention_Rel_Scl_With_Weights' and not layer.publishing and not layer.keep_weights
    unswap_attention(learn.model)

def test_show_attention_on_new_data_keeps_the_attached_recording(learn, bm_data):
    X, y, splits = bm_data
    Xn = X[splits[1][10:14]]
    _, _, decoded = learn.get_X_preds(Xn)  # the prediction as tsai decodes it, computed without the package
    rec = AttnRecorder(samples=[0, 1])
    learn.add_cb(rec)
    learn.get_preds()
    before = rec.recording.weights.clone()
    f = learn.show_attention(X=Xn, sample=2, head=0)
    assert f.axes[0].get_title().splitlines() == ['backbone.attention_layer, Head 0', 'Sample 2, Batch 0 (idx 2)', f'Pred: {decoded[2]}']
    assert torch.equal(rec.recording.weights, before) and len(rec.recording) == 2
    assert rec in learn.cbs
    plt.close('all')

def test_recorder_checks_the_data_it_is_fed(bm_data):
    "A pass over data the model was not built for fails with what was expected, not deep inside the model"
    X, y, splits = bm_data
    learn = make_learner(X, y, splits)  # no batch tfms, which would fail on 5 variables before the model does
    dl = learn.dls.valid.new_dl(X[splits[1]][:, :5])  # 5 variables where the model takes 6
    with pytest.raises(ValueError, match=r'does not fit ConvTranPlus in this Learner: it was built for \[n_samples, n_vars=6, seq_len=100\]'):
        learn.get_preds(dl=dl, cbs=[AttnRecorder()])
    no_leftovers(learn.model)
