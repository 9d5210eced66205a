"""The PigCVP demo (`tsai-attnviz demo --dataset PigCVP`) trained with fused attention: time, peak RSS, accuracy, maps.

Run: python bench/pigcvp_fast.py [--epochs 1] [--bs 16] [--stock-steps 4 8]

Trains ConvTranPlus as the demo does (seed 42, batch 16, fit_one_cycle at 1e-3; seq_len 2000, 52 classes) with
`fast_attention(learn.model)`, then records one validation item per class for the first 6 classes at 256 x 256 through
the fused layers and through the exact ones, and compares the recordings. `--stock-steps` times a few training steps of
the stock model at the given batch sizes (a stock epoch at batch 16 takes minutes and about 10 GB), from which a stock
epoch is estimated: time and memory grow linearly with the batch at this length. Each run is its own process; peak RSS
is counted from just before training (see bench/record_overhead.py).
"""
import argparse, copy, json, os, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record_overhead import _reset_peak, _peak_rss

def _learner(bs, seed=42):
    import warnings; warnings.filterwarnings('ignore')
    from tsai.basics import TSClassifier, TSClassification, accuracy, set_seed
    from tsai.models.ConvTranPlus import ConvTranPlus
    from tsai_attnviz.cli import load_dataset
    X, y, splits = load_dataset('PigCVP')
    set_seed(seed, reproducible=True)
    learn = TSClassifier(X, y, splits=splits, arch=ConvTranPlus, bs=bs, tfms=[None, TSClassification()],
                         batch_tfms=None, metrics=accuracy, verbose=False, seed=seed)
    return learn, y, splits

def fast_run(epochs, bs):
    "Train with fused attention; record through fused and exact layers; print time, peak RSS, accuracy and map differences"
    import numpy as np, torch
    from tsai_attnviz.all import fast_attention, exact_attention, AttnRecorder
    learn, y, splits = _learner(bs)
    fast_attention(learn.model)  # what `demo --fast` calls before training
    reset = _reset_peak()
    t = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 1e-3)
    train_s, peak = time.perf_counter() - t, _peak_rss(reset)
    with learn.no_bar(): acc = float(learn.validate()[1])
    yv = np.asarray(y)[splits[1]]
    idxs = [int(np.flatnonzero(yv == c)[0]) for c in np.unique(yv)][:6]  # as the demo picks them
    recs = {}
    for name, model in [('fast', learn.model), ('exact', exact_attention(copy.deepcopy(learn.model)))]:
        learn.model = model
        rec = AttnRecorder(idxs=idxs, max_len=256, aggregate='mean', stats=True)
        t = time.perf_counter()
        with learn.no_bar(): learn.get_preds(cbs=[rec], reorder=False)
        recs[name] = rec.recording, time.perf_counter() - t
    (a, ta), (b, tb) = recs['exact'], recs['fast']
    rel = lambda x, y: ((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
    diffs = {k: rel(b._stack(k), a._stack(k)) for k in ('weights', 'key_attn', 'entropy', 'stats')}
    diffs['mean_map'] = rel(b.mean_map(), a.mean_map())
    print(json.dumps(dict(run='fast', epochs=epochs, bs=bs, train_s=train_s, s_per_epoch=train_s / epochs, peak_rss=peak,
                          accuracy=acc, records=len(b), record_s_fast=tb, record_s_exact=ta, map_diffs=diffs)))

def stock_steps(bs, steps=3):
    "A few stock training steps at batch `bs`: seconds a step (after the first) and peak RSS"
    import torch
    from fastai.callback.core import Callback, CancelFitException
    learn, *_ = _learner(bs)
    times = []
    class Steps(Callback):
        def before_batch(self): self.t = time.perf_counter()
        def after_step(self):
            times.append(time.perf_counter() - self.t)
            if len(times) == steps: raise CancelFitException()
    reset = _reset_peak()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[Steps()])
    n_train = len(learn.dls.train.dataset)
    print(json.dumps(dict(run='stock', bs=bs, s_per_step=sorted(times[1:])[len(times[1:]) // 2], peak_rss=_peak_rss(reset),
                          steps_per_epoch=n_train // bs)))

def run(*args):
    p = subprocess.run([sys.executable, __file__, '--worker', *map(str, args)], capture_output=True, text=True)
    if p.returncode: raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=1)
    ap.add_argument('--bs', type=int, default=16)
    ap.add_argument('--stock-steps', type=int, nargs='*', default=[4, 8])
    ap.add_argument('--worker', nargs='+')
    a = ap.parse_args()
    if a.worker:
        return fast_run(int(a.worker[1]), int(a.worker[2])) if a.worker[0] == 'fast' else stock_steps(int(a.worker[1]))
    f = run('fast', a.epochs, a.bs)
    print(f"fused attention, batch {a.bs}: {f['epochs']} epoch(s) in {f['train_s']:.0f} s ({f['s_per_epoch']:.0f} s an epoch), "
          f"peak RSS {f['peak_rss'] / 2**30:.2f} GB, valid accuracy {f['accuracy']:.3f}")
    print(f"recording {f['records']} items at 256 x 256 (with statistics and the mean map): {f['record_s_fast']:.1f} s "
          f"through fused layers, {f['record_s_exact']:.1f} s through exact layers; fused vs exact, relative to scale: "
          + ', '.join(f"{k} {v:.1e}" for k, v in f['map_diffs'].items()))
    for bs in a.stock_steps:
        s = run('stock', bs)
        print(f"stock, batch {bs}: {s['s_per_step']:.2f} s a step, peak RSS {s['peak_rss'] / 2**30:.2f} GB; "
              f"an epoch at this batch about {s['s_per_step'] * s['steps_per_epoch']:.0f} s")

if __name__ == '__main__': main()
