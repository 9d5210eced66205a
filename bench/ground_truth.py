"""Relevance against a planted ground truth, with ROAD and Captum's metrics: which method finds the steps that decide.

A synthetic set (tsai_attnviz.explain.planted: each item's class set by a motif planted at a random window of 2 of 3
variables, in noise) is learnt by ConvTranPlus (tsai's defaults: d_model=16, 8 heads, eRPE: the users' shape at a length
that trains in minutes), TSTPlus and PatchTST (a forecaster in tsai: here its per-variable outputs averaged into class
logits). For every validation item and relevance method (the attention-based ones, occlusion, and Captum's integrated
gradients, saliency, input × gradient, gradient SHAP and feature ablation):

- AUPR and precision at the motif's length of the ranking against the planted steps (random: the floor);
- ROAD (noisy linear imputation): the probability of the predicted class after removing 10..50% of the steps, most
  relevant first (MoRF, lower = more faithful) and least relevant first (LeRF, higher = more faithful);
- Captum's infidelity (lower is better) and sensitivity_max (lower is more stable), on the first items;
- the time per item;
- a sanity check (Adebayo et al. 2018): Spearman's rank correlation between the relevance of the trained model and of the
  same model with every weight re-drawn (cascading from the output layer): near 1 means the method ignores the model.

    python bench/ground_truth.py --quick     # minutes on 2 CPU cores
    python bench/ground_truth.py             # the full table
"""
import argparse, os, sys, time, json, warnings, copy
os.environ.setdefault('MPLBACKEND', 'Agg')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings('ignore')
import numpy as np
import torch, torch.nn as nn
from fastai.callback.core import Callback, CancelValidException
from tsai.basics import TSClassifier, TSClassification, set_seed, get_splits
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai.models.TSTPlus import TSTPlus
from tsai.models.PatchTST import PatchTST
from tsai_attnviz.explain.planted import planted_motifs
from tsai_attnviz.explain.faithfulness import average_precision, precision_at_k, road
from tsai_attnviz.explain.relevance import model_relevance
from tsai_attnviz.explain.attributions import captum_relevance, CAPTUM_METHODS
from tsai_attnviz.arch import attention_layers

class _NoValid(Callback):
    def before_validate(self): raise CancelValidException()

class PatchTSTClassifier(nn.Module):
    "PatchTST's per-variable outputs [bs, c_in, n_classes], averaged over the variables into class logits"
    def __init__(self, c_in, c_out, seq_len, pred_dim=None, **kw):  # tsai's build_ts_model passes pred_dim=None
        super().__init__(); self.m = PatchTST(c_in, c_in, seq_len, pred_dim=c_out, **kw)
    def forward(self, x): return self.m(x).mean(1)

MODELS = dict(ConvTranPlus=(ConvTranPlus, {}),  # tsai's defaults: d_model=16, 8 heads, tAPE + eRPE
              TSTPlus=(TSTPlus, dict(d_model=32, n_heads=4, n_layers=2, d_ff=64)),
              PatchTST=(PatchTSTClassifier, dict(d_model=32, n_heads=4, n_layers=2, d_ff=64, patch_len=8, stride=4, revin=False)))

def attention_methods(model):
    eRPE = any(hasattr(m, 'relative_bias_table') for m in model.modules())
    out = []
    for m in ('attention', 'value_norm', 'grad_attention', 'rollout', 'grad_rollout'):
        out.append((m, dict(method=m)))
        if eRPE: out.append((f'{m}·softmax', dict(method=m, part='softmax')))
    return out

def relevance_fns(model, L, motif_len):
    "label -> f(x) [n, L]: every method, on the model as it is"
    fns = {lab: (lambda x, kw=kw: model_relevance(model, x, **kw)) for lab, kw in attention_methods(model)}
    fns['occlusion'] = lambda x: model_relevance(model, x, 'occlusion', window=motif_len // 2, stride=max(1, motif_len // 4))
    fm = (torch.arange(L) // max(1, motif_len // 2))[None, None]  # feature ablation: windows of half a motif, every variable
    for m in CAPTUM_METHODS:
        kw = dict(feature_mask=fm.expand(1, 3, L)) if m == 'feature_ablation' else {}
        fns[m] = lambda x, m=m, kw=kw: np.abs(captum_relevance(model, x, m, **kw)) if m != 'feature_ablation' else captum_relevance(model, x, m, **kw)
    return fns

def randomized(model):
    "The model with every weight re-drawn, cascading from the output layer (all layers here: the full cascade's end)"
    m = copy.deepcopy(model)
    torch.manual_seed(123)
    for mod in reversed(list(m.modules())):
        if hasattr(mod, 'reset_parameters') and mod is not m: mod.reset_parameters()
    return m

def spearman(a, b):
    ra, rb = a.argsort(-1).argsort(-1).astype(float), b.argsort(-1).argsort(-1).astype(float)
    ra -= ra.mean(-1, keepdims=True); rb -= rb.mean(-1, keepdims=True)
    return float(((ra * rb).sum(-1) / np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1) + 1e-12)).mean())

