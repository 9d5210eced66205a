"Issue 21: the probe logged each epoch to TensorBoard and W&B (offline), read back from the files they write."
import copy, io, json, os, pickle, shutil, struct, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
import matplotlib; matplotlib.use('Agg')
from PIL import Image
from fastai.callback.core import Callback
from tsai_attnviz.all import *
from conftest import make_learner, no_leftovers

LAYER = 'backbone.attention_layer'
LOGGED = ('entropy', 'bias_share', 'mean_distance', 'rowsum_min', 'rowsum_max')
COMBINE = dict(entropy='mean', bias_share='mean', mean_distance='mean', rowsum_min='min', rowsum_max='max')  # over the probe items
PROBE = [0, 13, 27]
EXE = shutil.which('tsai-attnviz') or str(Path(sys.executable).parent/'tsai-attnviz')

def cli(*args):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env={**os.environ, 'MPLBACKEND': 'Agg'}, timeout=600)

class KeepWeights(Callback):
    order = 100
    def after_fit(self): self.state = copy.deepcopy(self.learn.model.state_dict())

def fit(bm_data, cbs, epochs=3, seed=7):
    keep = KeepWeights()
    learn = make_learner(*bm_data, seed=seed)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3, cbs=cbs + [keep])
    return [l.item() for l in learn.recorder.losses], keep.state, learn

def expected_scalars(rec, epoch):
    "The per-head numbers a probe should give, from the per-record table: each statistic combined over the probe items"
    df = rec.recording.stats_df()
    d = df[(df.split == 'probe') & (df.epoch == epoch)]
    assert sorted(set(d.idx)) == PROBE
    return {f'attention/{LAYER}/{s}/head_{h}': d[d['head'] == h][s].agg(COMBINE[s]) for s in LOGGED for h in range(8)}

def grid_px(size, n_rows, n_heads=8, panel=2.2, dpi=100)->bool:
    """Whether (width, height) in pixels is a head grid of n_rows × n_heads: plot_head_grid gives each cell panel × panel inches,
    plus room for the row labels and the colour bar (width) and the titles (height), which depend on the labels' lengths"""
    w, h = size
    return panel * n_heads * dpi <= w <= (panel * n_heads + 4) * dpi and panel * n_rows * dpi <= h <= (panel * n_rows + 1.5) * dpi

# -- nothing without the extra ---------------------------------------------------------------
def test_nothing_imported_without_a_tracker():
    "Importing the package, and a probe fit with no tracker, load neither tensorboard nor wandb"
    code = """
import sys, numpy as np
from tsai_attnviz.all import *
from tsai.basics import TSClassifier, TSClassification
from tsai.models.ConvTranPlus import ConvTranPlus
rng = np.random.default_rng(0)
X, y = rng.standard_normal((16, 2, 12)).astype('float32'), np.array(['a', 'b'] * 8)
learn = TSClassifier(X, y, splits=(list(range(8)), list(range(8, 16))), arch=ConvTranPlus, bs=8, tfms=[None, TSClassification()], verbose=False)
rec = AttnRecorder(every_epoch=True)
with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[rec])
assert len(rec.recording) == 2
print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb', 'tensorboardX') or m.startswith('torch.utils.tensorboard')))
"""
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env={**os.environ, 'MPLBACKEND': 'Agg'})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == '[]'

def test_bad_log_to():
    with pytest.raises(TypeError, match=r"log_to='runs/' is not a tracker: use a torch.utils.tensorboard SummaryWriter, a W&B run"):
        AttnRecorder(every_epoch=True, log_to='runs/')
    with pytest.raises(ValueError, match=r'use AttnRecorder\(every_epoch=True, log_to=...\)'):
        AttnRecorder(log_to=TensorBoardTracker(None))

