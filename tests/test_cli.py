"Issue 5: the command line in a subprocess, and recordings saved and loaded."
import os, subprocess, sys, shutil
from pathlib import Path
import numpy as np, pytest, torch
from tsai_attnviz.record.recorder import AttnRecorder
from tsai_attnviz.record.recording import AttnRecording

EXE = shutil.which('tsai-attnviz') or str(Path(sys.executable).parent/'tsai-attnviz')

def run(*args, cwd=None):
    env = {**os.environ, 'MPLBACKEND': 'Agg'}
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)

@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    p = run('demo', '--epochs', '2', '--out', out, '--export')
    return out, p

def test_demo_writes_the_files(demo):
    out, p = demo
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'valid accuracy' in p.stdout
    # stdout is a pipe here, as in a log or CI: one line per epoch, and no progress bar's redraws
    assert [l.split(':')[0] for l in p.stdout.splitlines() if l.startswith('epoch ')] == ['epoch 1/2', 'epoch 2/2'], p.stdout
    assert 'train_loss' in p.stdout and 'valid_loss' in p.stdout and 'accuracy' in p.stdout
    assert '\r' not in p.stdout + p.stderr and '█' not in p.stdout + p.stderr and '100.00%' not in p.stdout + p.stderr
    for f in ['attention_grid.png', 'attention_head0.png', 'attention_class.png', 'recording.npz', 'learner.pkl', 'attention_report.html']:
        assert (out/f).stat().st_size > 1000, f
        assert str(out/f) in p.stdout, f  # says where each file went
    assert len(list(out.glob('attention_series_idx*.png'))) == 4  # one item per class
    r = AttnRecording.load(out/'recording.npz')
    assert len(r) == 4 and sorted(set(r.targets)) == [0, 1, 2, 3]

@pytest.fixture(scope='module')
def user_data(demo, tmp_path_factory, bm_data):
    d = tmp_path_factory.mktemp('data')
    X, y, splits = bm_data
    np.save(d/'X.npy', X[splits[1]][:6])
    np.savez(d/'X.npz', X=X[splits[1]][:6])
    np.save(d/'y_bad.npy', np.array(['Walking'] * 5 + ['Swimming']))
    return d

