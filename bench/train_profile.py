"""Where a training step's time goes: stock ConvTranPlus against its fused layers (`fast_attention`), by operator group.

At the users' configuration (ConvTranPlus c_in=3, seq_len=3000, d_model=16, n_heads=8, eRPE), one training step is a
forward, a cross-entropy loss, a backward and an Adam step on a batch of `--bs` items. Each model runs in its own
process: `--warmup` steps, then `--steps` steps timed (the median), then one step under torch.profiler whose operators
(self CPU time, CUDA time on a GPU) are summed into groups: the attention kernel (SDPA, forward and backward), the
attention's recomputation for the backward (checkpoint), eRPE's bias by FFT, matrix products, convolutions, norms, the
optimiser, the rest. Ratios are against the stock step measured in the same run.

Run: python bench/train_profile.py [--seq-len 3000] [--bs 4] [--steps 3] [--device cpu] [--threads N]
"""
import argparse, json, os, subprocess, sys, time

GROUPS = [  # (group, substrings of operator names), first match wins
    ('attention kernel (SDPA fwd + bwd)', ('scaled_dot_product', 'flash_attention', '_efficient_attention', 'sdpa')),
    ('eRPE bias by FFT', ('fft',)),
    ('softmax (stock maps)', ('softmax',)),
    ('matrix products', ('addmm', 'bmm', 'mm', 'matmul', 'linear')),
    ('convolutions', ('conv', 'cudnn_convolution', 'mkldnn_convolution')),
    ('norms', ('batch_norm', 'layer_norm', 'native_batch_norm', 'native_layer_norm')),
    ('optimiser (Adam)', ('_foreach', 'adam', 'lerp', 'addcdiv', 'addcmul')),
    ('copies and reshapes', ('copy_', 'clone', 'contiguous', 'cat', 'pad', 'constant_pad', 'unfold', 'flip', 'to_copy', 'transpose', 'permute')),
]

def _group(name:str)->str:
    n = name.lower()
    for g, keys in GROUPS:
        if any(k in n for k in keys): return g
    return 'the rest'

def worker(kind, seq_len, bs, steps, warmup, device, threads):
    "One process: time training steps of one model, then profile one; print a JSON line"
    import warnings; warnings.filterwarnings('ignore')
    import torch, torch.nn.functional as F
    from torch.profiler import profile, ProfilerActivity
    from tsai.models.ConvTranPlus import ConvTranPlus
    from tsai_attnviz.arch.convtranplus_fast import fast_attention
    if threads: torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ConvTranPlus(3, 2, seq_len, d_model=16, n_heads=8, rel_pos_encode='eRPE').to(device).train()
    if kind == 'fused': fast_attention(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(bs, 3, seq_len, device=device), torch.arange(bs, device=device) % 2
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for _ in range(warmup): step()
    times = []
    for _ in range(steps):
        sync(); t0 = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith('cuda') else [])
    with profile(activities=acts) as prof: step(); sync()
    groups = {}
    for e in prof.key_averages():
        t = (e.self_device_time_total if device.startswith('cuda') else e.self_cpu_time_total) / 1e6
        groups[_group(e.key)] = groups.get(_group(e.key), 0) + t
    bw = sum(e.self_cpu_time_total for e in prof.key_averages() if 'backward' in e.key.lower() or 'Backward' in e.key) / 1e6
    print(json.dumps(dict(kind=kind, step=sorted(times)[len(times) // 2], groups=groups, profiled=sum(groups.values()), backward_ops=bw)))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seq-len', type=int, default=3000)
    p.add_argument('--bs', type=int, default=4)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker: return worker(a.worker, a.seq_len, a.bs, a.steps, a.warmup, a.device, a.threads)
    res = {}
    for kind in ('stock', 'fused'):
        cmd = [sys.executable, __file__, '--worker', kind] + [f'--{k}={v}' for k, v in
               (('seq-len', a.seq_len), ('bs', a.bs), ('steps', a.steps), ('warmup', a.warmup), ('device', a.device), ('threads', a.threads))]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode: sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    s, f = res['stock'], res['fused']
    print(f"ConvTranPlus training step, seq_len={a.seq_len}, batch {a.bs}, {a.device}: stock {s['step']:.2f} s, "
          f"fused {f['step']:.2f} s ({f['step'] / s['step']:.2f}× stock)")
    names = [g for g, _ in GROUPS] + ['the rest']
    print(f"\n| operator group (profiled step) | stock s | fused s | fused share |\n|---|---:|---:|---:|")
    for g in names:
        a_, b_ = s['groups'].get(g, 0), f['groups'].get(g, 0)
        if a_ or b_: print(f"| {g} | {a_:.3f} | {b_:.3f} | {b_ / f['profiled']:.0%} |")
    print(f"| total (profiled) | {s['profiled']:.3f} | {f['profiled']:.3f} | 100% |")

if __name__ == '__main__': main()
