"Issue 17 §3: an exported Learner holds nothing of tsai_attnviz (no recorder to shadow a new one, no swapped layer, no hook)."
import os, shutil, subprocess, sys, textwrap, warnings
from pathlib import Path
import numpy as np, pytest, torch
from fastai.learner import load_learner
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.all import *
from conftest import make_learner

EXE = shutil.which('tsai-attnviz') or str(Path(sys.executable).parent/'tsai-attnviz')
TESTS = Path(__file__).parent

def _env(): return {**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONPATH': os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get('PYTHONPATH', '')])}

@pytest.fixture(scope='module')
def exported(bm_data, tmp_path_factory):
    "A Learner exported as a notebook leaves it: two recorders attached, the layer swapped by hand (kept weights), a statistics hook"
    X, y, splits = bm_data
    d = tmp_path_factory.mktemp('export')
    learn = make_learner(X, y, splits)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    a, b = AttnRecorder(idxs=[3]), AttnRecorder(idxs=[5])
    for r in (a, b):  # each records its own pass, then both stay attached
        with learn.no_bar(): learn.get_preds(cbs=[r])
    learn.add_cbs([a, b])
    swap_attention(learn.model)  # the twin keeps each forward's weights, which the hook reads
    layer = learn.model.backbone.attention_layer
    hook = AttnStatsHook()
    h = layer.register_forward_hook(hook)
    assert type(layer).__module__.startswith('tsai_attnviz')  # what the export must not carry
    cbs_before, types_before = list(learn.cbs), type(layer)
    learn.export(d/'learner.pkl')
    np.save(d/'X.npy', X[splits[1]])
    return learn, d, dict(cbs=cbs_before, layer_type=types_before, hook=(h, hook), recorders=(a, b))

def test_export_holds_no_tsai_attnviz(exported):
    learn, d, _ = exported
    assert b'tsai_attnviz' not in (d/'learner.pkl').read_bytes()

def test_the_learner_is_left_as_it_was(exported):
    "Exporting changes nothing in the Learner: its callbacks (in order), their recordings, the swapped layer and the hook stay"
    learn, d, was = exported
    assert list(learn.cbs) == was['cbs']
    a, b = was['recorders']
    assert a.learn is learn and b.learn is learn and learn.attn_recorder in (a, b)
    assert a.recording.idxs == [3] and b.recording.idxs == [5]
    layer = learn.model.backbone.attention_layer
    assert type(layer) is was['layer_type']
    h, hook = was['hook']
    assert list(layer._forward_hooks.values()) == [hook]
    n = len(hook.stats)
    learn.remove_cb(a)
    with learn.no_bar(): learn.get_preds()  # the recorder and the hook still work
    assert b.recording.idxs == [5] and len(hook.stats) > n
    h.remove()

def test_loaded_learner_in_a_new_process(exported):
    "load_learner in a fresh interpreter: no tsai_attnviz callback or class; a new recorder records and show_attention draws"
    learn, d, _ = exported
    code = textwrap.dedent(f"""
        import warnings, numpy as np, torch
        warnings.simplefilter('ignore')
        from fastai.learner import load_learner
        learn = load_learner({str(d/'learner.pkl')!r})
        import sys
        assert not any(m.startswith('tsai_attnviz') for m in sys.modules), 'loading needed tsai_attnviz'
        def ours(o): return any(c.__module__.startswith('tsai_attnviz') for c in type(o).__mro__)
        assert not [type(c).__name__ for c in learn.cbs if ours(c)], [type(c).__name__ for c in learn.cbs]
        assert not [type(m).__name__ for m in learn.model.modules() if ours(m)]
        assert not [h for m in learn.model.modules() for h in m._forward_hooks.values()]
        from tsai.inference import get_X_preds  # noqa: F401 (tsai's Learner.get_X_preds)
        from tsai_attnviz.all import AttnRecorder
        import tsai_attnviz.show.learner  # noqa: F401
        from conftest import stock_effective_attention
        X = np.load({str(d/'X.npy')!r})
        learn.add_cb(AttnRecorder(idxs=[3]))
        learn.get_X_preds(X)
        fig = learn.show_attention(idx=3)
        rec = learn.attn_recorder.recording
        assert rec.idxs == [3], rec.idxs
        want = stock_effective_attention(learn.model, torch.tensor(X[3:4]))[0]  # the stock layer's map of item 3, computed by hand
        got = rec.records[0]['weights']
        # batch of 40 recorded, batch of 1 recomputed: the same maths, kernels may differ in the last bits
        assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=0), (got - want).abs().max()
        print('OK', len(fig.axes))
    """)
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'OK' in p.stdout

def test_cli_show_on_the_export(exported, tmp_path):
    learn, d, _ = exported
    p = subprocess.run([EXE, 'show', d/'learner.pkl', '--data', d/'X.npy', '--idxs', '3', '--out', tmp_path, '--no-html'],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert AttnRecording.load(tmp_path/'recording.npz').idxs == [3]
    assert (tmp_path/'attention_grid.png').stat().st_size > 1000

def test_export_of_fused_layers(bm_data, tmp_path):
    "fast_attention: the export holds tsai's stock layers (it loads without tsai_attnviz, the same weights); the Learner keeps its fused layers"
    X, y, splits = bm_data
    learn = make_learner(X, y, splits)
    fast_attention(learn.model)
    fused = type(learn.model.backbone.attention_layer)
    with pytest.warns(UserWarning, match='fast_attention'): learn.export(tmp_path/'fused.pkl')
    assert type(learn.model.backbone.attention_layer) is fused
    assert b'tsai_attnviz' not in (tmp_path/'fused.pkl').read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = load_learner(tmp_path/'fused.pkl')
    a = loaded.model.backbone.attention_layer
    assert type(a) is next(c for c in fused.__mro__ if c.__module__.startswith('tsai.'))  # the stock class it fuses (its tsai base)
    assert type(a).__module__.startswith('tsai.')
    x = torch.tensor(X[splits[1][:4]])
    learn.model.eval(); loaded.model.eval()
    with torch.no_grad(): want, got = learn.model.cpu()(x), loaded.model(x)
    # the fused kernel and the stock product sum in a different order: a tolerance relative to the logits' scale
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)
