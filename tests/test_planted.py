"""The planted ground truth (tsai_attnviz.explain.planted) against a model that reads only the planted steps: occlusion, and
Captum's feature ablation and integrated gradients, must find them; the scores (faithfulness.py) rank them."""
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
import pytest
from tsai_attnviz.explain.planted import planted_motifs, motif
from tsai_attnviz.explain.faithfulness import average_precision, precision_at_k
from tsai_attnviz.explain.relevance import model_relevance
from tsai_attnviz.explain.attributions import captum_relevance

class MatchedFilter(nn.Module):
    "Class k's logit: the largest correlation of the relevant variables with class k's motif (reads only the motif's window)"
    def __init__(self, n_classes, length, relevant):
        super().__init__()
        self.relevant = list(relevant)
        self.register_buffer('w', torch.stack([torch.as_tensor(motif(k, length)) for k in range(n_classes)])[:, None])
    def forward(self, x):                                                    # [n, c_in, L] -> [n, n_classes]
        s = x[:, self.relevant].sum(1, keepdim=True)                          # [n, 1, L]
        return F.conv1d(s, self.w).amax(-1) / 10

@pytest.fixture(scope='module')
def planted():
    X, y, mask = planted_motifs(n=24, c_in=3, seq_len=120, motif_len=16, relevant=(0, 1), seed=3)
    return torch.as_tensor(X), y, mask, MatchedFilter(2, 16, (0, 1)).eval()

def test_the_model_reads_the_motif(planted):
    X, y, mask, m = planted
    assert (m(X).argmax(-1).numpy() == y).mean() > 0.9                       # the classes are decidable from the motif

@pytest.mark.parametrize('method', ['occlusion', 'feature_ablation', 'integrated_gradients'])
def test_planted_steps_are_recovered(planted, method):
    X, y, mask, m = planted
    if method == 'occlusion': rel = model_relevance(m, X, 'occlusion', window=8, stride=2)
    elif method == 'feature_ablation':   # Captum: time steps ablated in windows of 8 steps, every variable together
        fm = (torch.arange(120) // 8).expand(1, 3, 120)
        rel = captum_relevance(m, X, 'feature_ablation', feature_mask=fm)
    else: rel = np.abs(captum_relevance(m, X, 'integrated_gradients'))
    ap, p_at_k = average_precision(rel, mask), precision_at_k(rel, mask)
    rnd = average_precision(np.random.default_rng(0).random(rel.shape), mask)
    assert p_at_k.mean() > 0.6, p_at_k                                         # most of the top-16 steps are planted
    assert ap.mean() > 2 * rnd.mean(), (ap.mean(), rnd.mean())                 # far above a random ranking
