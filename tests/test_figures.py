"""Issue 17 §8: every view of `show_attention` (views, parts, aggregates, `layer='all'`, evolution, relevance) and
`plot_item_across_folds`, for a small model of every family and for each task, drawn and read back: no two visible
texts overlap and none is cut off at the figure's edge. `FIGS=/tmp/figs pytest tests/test_figures.py` also writes the PNGs."""
import os, warnings
from pathlib import Path
import numpy as np, pytest, torch
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib.text import Text
from matplotlib.axes import Axes
from fastai.losses import BCEWithLogitsLossFlat
from fastai.metrics import accuracy_multi
from tsai.basics import TSClassifier, TSRegressor, TSForecaster, TSClassification, TSMultiLabelClassification, set_seed
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai.models.TSTPlus import TSTPlus, MultiTSTPlus
from tsai.models.TSiTPlus import TSiTPlus
from tsai.models.PatchTST import PatchTST
from tsai.models.TST import TST
from tsai.models.RNNAttention import RNNAttention
from tsai.models.TransformerModel import TransformerModel
from tsai.models.TSPerceiver import TSPerceiver
from tsai_attnviz.all import *
from tsai_attnviz.cli import load_dataset

warnings.filterwarnings('ignore', category=UserWarning)
FIGS = os.environ.get('FIGS')

# -- reading a figure back ------------------------------------------------------------------------------------------------
def drawn_texts(fig)->list:
    "Every text the figure draws, with its box in pixels: titles, suptitles, axis labels, tick labels, legends, colour bars"
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    out = []
    seen = set()
    def add(t, what):
        if isinstance(t, Text) and id(t) not in seen and t.get_visible() and t.get_text().strip():
            seen.add(id(t)); out.append((what, t.get_text(), t.get_window_extent(r)))
    for f in [fig, *fig.findobj(lambda o: type(o).__name__ == 'SubFigure')]:
        for t in f.texts: add(t, 'figure text')
        for k in ('_suptitle', '_supxlabel', '_supylabel'): add(getattr(f, k, None), 'suptitle')
        for lg in f.legends: [add(t, 'legend') for t in [*lg.get_texts(), lg.get_title()]]
    for ax in fig.findobj(Axes):
        if not ax.get_visible(): continue
        for t in (ax.title, ax._left_title, ax._right_title, *ax.texts): add(t, 'title')
        if (lg := ax.get_legend()) is not None: [add(t, 'legend') for t in [*lg.get_texts(), lg.get_title()]]
        if not ax.axison: continue
        for axis in (ax.xaxis, ax.yaxis):
            add(axis.label, 'axis label'); add(axis.get_offset_text(), 'offset')
            for tick in axis._update_ticks():  # only the ticks within the view are drawn
                add(tick.label1, 'tick'); add(tick.label2, 'tick')  # a hidden label is not visible
    return out

def layout_faults(fig)->list:
    "Pairs of drawn texts whose boxes overlap (by more than a pixel each way), and texts that stick out of the figure"
    texts, W, H = drawn_texts(fig), fig.bbox.width, fig.bbox.height
    faults = [f'cut off: {w} {s!r}' for w, s, b in texts if b.x0 < -1 or b.y0 < -1 or b.x1 > W + 1 or b.y1 > H + 1]
    for i, (w1, s1, b1) in enumerate(texts):
        for w2, s2, b2 in texts[i + 1:]:
            if min(b1.x1, b2.x1) - max(b1.x0, b2.x0) > 1 and min(b1.y1, b2.y1) - max(b1.y0, b2.y0) > 1:
                faults.append(f'overlap: {w1} {s1!r} and {w2} {s2!r}')
    return faults

def legends_clear_of_data(fig)->list:
    "Legends drawn over an Axes' data area (where they can hide a peak)"
    r, out = fig.canvas.get_renderer(), []
    for ax in fig.findobj(Axes):
        lg = ax.get_legend()
        if lg is None or not lg.get_visible(): continue
        a, b = ax.get_window_extent(r), lg.get_window_extent(r)
        if min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1 and ax.lines:
            out.append(f'legend over the data of {ax.get_title() or ax.get_ylabel()!r}')
    return out

def check(fig, name)->list:
    "What does not read in the figure (overlaps, texts cut off, legends over data), each fault prefixed by `name`; saved to $FIGS/<name>.png when asked"
    try:
        faults = layout_faults(fig) + legends_clear_of_data(fig)
        if FIGS:
            Path(FIGS).mkdir(parents=True, exist_ok=True)
            fig.savefig(Path(FIGS)/f'{name}.png', dpi=fig.dpi)
        return [f'{name}: {f}' for f in faults]
    finally: plt.close(fig)