# -- TensorBoard -------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tb_run(bm_data, tmp_path_factory):
    "A 3-epoch BasicMotions fit with fastai's TensorBoardCallback and a probe recorder, and the same seeded fit with neither"
    from fastai.callback.tensorboard import TensorBoardCallback
    d = tmp_path_factory.mktemp('tb')
    rec = AttnRecorder(every_epoch=True, probe=PROBE)
    logged = fit(bm_data, [TensorBoardCallback(d, trace_model=False, log_preds=False), rec])
    plain = fit(bm_data, [])
    return d, rec, logged, plain

def event_file(d):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = list(Path(d).glob('events.out.tfevents.*'))
    assert len(files) == 1, files
    ea = EventAccumulator(str(files[0]), size_guidance={'images': 0, 'scalars': 0})  # 0: keep every event
    ea.Reload()
    return ea

def test_training_unchanged_by_tensorboard(tb_run):
    _, _, (losses_l, state_l, learn), (losses_p, state_p, _) = tb_run
    assert losses_l == losses_p
    assert all(torch.equal(state_l[k], state_p[k]) for k in state_p)  # final weights, bitwise
    no_leftovers(learn.model)

def test_tensorboard_event_file_holds_figures_and_stats(tb_run):
    d, rec, *_ = tb_run
    ea = event_file(d)
    assert ea.Tags()['images'] == [f'attention/{LAYER}']
    ims = ea.Images(f'attention/{LAYER}')
    assert [i.step for i in ims] == [0, 1, 2, 3]  # before training and after each of the 3 epochs
    for i in ims:
        png = Image.open(io.BytesIO(i.encoded_image_string))
        assert png.size == (i.width, i.height) and grid_px(png.size, len(PROBE))  # 3 probe items × 8 heads
    assert len({i.encoded_image_string for i in ims}) == 4  # the maps change as training proceeds
    tags = [t for t in ea.Tags()['scalars'] if t.startswith('attention/')]
    assert len(tags) == len(LOGGED) * 8
    assert 'train_loss' in ea.Tags()['scalars']  # the callback's own logging goes on beside
    for e in range(4):
        want = expected_scalars(rec, e)
        assert sorted(want) == sorted(tags)
        got = {t: next(s.value for s in ea.Scalars(t) if s.step == e) for t in tags}
        # the event file stores float32: equal to float32 precision, relative to each value
        np.testing.assert_allclose([got[t] for t in tags], [want[t] for t in tags], rtol=2e-7, atol=0)

def test_log_to_summary_writer_and_pickle(bm_data, tmp_path):
    "log_to= a SummaryWriter of one's own; a recorder holding one still pickles (without it)"
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(tmp_path)
    with pytest.raises(Exception): pickle.dumps(w)  # a writer does not pickle: the recorder must leave it out
    rec = AttnRecorder(every_epoch=True, probe=PROBE, log_to=w)
    fit(bm_data, [rec], epochs=1)
    w.close()
    ea = event_file(tmp_path)
    assert [i.step for i in ea.Images(f'attention/{LAYER}')] == [0, 1]
    assert pickle.loads(pickle.dumps(rec)).tracking.log_to is None

def test_cli_demo_tensorboard(tmp_path):
    p = cli('demo', '--epochs', '3', '--out', tmp_path/'out', '--tensorboard', tmp_path/'tb', '--no-html')
    assert p.returncode == 0, p.stderr[-2000:]
    assert f'TensorBoard log: {tmp_path/"tb"}' in p.stdout
    ea = event_file(tmp_path/'tb')
    ims = ea.Images(f'attention/{LAYER}')
    assert [i.step for i in ims] == [0, 1, 2, 3]
    assert grid_px((ims[0].width, ims[0].height), 4)  # one item per class of BasicMotions' 4
    assert len([t for t in ea.Tags()['scalars'] if t.startswith('attention/')]) == len(LOGGED) * 8
    assert len(ea.Scalars('train_loss')) > 0

