"""Relevance at the users' seq_len=3000: time and peak memory of each method for one item, stock and fused layers.

The users' configuration: ConvTranPlus with c_in=3, c_out=1 (regression), seq_len=3000, d_model=16, 8 heads, eRPE, an
untrained model (relevance costs the same trained or not). For each method and each kind of layer (`stock`: tsai's
layers, swapped for the exact twins where a method reads maps; `fused`: after `fast_attention`), one item is explained by
`model_relevance` with its defaults, in a fresh subprocess so that each peak is its own: wall time, and peak RSS above
the process once the model and the item are built (`resource.getrusage` ru_maxrss, less psutil's RSS before the call).
The target (issue 17): one item with `fast_attention` in ≤ 60 s and ≤ 2 GB peak RSS above the model, on 2 cores.

    python bench/relevance_long.py            # the table (a few minutes on 2 cores)
    python bench/relevance_long.py --L 500    # a shorter series, to try it out
"""
import argparse, json, os, subprocess, sys, time

METHODS = ('attention', 'value_norm', 'grad_attention', 'rollout', 'occlusion')
# Captum's, with their defaults; feature_ablation's default ablates each of the 3 × 3000 values alone (9000 forwards an
# item): pass it a feature_mask of windows instead, as bench/faithfulness.py does
CAPTUM = ('integrated_gradients', 'saliency', 'input_x_gradient', 'gradient_shap', 'grad_rollout')
TARGET_S, TARGET_MB = 60, 2048

WORKER = r"""
import gc, json, resource, sys, time
import psutil, torch
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.explain.relevance import model_relevance, _windows
from tsai_attnviz.arch.convtranplus_fast import fast_attention
kind, method, L = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = ConvTranPlus(3, 1, L, d_model=16, n_heads=8).eval()
if kind == 'fused': fast_attention(model)
x = torch.randn(1, 3, L)
gc.collect()
before = psutil.Process().memory_info().rss
t = time.perf_counter()
r = model_relevance(model, x, method, task='regression', progress=False)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KB
ok = bool(torch.isfinite(torch.as_tensor(r)).all()) and r.shape == (1, L)
print(json.dumps(dict(kind=kind, method=method, L=L, s=dt, peak_mb=max(peak - before, 0) / 2**20, ok=ok,
                      windows=len(_windows(L, 0.05, None)) if method == 'occlusion' else None, threads=torch.get_num_threads())))
"""

def run(kind, method, L, timeout):
    "One configuration in a fresh process: its measurements, or why there are none"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       os.environ.get('PYTHONPATH', '')]))
    try: p = subprocess.run([sys.executable, '-c', WORKER, kind, method, str(L)], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired: return dict(kind=kind, method=method, L=L, error=f'over {timeout} s')
    if p.returncode: return dict(kind=kind, method=method, L=L, error=(p.stderr.strip().splitlines() or ['?'])[-1][:80])
    return json.loads(p.stdout.strip().splitlines()[-1])

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--L', type=int, default=3000, help='seq_len (default: 3000, the users\')')
    ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS + CAPTUM, help='methods to run (default: the five above)')
    ap.add_argument('--kinds', nargs='+', default=['stock', 'fused'], choices=('stock', 'fused'), help='layers (default: both)')
    ap.add_argument('--timeout', type=int, default=900, help='seconds one configuration may take (default: 900)')
    a = ap.parse_args()
    rows, t0 = [], time.perf_counter()
    for method in a.methods:
        for kind in a.kinds:
            r = run(kind, method, a.L, a.timeout)
            rows.append(r)
            print(f"  {kind:5} {method:14} " + (f"{r['s']:7.1f} s {r['peak_mb']:8.0f} MB" if 'error' not in r else r['error']), flush=True)
    print(f"\nOne item, ConvTranPlus c_in=3 c_out=1 seq_len={a.L} d_model=16 8 heads eRPE, {rows[0].get('threads', '?')} threads "
          f"(bench {time.perf_counter() - t0:.0f} s):\n")
    print('| method | stock: time | stock: peak RSS | fused: time | fused: peak RSS | fused / stock time | fused: of the target (60 s, 2 GB) |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    by = {(r['kind'], r['method']): r for r in rows}
    none = dict(error='not run')
    for method in a.methods:
        s, f = by.get(('stock', method), none), by.get(('fused', method), none)
        cell = lambda r: (f"{r['s']:.1f} s", f"{r['peak_mb']:.0f} MB") if 'error' not in r else (r['error'], '')
        ratio = f"{f['s'] / s['s']:.2f}×" if 'error' not in s and 'error' not in f else ''
        target = f"{f['s'] / TARGET_S:.2f} · {f['peak_mb'] / TARGET_MB:.2f}" if 'error' not in f else ''
        name = method + (f" ({f['windows']} windows)" if f.get('windows') else '')
        print(f"| {name} | {' | '.join(cell(s))} | {' | '.join(cell(f))} | {ratio} | {target} |")
    bad = [r for r in rows if r.get('kind') == 'fused' and ('error' in r or r['s'] > TARGET_S or r['peak_mb'] > TARGET_MB or not r['ok'])]
    print(f"\nfused: {'every method within' if not bad else 'over'} the target of {TARGET_S} s and {TARGET_MB} MB"
          + ('' if not bad else ': ' + ', '.join(r['method'] for r in bad)))

if __name__ == '__main__': main()
