"""Dataset-scale recording throughput at the users' configuration: samples/s of stock prediction, of the exact swapped
layers + AttnRecorder and of the fused layers + AttnRecorder (every sample reduced to 256 x 256, class means).

Run: python bench/record_throughput.py [--seq-len 3000] [--bs 4] [--batches 2] [--profile] [--device cpu]
         [--before DIR]  # also the fused path of the package checked out in DIR (e.g. `git worktree add DIR <commit>`)

ConvTranPlus(c_in=3, c_out=2, seq_len, d_model=16, n_heads=8, eRPE), untrained (attention costs do not depend on the
weights). Each configuration runs in its own process: one warm-up batch, then `--batches` timed batches through
`learn.get_preds`. Ratios are time per sample against the stock prediction measured in the same run. `--profile`
adds torch.profiler's top operators of the fused path on one batch.
"""
import argparse, json, os, subprocess, sys, time

CONFIGS = {'stock': 'stock predict',
           'before': 'fast_attention + AttnRecorder, before the change (--before)',
           'exact': 'exact swapped layers + AttnRecorder(every sample @256^2, class means)',
           'fused': 'fast_attention + AttnRecorder(every sample @256^2, class means)'}

def _learner(seq_len, n, bs, device):
    import numpy as np, torch
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from tsai.models.ConvTranPlus import ConvTranPlus
    torch.manual_seed(0)
    X = torch.randn(n, 3, seq_len)
    y = torch.arange(n) % 2
    model = ConvTranPlus(3, 2, seq_len, d_model=16, n_heads=8, rel_pos_encode='eRPE')
    ds = [(X[i], y[i]) for i in range(n)]
    dl = DataLoader(ds, bs=bs, shuffle=False, device=device)
    return Learner(DataLoaders(dl, dl, device=device), model.to(device), loss_func=torch.nn.CrossEntropyLoss()), dl

def worker(kind, seq_len, bs, n_batches, device, profile):
    "One process: time `n_batches` batches after a warm-up one; print a JSON line"
    import warnings; warnings.filterwarnings('ignore')
    import torch
    from tsai_attnviz.record.recorder import AttnRecorder
    from tsai_attnviz.arch.convtranplus_fast import fast_attention
    learn, _ = _learner(seq_len, bs * n_batches, bs, device)
    if kind == 'fused': fast_attention(learn.model)
    rec = lambda: [AttnRecorder(batches=None, max_len=256, aggregate='class')] if kind != 'stock' else []
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    _, warm = _learner(seq_len, bs, bs, device)
    with learn.no_bar(): learn.get_preds(dl=warm, cbs=rec())
    sync(); t, c = time.perf_counter(), time.process_time()
    with learn.no_bar(): learn.get_preds(dl=learn.dls.valid, cbs=rec())
    sync(); dt, dc = time.perf_counter() - t, time.process_time() - c
    n = bs * n_batches
    # CPU seconds too: on shared cores, wall time depends on what else runs; the process's CPU time much less
    out = dict(kind=kind, s_per_sample=dt / n, samples_per_s=n / dt, cpu_s_per_sample=dc / n)
    if profile:
        from torch.profiler import profile as prof, ProfilerActivity
        with prof(activities=[ProfilerActivity.CPU]) as p:
            with learn.no_bar(): learn.get_preds(dl=warm, cbs=rec())
        out['profile'] = p.key_averages().table(sort_by='self_cpu_time_total', row_limit=12)
    print(json.dumps(out))

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seq-len', type=int, default=3000)
    ap.add_argument('--bs', type=int, default=4)
    ap.add_argument('--batches', type=int, default=2)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--profile', action='store_true')
    ap.add_argument('--kinds', nargs='+', default=list(CONFIGS))
    ap.add_argument('--before', default=None, help='a checkout of the package before the change: its fused path too')
    ap.add_argument('--worker', default=None)
    a = ap.parse_args()
    if a.worker: return worker(a.worker, a.seq_len, a.bs, a.batches, a.device, a.profile)
    res, here = {}, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [(k, k, here) for k in a.kinds] + ([('fused', 'before', os.path.abspath(a.before))] if a.before else [])
    for kind, label, root in runs:
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', kind, '--seq-len', str(a.seq_len), '--bs', str(a.bs),
               '--batches', str(a.batches), '--device', a.device] + (['--profile'] if a.profile and kind == 'fused' else [])
        env = dict(os.environ, PYTHONPATH=root)  # the package of this checkout (or of --before), not an installed one
        line = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        res[label] = json.loads(line)
    st = res.get('stock', {}).get('s_per_sample')
    print(f"L={a.seq_len}, batch {a.bs}, device {a.device}; time per sample against stock predict in this run")
    cst = res.get('stock', {}).get('cpu_s_per_sample')
    print(f"{'configuration':<75} {'samples/s':>9} {'x stock':>8} {'CPU s/sample':>12} {'x stock':>8}")
    for kind, r in res.items():
        ratio = f"{r['s_per_sample'] / st:.2f}" if st else '-'
        cratio = f"{r['cpu_s_per_sample'] / cst:.2f}" if cst else '-'
        print(f"{CONFIGS[kind]:<75} {r['samples_per_s']:>9.2f} {ratio:>8} {r['cpu_s_per_sample']:>12.2f} {cratio:>8}")
    for kind, r in res.items():
        if 'profile' in r: print(f"\nprofile, {CONFIGS[kind]} (one batch of {a.bs}):\n{r['profile']}")

if __name__ == '__main__': main()