def no_faults(faults): assert not faults, '\n'.join(faults)

def test_the_check_catches_overlaps_and_cuts():
    "The checker itself: two texts on top of each other, one outside the figure, and a legend over a line are found"
    fig, ax = plt.subplots(figsize=(3, 2), layout='constrained')
    ax.set_title('a title'); ax.text(0.5, 1.02, 'on the title', transform=ax.transAxes, ha='center')
    assert any('overlap' in f and 'on the title' in f for f in layout_faults(fig))
    ax.texts[0].set_position((3, 0.5))
    assert any('cut off' in f for f in layout_faults(fig))
    ax.texts[0].remove(); ax.plot([0, 1], [0, 1], label='line'); ax.legend(loc='center')
    assert not layout_faults(fig) and legends_clear_of_data(fig)
    plt.close(fig)

# -- small models of every family, on BasicMotions for each task ----------------------------------------------------------
C, L = 6, 100
ARCHS = {  # each family small, built as an instance for every task (tsai's build_ts_model adds heads that depend on the task)
    'ConvTranPlus': lambda c, o, l: ConvTranPlus(c, o, l),
    'TSTPlus': lambda c, o, l: TSTPlus(c, o, l, d_model=16, n_heads=4, n_layers=2, d_ff=32),
    'MultiTSTPlus': lambda c, o, l: MultiTSTPlus([3, 3], o, l, d_model=16, n_heads=2, n_layers=2, d_ff=32),
    'TSiTPlus': lambda c, o, l: TSiTPlus(c, o, l, d_model=16, n_heads=4, depth=2),
    'PatchTST': lambda c, o, l: PatchTST(c, c, l, pred_dim=H, d_model=16, n_heads=4, n_layers=2, d_ff=32),  # [bs, c, H]
    'TST': lambda c, o, l: TST(c, o, l, d_model=16, n_heads=4, n_layers=2, d_ff=32),
    'RNNAttention': lambda c, o, l: RNNAttention(c, o, l, hidden_size=16, n_heads=4, encoder_layers=2),
    'TransformerModel': lambda c, o, l: TransformerModel(c, o, d_model=16, n_head=4, n_layers=2),
    'TSPerceiver': lambda c, o, l: TSPerceiver(c, o, l, n_latents=8, d_latent=16, n_layers=2),
}
H = 20  # forecast horizon: the '20-value targets'
TASKS = ('classification', 'regression', 'forecasting', 'multilabel')

def _data(task):
    "BasicMotions for `task`, 16 items to train and 16 to validate (layout does not depend on how many)"
    X, y, (tr, va) = load_dataset('BasicMotions')
    splits = (tr[::2][:16], va[::2][:16])
    if task == 'forecasting': return X[..., :L - H], X[..., L - H:], splits           # every variable's next 20 steps: [n, 6, 20]
    if task == 'regression': return X, X[:, 0, -20:].mean(-1).astype('float32'), splits
    if task == 'multilabel':  # label sets of one or two labels, as tsai takes them (an object array of lists)
        sets = np.empty(len(y), dtype=object)
        sets[:] = [[c, 'moving'] if c in ('Running', 'Walking') else [c] for c in y]
        return X, sets, splits
    return X, y, splits

def _supported(arch, task):
    "PatchTST is a forecaster (its head predicts steps); the others take every task"
    return task == 'forecasting' if arch == 'PatchTST' else True

@pytest.fixture(scope='module')
def learners():
    "One learner per (family, task), built once for the module, untrained (layout does not depend on training)"
    cache = {}
    def get(arch, task):
        if (arch, task) not in cache:
            X, y, splits = _data(task)
            if task == 'forecasting' and arch != 'PatchTST': y = y[:, 0]   # a flat head: variable 0's next 20 steps [n, 20]
            c_out = dict(classification=4, multilabel=5, regression=1, forecasting=H)[task]
            set_seed(0, reproducible=True)
            kw = dict(splits=splits, bs=16, verbose=False, seed=0, arch=ARCHS[arch](X.shape[1], c_out, X.shape[-1]))
            if task == 'classification': learn = TSClassifier(X, y, tfms=[None, TSClassification()], **kw)
            elif task == 'multilabel': learn = TSClassifier(X, y, tfms=[None, TSMultiLabelClassification()], loss_func=BCEWithLogitsLossFlat(), metrics=accuracy_multi, **kw)
            elif task == 'regression': learn = TSRegressor(X, y, **kw)
            else: learn = TSForecaster(X, y, **kw)
            cache[arch, task] = learn
        return cache[arch, task]
    return get