def run(quick, names, n, seq_len, motif_len, epochs, out=None):
    X, y, mask = planted_motifs(n=n, c_in=3, seq_len=seq_len, motif_len=motif_len, relevant=(0, 1), seed=0)
    splits = get_splits(y, valid_size=0.25, random_state=0, shuffle=True, show_plot=False, stratify=True)
    vi = np.asarray(splits[1])[:16 if quick else None]
    x, m = torch.as_tensor(X[vi]), mask[vi]
    rows, t_all = [], time.time()
    for name in names:
        arch, cfg = MODELS[name]
        set_seed(0, reproducible=True); t0 = time.time()
        learn = TSClassifier(X, y, splits=splits, arch=arch, arch_config=cfg, bs=32, tfms=[None, TSClassification()],
                             verbose=False, seed=0)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3, cbs=_NoValid())
        model = learn.model.eval()
        with learn.no_bar(): p, t = learn.get_preds()[:2]
        acc, t_train = (p.argmax(1) == t).float().mean().item(), time.time() - t0
        print(f"# {name}: accuracy {acc:.3f} on {len(splits[1])} validation items, trained {epochs} epochs in {t_train:.0f} s", flush=True)
        fns, fns_rnd = relevance_fns(model, seq_len, motif_len), relevance_fns(randomized(model), seq_len, motif_len)
        res = {}
        rng = np.random.default_rng(0)
        rnd = rng.random(m.shape)
        res['random'] = dict(aupr=float(average_precision(rnd, m).mean()), p_at_k=float(precision_at_k(rnd, m).mean()),
                             morf=float(road(model, x, rnd, order='morf').mean()), lerf=float(road(model, x, rnd, order='lerf').mean()))
        for lab, f in fns.items():
            t1 = time.time()
            try: rel = f(x)
            except (ValueError, RuntimeError) as e: print(f"# {name} {lab}: {e}", flush=True); continue
            dt = (time.time() - t1) / len(x)
            r = dict(aupr=float(average_precision(rel, m).mean()), p_at_k=float(precision_at_k(rel, m).mean()),
                     morf=float(road(model, x, rel, order='morf').mean()), lerf=float(road(model, x, rel, order='lerf').mean()),
                     s_per_item=dt)
            try: r['sanity_spearman'] = spearman(rel, fns_rnd[lab](x))
            except (ValueError, RuntimeError): pass
            if not quick:
                from captum.metrics import infidelity
                k = min(8, len(x))
                def perturb(inp): noise = 0.1 * torch.randn_like(inp); return noise, inp - noise
                attr = torch.as_tensor(rel[:k], dtype=torch.float32)[:, None].expand(-1, 3, -1) / 3
                with torch.no_grad(): c = model(x[:k]).argmax(-1)
                r['infidelity'] = float(infidelity(model, perturb, x[:k], attr, target=c, n_perturb_samples=10).mean())
            res[lab] = r
        rows.append(dict(model=name, acc=acc, n_items=len(x), seq_len=seq_len, train_s=t_train, res=res))
    table(rows)
    print(f"# total {time.time() - t_all:.0f} s", flush=True)
    if out: json.dump(rows, open(out, 'w'), indent=1)
    return rows

def table(rows):
    cols = ['aupr', 'p_at_k', 'morf', 'lerf', 'infidelity', 'sanity_spearman', 's_per_item']
    print("\nAUPR, precision at the motif's length (planted steps; higher is better); ROAD MoRF (lower is better) and LeRF "
          "(higher is better): mean probability of the predicted class over 10..50% removed; infidelity (lower is better); "
          "sanity: Spearman correlation with a randomized model (near 1: the method ignores the weights); seconds per item")
    print(f"{'model':<13}{'method':<24}" + ''.join(f"{c:>16}" for c in cols))
    for r in rows:
        for lab, v in r['res'].items():
            print(f"{r['model']:<13}{lab:<24}" + ''.join(f"{v[c]:>16.4f}" if c in v else f"{'':>16}" for c in cols))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='200 items, 30 epochs, 16 validation items scored, no infidelity')
    p.add_argument('--models', default=','.join(MODELS))
    p.add_argument('--seq-len', type=int, default=200)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = a.models.split(',')
    if bad := [m for m in names if m not in MODELS]: p.error(f"--models: {bad} unknown; use {', '.join(MODELS)}")
    run(a.quick, names, 200 if a.quick else 600, a.seq_len, 20, 30 if a.quick else 60, a.out)

if __name__ == '__main__': main()