# -- Weights & Biases, offline ---------------------------------------------------------------------
def wandb_history(run_dir):
    "History rows of an offline W&B run, read from its .wandb file (a LevelDB-style log of protobuf Records)"
    from wandb.proto import wandb_internal_pb2 as pb
    f, = Path(run_dir).glob('run-*.wandb')
    b, pos, block, rows, buf = f.read_bytes(), 7, 32768, [], b''   # 7 bytes: ':W&B', magic, version
    assert b[:4] == b':W&B'
    while pos + 7 <= len(b):
        if block - pos % block < 7: pos += block - pos % block; continue  # a block's tail too short for a header is padding
        _, n, kind = struct.unpack('<IHB', b[pos:pos + 7])              # crc32, length, 1 full / 2 first / 3 middle / 4 last
        if n == 0 and kind == 0: break
        buf += b[pos + 7:pos + 7 + n]; pos += 7 + n
        if kind in (1, 4):
            r = pb.Record(); r.ParseFromString(buf); buf = b''
            if r.WhichOneof('record_type') == 'history':
                rows.append({i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows

@pytest.fixture
def offline(tmp_path, monkeypatch):
    for k, v in dict(WANDB_MODE='offline', WANDB_DIR=str(tmp_path), WANDB_SILENT='true', WANDB_CONSOLE='off').items(): monkeypatch.setenv(k, v)
    import wandb
    return wandb

def test_wandb_run_offline(bm_data, offline):
    wandb = offline
    run = wandb.init(project='attnviz-test')
    try:
        rec = AttnRecorder(every_epoch=True, probe=PROBE, log_to=run)
        fit(bm_data, [rec], epochs=2)
    finally: run.finish(); wandb.teardown()  # teardown: the service has written the whole .wandb file
    run_dir = Path(run.dir).parent
    rows = [r for r in wandb_history(run_dir) if 'attention/epoch' in r]
    assert [r['attention/epoch'] for r in rows] == [0, 1, 2]
    for r in rows:
        want = expected_scalars(rec, r['attention/epoch'])
        # JSON keeps float64 exactly; the table is grouped by pandas here, by the recording there: the same sums up to rounding
        np.testing.assert_allclose([r[t] for t in want], list(want.values()), rtol=1e-12)
        im = r[f'attention/{LAYER}/path']
        assert r[f'attention/{LAYER}/_type'] == 'image-file'
        png = Image.open(run_dir/'files'/im)
        assert png.size == (r[f'attention/{LAYER}/width'], r[f'attention/{LAYER}/height']) and grid_px(png.size, len(PROBE))

def test_wandb_callback_offline(bm_data, offline, monkeypatch):
    "Beside fastai's WandbCallback the probe joins the callback's steps (one per batch) instead of adding its own"
    wandb = offline
    import fastai.callback.wandb as fw
    from fastai.callback.wandb import WandbCallback
    # fastai 2.8's WandbCallback fails in before_fit on any plain value of its config (vars(True): fastai issue #4173);
    # the fix proposed there: inspect only objects that have attributes
    fmt = fw._format_config_value
    monkeypatch.setattr(fw, '_format_config_value', lambda v: fmt(v) if isinstance(v, list) or hasattr(v, '__dict__') else v)
    run = wandb.init(project='attnviz-test')
    try:
        rec = AttnRecorder(every_epoch=True, probe=PROBE)
        losses, *_ = fit(bm_data, [WandbCallback(log_preds=False), rec], epochs=2)
    finally: run.finish(); wandb.teardown()  # teardown: the service has written the whole .wandb file
    rows = wandb_history(Path(run.dir).parent)
    steps = [r['_step'] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    probe = [r for r in rows if 'attention/epoch' in r]
    assert [r['attention/epoch'] for r in probe] == [0, 1, 2]
    assert all('train_loss' in r for r in probe)  # in the callback's rows, not rows of their own
    assert len([r for r in rows if 'train_loss' in r]) == len(losses)  # every training batch logged by the callback still
    for r in probe:
        want = expected_scalars(rec, r['attention/epoch'])
        np.testing.assert_allclose([r[t] for t in want], list(want.values()), rtol=1e-12)