def recorded(learn, **kw):
    "Attach a fresh recorder that keeps items 0..2 (and mean maps), run one pass; the caller removes it"
    for cb in [c for c in learn.cbs if isinstance(c, AttnRecorder)]: learn.remove_cb(cb)
    rec = AttnRecorder(idxs=[0, 1, 2], **kw)
    learn.add_cb(rec)
    with learn.no_bar(): learn.get_preds()
    return rec

CASES = [(a, t) for t in TASKS for a in ARCHS if _supported(a, t)]

@pytest.mark.parametrize('arch,task', CASES, ids=[f'{a}-{t}' for a, t in CASES])
def test_views_read(learners, arch, task):
    "Heatmap, head grid (items × heads), series (received and a query's row), every layer, mean maps, one item minus the mean"
    got = []
    learn = learners(arch, task)
    agg = dict(classification='class', multilabel='mean', regression='bins', forecasting='mean')[task]
    rec = recorded(learn)
    n = f'{arch}-{task}'
    try:
        got += check(learn.show_attention(idx=[0, 1, 2]), f'{n}-grid')
        got += check(learn.show_attention(idx=0, head=rec.recording.heads[-1]), f'{n}-heatmap')
        names = list(dict.fromkeys(rec.recording.layers))
        series_layer = next((i for i, l in enumerate(names) if rec.recording.tokens(l) is None or
                             not all(s < 0 for s, _ in rec.recording.tokens(l)['key'][1])), None)
        if series_layer is not None:
            got += check(learn.show_attention(view='series', idx=0, layer=series_layer), f'{n}-series')
            tok = rec.recording.tokens(names[series_layer])
            if tok is None or any(a >= 0 for a, _ in tok['query'][1]):  # a query that holds time steps (TSPerceiver's are latents)
                got += check(learn.show_attention(view='series', idx=0, head=0, layer=series_layer, query=10), f'{n}-series-query')
        if len(names) > 1: got += check(learn.show_attention(layer='all', idx=0), f'{n}-layers')
        got += check(learn.show_attention(idx=0, relative_to='mean'), f'{n}-minus-mean')
    finally: learn.remove_cb(rec)
    got += check(learn.show_attention(aggregate=agg), f'{n}-{agg}')
    no_faults(got)

@pytest.mark.parametrize('task', ['classification', 'forecasting'])
def test_parts_read(learners, task):
    "ConvTranPlus, the family whose layers add a bias after the softmax (eRPE): the softmax part of a grid, the bias part: the softmax part of a grid, the bias part (grid and one head), mean maps' parts"
    got = []
    learn = learners('ConvTranPlus', task)
    rec = recorded(learn)
    n = f'ConvTranPlus-{task}'
    try:
        got += check(learn.show_attention(idx=[0, 1], part='softmax'), f'{n}-grid-softmax')
        got += check(learn.show_attention(idx=0, part='bias'), f'{n}-bias')
        got += check(learn.show_attention(idx=0, part='bias', head=2), f'{n}-bias-head')
        got += check(learn.show_attention(view='series', idx=0, part='softmax'), f'{n}-series-softmax')
    finally: learn.remove_cb(rec)
    got += check(learn.show_attention(aggregate='mean', part='softmax'), f'{n}-mean-softmax')
    no_faults(got)

def test_relative_to_class_reads(learners):
    got = []
    learn = learners('ConvTranPlus', 'classification')
    rec = recorded(learn)
    try: got += check(learn.show_attention(idx=[0, 1], relative_to='class'), 'ConvTranPlus-classification-minus-class')
    finally: learn.remove_cb(rec)
    no_faults(got)

@pytest.mark.parametrize('arch', [a for a in ARCHS if a != 'PatchTST'] + ['PatchTST'])
def test_relevance_view_reads(learners, arch):
    got = []
    learn = learners(arch, 'forecasting' if arch == 'PatchTST' else 'classification')
    ms = ['attention', 'occlusion'] if arch != 'PatchTST' else ['occlusion']
    try: fig = learn.show_attention(view='relevance', idx=0, method=ms)
    except ValueError as e: pytest.skip(f'relevance refuses {arch}: {e}')
    got += check(fig, f'{arch}-relevance')
    if all('legend over the data' in f for f in got) and got:  # plot_relevance is nbs/41_explain_relevance.ipynb's: its legends sit on the curves
        pytest.xfail('plot_relevance draws its legends over the data: ' + '; '.join(got))
    no_faults(got)