def test_show_on_an_exported_learner(demo, user_data, tmp_path):
    out, _ = demo
    p = run('show', out/'learner.pkl', '--data', user_data/'X.npz', '--idxs', '1', '4', '--head', '3', '--out', tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    for f in ['attention_grid.png', 'attention_head3.png', 'attention_series_idx1.png', 'attention_series_idx4.png']:
        assert (tmp_path/f).stat().st_size > 1000, f
    assert AttnRecording.load(tmp_path/'recording.npz').idxs == [1, 4]

def bad_cases(d):
    X = np.load(d/'X.npy')
    np.save(d/'vars.npy', X[:, :4]); np.save(d/'len.npy', X[:, :, :90]); np.save(d/'str.npy', np.array([['a']]))
    nan = X.copy(); nan[2, 1, 7] = np.nan; np.save(d/'nan.npy', nan)
    inf = X.copy(); inf[0, 0, 0] = np.inf; np.save(d/'inf.npy', inf)
    (d/'junk.npy').write_bytes(b'junk')
    return [('vars.npy', '--data has 4 variables (shape [6, 4, 100]); the model expects 6: [n_samples, 6, 100]'),
            ('len.npy', '--data has seq_len 90 (shape [6, 6, 90]); the model expects 100'),
            ('str.npy', '--data has dtype <U1; expected numbers [n_samples, n_vars, seq_len]'),  # refused before the learner is loaded
            ('nan.npy', '--data has 1 NaN or inf values (first at [2, 1, 7])'),
            ('inf.npy', '--data has 1 NaN or inf values (first at [0, 0, 0])'),
            ('junk.npy', '--data: cannot read junk.npy as a numpy array'),
            ('missing.npy', '--data: no file at')]

def test_show_bad_data(demo, user_data):
    out, _ = demo
    for name, msg in bad_cases(user_data):
        p = run('show', out/'learner.pkl', '--data', user_data/name)
        assert p.returncode == 2, (name, p.stderr)
        assert p.stderr.startswith('tsai-attnviz: error: ') and msg in p.stderr, (name, p.stderr)
        assert 'Traceback' not in p.stderr and p.stderr.strip().count('\n') == 0, (name, p.stderr)

@pytest.mark.parametrize('args,msg', [(['--idxs', '9'], '--idxs [9] out of range: --data has 6 samples (0..5)'),
                                      (['--head', '8'], '--head 8 out of range: the model has 8 heads (0..7)'),
                                      (['--max-len', '0'], '--max-len 0: use a positive whole number'),
                                      (['--y', 'y_bad.npy'], "--y has labels ['Swimming'] that the model does not know: its classes are "
                                                             "['Badminton', 'Running', 'Standing', 'Walking']")])
def test_show_bad_options(demo, user_data, args, msg):
    out, _ = demo
    p = run('show', out/'learner.pkl', '--data', user_data/'X.npy', *[user_data/a if a.endswith('.npy') else a for a in args])
    assert p.returncode == 2 and msg in p.stderr and 'Traceback' not in p.stderr and p.stderr.strip().count('\n') == 0, p.stderr

def test_show_with_labels_names_the_classes(demo, user_data, bm_data, tmp_path):
    out, _ = demo
    X, y, splits = bm_data
    np.save(user_data/'y.npy', y[splits[1]][:6])
    p = run('show', out/'learner.pkl', '--data', user_data/'X.npy', '--y', user_data/'y.npy', '--out', tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    r = AttnRecording.load(tmp_path/'recording.npz')
    assert r.meta['vocab'] == ['Badminton', 'Running', 'Standing', 'Walking']  # kept by load_learner through the target transform
    assert [r.meta['vocab'][t] for t in r.targets] == list(y[splits[1]][:4])

@pytest.mark.parametrize('args,msg', [(['--head', '9'], '--head 9 out of range: the model has 8 heads (0..7)'),
                                      (['--max-classes', '0'], '--max-classes 0: use a positive whole number'),
                                      (['--max-len', '0'], '--max-len 0'), (['--epochs', '0'], '--epochs 0')])
def test_demo_bad_options_before_training(args, msg, tmp_path):
    p = run('demo', '--out', tmp_path, *args)
    assert p.returncode == 2 and msg in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr and p.stderr.strip().count('\n') == 0 and 'Trained' not in p.stdout

def test_show_bad_learner(user_data, tmp_path):
    (tmp_path/'l.pkl').write_bytes(b'garbage')
    p = run('show', tmp_path/'l.pkl', '--data', user_data/'X.npy')
    assert p.returncode == 2 and 'cannot load l.pkl as an exported fastai Learner' in p.stderr and 'Traceback' not in p.stderr

def test_demo_bad_dataset():
    p = run('demo', '--dataset', 'ECG200')
    assert p.returncode == 2 and "dataset 'ECG200' is not bundled: use one of BasicMotions, GunPoint, Coffee, PigCVP" in p.stderr

def test_recording_round_trip_and_damaged_file(bm_learner, tmp_path):
    rec = AttnRecorder(batches=[0, 1], samples=[0, 3], aggregate='class', tag='fold 2', dtype='bfloat16', max_len=50)
    bm_learner.get_preds(cbs=[rec])
    r = rec.recording
    r2 = AttnRecording.load(r.save(tmp_path/'r.npz'))
    for k in ['weights', 'key_attn', 'entropy', 'inputs', 'preds']: assert torch.equal(getattr(r2, k), getattr(r, k)), k
    assert r2.weights.dtype == torch.bfloat16
    for k in ['targets', 'idxs', 'batches', 'samples', 'layers', 'tags', 'epochs', 'heads', 'block', 'seq_len', 'splits', 'forwards', 'blocks']:
        assert getattr(r2, k) == getattr(r, k), k
    assert r2.group_keys == r.group_keys == sorted(set(bm_learner.dls.vocab) & set(r.group_keys), key=list(bm_learner.dls.vocab).index)
    for c in r.group_keys: assert torch.equal(r2.mean_map(c), r.mean_map(c))  # keyed by label
    raw = (tmp_path/'r.npz').read_bytes()
    (tmp_path/'cut.npz').write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match='is not a readable AttnRecording'): AttnRecording.load(tmp_path/'cut.npz')
    np.savez(tmp_path/'pickled.npz', meta=np.array([{'a': 1}], dtype=object))
    with pytest.raises(ValueError, match='is not a readable AttnRecording') as e: AttnRecording.load(tmp_path/'pickled.npz')
    assert 'allow_pickle' not in str(e.value)  # never suggest unpickling

def test_demo_fast_trains_with_fused_attention_and_records(tmp_path):
    p = run('demo', '--fast', '--epochs', '1', '--no-html', '--out', tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'with fused attention' in p.stdout and not (tmp_path/'attention_report.html').exists()
    r = AttnRecording.load(tmp_path/'recording.npz')
    assert len(r) == 4 and torch.isfinite(r.weights).all()

def test_demo_writes_the_parts_of_erpe_maps(demo):
    out, p = demo
    for f in ['attention_grid_softmax.png', 'attention_bias.png']: assert (out/f).stat().st_size > 1000, f
    r = AttnRecording.load(out/'recording.npz')
    assert r.biases and all(torch.equal(r.part(x, 'softmax') + r.part(x, 'bias'), x['weights']) for x in r.records)

@pytest.mark.parametrize('arch', ['PatchTST', 'TSTPlus'])
def test_demo_other_architectures(arch, tmp_path):
    "A forecaster (PatchTST: the last fifth of GunPoint) and a classifier with several layers, and their exports through show"
    p = run('demo', '--arch', arch, '--epochs', '1', '--out', tmp_path, '--no-html', '--export')
    assert p.returncode == 0, p.stderr[-2000:]
    assert ('valid MAE' if arch == 'PatchTST' else 'valid accuracy') in p.stdout and f'Trained {arch}' in p.stdout
    if arch == 'PatchTST': assert "(predicting each variable's mean of its input: 1.022)" in p.stdout  # what it reached, against no model
    r = AttnRecording.load(tmp_path/'recording.npz')
    assert r.meta['arch'] == ('PatchTST' if arch == 'PatchTST' else 'TSTPlus') and len(set(r.layers)) == 2
    if arch == 'PatchTST': assert r.meta['per_var'] and set(r.vars) <= {None, 0} and r.records[0]['input'].shape == (1, 120)  # univariate
    from tsai_attnviz.cli import load_dataset
    Xd = load_dataset('GunPoint')[0][:3, :, :120] if arch == 'PatchTST' else load_dataset('BasicMotions')[0][:3]
    np.save(tmp_path/'X.npy', Xd)
    q = run('show', tmp_path/'learner.pkl', '--data', tmp_path/'X.npy', '--out', tmp_path/'show', '--no-html')
    assert q.returncode == 0, q.stderr[-2000:]
    assert ('PatchTST' if arch == 'PatchTST' else 'TSTPlus') in q.stdout and (tmp_path/'show'/'attention_grid.png').exists()

@pytest.mark.parametrize('args,msg', [(['--arch', 'ResNet'], "--arch 'ResNet' is not one the demo builds: use one of ConvTranPlus, TSTPlus"),
                                      (['--arch', 'TST', '--part', 'bias'], '--part bias: TST adds no bias after its softmax'),
                                      (['--arch', 'TST', '--fast'], "--fast is ConvTranPlus's fused path")])
def test_demo_refuses_bad_architecture_options(args, msg):
    p = run('demo', *args, '--epochs', '1')
    assert p.returncode == 2 and msg in p.stderr and p.stderr.count('\n') == 1, p.stderr
    assert 'Trained' not in p.stdout  # refused before any training

def test_unwritable_out_is_one_line_before_any_work(demo, user_data, tmp_path):
    "An --out that cannot be a folder: one line on stderr, exit 2, nothing trained or loaded (issue 17: a traceback and exit 1)"
    (tmp_path/'file').write_text('x')
    out, _ = demo
    for args in (['demo', '--epochs', '1'], ['show', out/'learner.pkl', '--data', user_data/'X.npy']):
        for bad in (tmp_path/'file', tmp_path/'file'/'sub'):
            p = run(*args, '--out', bad)
            assert p.returncode == 2 and p.stderr.startswith(f'tsai-attnviz: error: --out {bad}: ') and 'folder' in p.stderr, p.stderr
            assert 'Traceback' not in p.stderr and p.stderr.strip().count('\n') == 0 and 'Trained' not in p.stdout, p.stderr

PROBE = """
import sys
from tsai_attnviz.cli import main
try: main(sys.argv[1:])
except SystemExit as e: print(e.code, sorted(m for m in ('torch', 'tsai', 'fastai') if m in sys.modules))
"""

def test_options_and_paths_checked_before_torch(tmp_path):
    "Each bad option or path is refused before torch, tsai or fastai is imported: a typo costs no import (12 s and 1 GB)"
    (tmp_path/'file').write_text('x')
    user_data = tmp_path; np.save(tmp_path/'X.npy', np.ones((6, 6, 100), dtype='float32'))
    np.save(tmp_path/'nan.npy', np.full((2, 6, 100), np.nan)); np.save(tmp_path/'2d.npy', np.ones((2, 100)))
    cases = [(['demo', '--dataset', 'ECG200'], 'is not bundled'), (['demo', '--arch', 'ResNet'], 'is not one the demo builds'),
             (['demo', '--epochs', '0'], '--epochs 0'), (['demo', '--head', '-1'], '--head -1'),
             (['demo', '--out', tmp_path/'file'/'x'], '--out'), (['show', tmp_path/'none.pkl', '--data', user_data/'X.npy'], 'no learner at'),
             (['show', tmp_path/'file', '--data', tmp_path/'none.npy'], '--data: no file at'),
             (['show', tmp_path/'file', '--data', tmp_path/'nan.npy'], '--data has 1200 NaN or inf values'),
             (['show', tmp_path/'file', '--data', tmp_path/'2d.npy'], '--data has shape [2, 100]'),
             (['show', tmp_path/'file', '--data', user_data/'X.npy', '--idxs', '6'], '--idxs [6] out of range: --data has 6 samples (0..5)'),
             (['show', tmp_path/'file', '--data', user_data/'X.npy', '--out', tmp_path/'file'], 'is a file, not a folder')]
    for argv, msg in cases:
        p = subprocess.run([sys.executable, '-c', PROBE, *map(str, argv)], capture_output=True, text=True, timeout=120)
        assert p.stdout.strip() == '2 []' and msg in p.stderr, (argv, p.stdout, p.stderr)

def test_every_option_says_its_default():
    "`demo -h` and `show -h`: every option has a help text, and it gives the default (or says it is required)"
    from tsai_attnviz.cli import _parser, _Help
    sub = next(a for a in _parser()._actions if a.dest == 'cmd')
    for cmd, q in sub.choices.items():
        fmt = _Help(prog=cmd)
        for a in q._actions:
            if a.dest == 'help': continue
            h = fmt._get_help_string(a)
            assert h and (not a.option_strings or 'default' in h or a.required and 'required' in h), (cmd, a.dest, h)
    show = sub.choices['show']
    fast = next(a for a in show._actions if a.dest == 'fast').help
    assert 'train' not in fast, fast  # show trains nothing

@pytest.fixture(scope='module')
def recorded(demo, bm_data, tmp_path_factory):
    "`record` of BasicMotions' 40 validation items through the demo's exported learner, with their labels and class means"
    out, _ = demo
    d = tmp_path_factory.mktemp('record')
    X, y, splits = bm_data
    np.save(d/'X.npy', X[splits[1]]); np.save(d/'y.npy', y[splits[1]])
    p = run('record', out/'learner.pkl', '--data', d/'X.npy', '--y', d/'y.npy', '--out', d/'rec', '--max-len', '32',
            '--aggregate', 'class', '--bs', '16')
    return d, p

def test_record_streams_a_dataset_to_disk(recorded, bm_data):
    d, p = recorded
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'Recorded 40 items (40 records, maps 8×25×25 in float16)' in p.stdout, p.stdout
    assert [l.strip() for l in p.stdout.splitlines() if l.strip().startswith('batch ')] == ['batch 1/3', 'batch 2/3', 'batch 3/3']
    assert '\r' not in p.stdout + p.stderr and '█' not in p.stdout + p.stderr  # a pipe: lines, no progress bar's redraws
    r = AttnRecording.open(d/'rec')
    X, y, splits = bm_data
    assert r.idxs == list(range(40)) and r.weights.dtype == torch.float16
    assert torch.equal(torch.stack([x['input'] for x in r.records]), torch.tensor(X[splits[1]]))  # no batch tfms in the demo
    assert [r.meta['vocab'][t] for t in r.targets] == list(y[splits[1]])
    assert r.group_keys == ['Badminton', 'Running', 'Standing', 'Walking']
    assert sum(r.aggregates['class'][c][1] for c in r.group_keys) == 40

def test_show_and_report_draw_a_recording(recorded, tmp_path):
    d, _ = recorded
    p = run('show', d/'rec', '--idxs', '3', '31', '--head', '2', '--out', tmp_path/'figs')
    assert p.returncode == 0, p.stderr[-2000:]
    for f in ['attention_grid.png', 'attention_head2.png', 'attention_class.png', 'attention_series_idx31.png', 'attention_report.html']:
        assert (tmp_path/'figs'/f).stat().st_size > 1000, f
        assert str(tmp_path/'figs'/f) in p.stdout, f
    q = run('report', d/'rec', '--idxs', '5', '--out', tmp_path/'rep')
    assert q.returncode == 0 and (tmp_path/'rep'/'attention_report.html').stat().st_size > 10_000, q.stderr[-2000:]

@pytest.mark.parametrize('args,msg', [(['show', '{rec}', '--idxs', '40'], '--idxs [40]: not in {rec}, which holds 40 items: dataset indices 0..39'),
                                      (['show', '{rec}', '--head', '8'], '--head 8 is not recorded: heads are [0, 1, 2, 3, 4, 5, 6, 7]'),
                                      (['show', '{rec}', '--data', '{X}'], 'is a recording, which holds its data'),
                                      (['record', '{pkl}', '--data', '{X}', '--out', '{rec}'], 'already holds a recording'),
                                      (['record', '{pkl}', '--data', '{X}', '--aggregate', 'bins'], '--aggregate bins groups items by'),
                                      (['record', '{pkl}', '--data', '{X}', '--bs', '0'], '--bs 0: use a positive whole number'),
                                      (['show', '{empty}'], 'is not a recording: it holds no shard')])
def test_record_show_bad_input(recorded, demo, args, msg, tmp_path):
    d, _ = recorded
    (tmp_path/'empty').mkdir()
    fill = dict(rec=d/'rec', X=d/'X.npy', pkl=demo[0]/'learner.pkl', empty=tmp_path/'empty')
    p = run(*[a.format(**fill) for a in args])
    assert p.returncode == 2 and msg.format(**fill) in p.stderr and 'Traceback' not in p.stderr and p.stderr.strip().count('\n') == 0, p.stderr