@pytest.mark.parametrize('arch', ['ConvTranPlus', 'TSTPlus'])
def test_evolution_reads(arch):
    "The probe through two epochs, every head (epochs as rows) and one head (epochs as columns), with the statistics below"
    got = []
    X, y, splits = load_dataset('BasicMotions')
    set_seed(0, reproducible=True)
    learn = TSClassifier(X, y, splits=splits, arch=ARCHS[arch](6, 4, 100), tfms=[None, TSClassification()], bs=16, verbose=False, seed=0)
    rec = AttnRecorder(every_epoch=True, probe=[0, 5])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3, cbs=[rec])
    learn.add_cb(rec)
    try:
        got += check(learn.show_attention_evolution(), f'{arch}-evolution')
        got += check(learn.show_attention_evolution(head=1, idx=5), f'{arch}-evolution-head')
    finally: learn.remove_cb(rec)
    no_faults(got)

@pytest.mark.parametrize('arch', ['ConvTranPlus', 'TSTPlus'])
def test_item_across_folds_reads(learners, arch):
    "Two runs' recordings of the same item: one row per fold, labelled, and the colour bar says what the values are"
    got = []
    learn = learners(arch, 'classification')
    recs = [learn.record_attention(idxs=[3], tag=f'fold {k}') for k in (1, 2)]
    fig = plot_item_across_folds(recs, idx=3)
    rows = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel() and ax.get_subplotspec() and ax.get_subplotspec().colspan.start == 0]
    assert [r.splitlines()[0] for r in rows] == ['fold 1, Batch 0', 'fold 2, Batch 0'], rows
    got += check(fig, f'{arch}-folds')
    got += check(plot_item_across_folds(recs, idx=3, head=0), f'{arch}-folds-head')
    no_faults(got)


def test_multitstplus_series_draws_the_variables_a_branch_sees(learners):
    "MultiTSTPlus([3, 3]): the series view of the second branch's layer draws variables 3..5 of the input, and says so (issue 17 §11)"
    learn = learners('MultiTSTPlus', 'classification')
    rec = recorded(learn)
    try:
        names = list(dict.fromkeys(rec.recording.layers))
        second = next(i for i, n in enumerate(names) if '.branches.1.' in n)
        fig = learn.show_attention(view='series', idx=0, layer=second)
        ax = fig.axes[0]
        X, _, splits = _data('classification')
        assert [l.get_label() for l in ax.lines] == ['var 3', 'var 4', 'var 5']
        for l, v in zip(ax.lines, (3, 4, 5)): np.testing.assert_allclose(l.get_ydata(), X[splits[1][0], v], rtol=1e-6)  # no batch tfms
        assert 'the layer sees variables 3, 4, 5 of 6' in ax.get_title() and f'{names[second]} (layer {second} of 4)' in ax.get_title()
        no_faults(check(fig, 'MultiTSTPlus-classification-series-branch1'))
    finally: learn.remove_cb(rec)

def _pixels(fig):
    "What a figure shows: its pixels and its texts"
    fig.canvas.draw()
    out = np.asarray(fig.canvas.buffer_rgba()).copy(), sorted(t.get_text() for t in fig.findobj(Text) if t.get_text())
    plt.close(fig)
    return out

@pytest.mark.parametrize('arch', list(ARCHS))
def test_a_recording_on_disk_draws_alone_as_its_learner_draws_it(learners, arch, tmp_path):
    "Every family: a recording streamed to disk, opened and drawn without its Learner (rec.show_attention, rec.attention_report) shows what the Learner draws from it, pixel for pixel"
    learn = learners(arch, 'forecasting' if arch == 'PatchTST' else 'classification')
    with learn.no_bar(): learn.get_preds(cbs=[AttnRecorder(idxs=[0, 1, 2], path=tmp_path/'rec')])
    rec = AttnRecording.open(tmp_path/'rec')
    names = list(dict.fromkeys(rec.layers))
    views = [dict(idx=[0, 1, 2]), dict(idx=0, head=rec.heads[-1]), dict(layer='all', idx=0)]
    # the series view of each layer whose keys are time steps: a MultiTSTPlus branch draws the variables it sees, as recorded
    views += [dict(view='series', idx=1, layer=i) for i, n in enumerate(names)
              if rec.tokens(n) is None or not all(s < 0 for s, _ in rec.tokens(n)['key'][1])]
    for kw in views:
        alone, drawn = _pixels(rec.show_attention(**kw)), _pixels(learn.show_attention(recorder=rec, **kw))
        assert alone[1] == drawn[1] and np.array_equal(alone[0], drawn[0]), (arch, kw)
        if arch == 'MultiTSTPlus' and kw.get('view') == 'series' and '.branches.1.' in names[kw['layer']]:
            assert any('the layer sees variables 3, 4, 5 of 6' in t for t in alone[1])  # as recorded: no model to ask
    assert rec.attention_report(idx=[0, 1]).html == learn.attention_report(idx=[0, 1], recorder=rec).html
