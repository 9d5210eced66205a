"Issue 17 §2 / issue 18 'one stream': several consumers of the attention in one pass (recorders, relevance, AttnStatsHook)."
import copy
import numpy as np, pytest, torch
from fastai.callback.core import Callback
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai.models.TransformerModel import TransformerModel
from tsai_attnviz.all import *
from tsai_attnviz.core.stream import AttnConsumer, attached
from conftest import make_learner, stock_effective_attention, no_leftovers

FAMILIES = ['exact', 'fused', 'recomputed']  # ConvTranPlus swapped, ConvTranPlus fast_attention, TransformerModel

@pytest.fixture(scope='module', params=FAMILIES)
def learn(request, bm_data):
    "An untrained learner of each path (the tests compare consumers with each other, not with a trained model)"
    fam = request.param
    learn = make_learner(*bm_data, arch=TransformerModel if fam == 'recomputed' else ConvTranPlus,
                         **(dict(arch_config=dict(d_model=16, n_head=2)) if fam == 'recomputed' else {}))
    if fam == 'fused': fast_attention(learn.model)
    learn.family = fam
    with learn.no_bar(): yield learn
    no_leftovers(exact_attention(learn.model) if fam == 'fused' else learn.model)

def records(rec): return rec.recording.records

def assert_same_records(got, ref):
    "Bitwise: the same batches through the same layers, so the same computation"
    assert len(got) == len(ref) > 0
    for a, b in zip(got, ref):
        assert a.keys() == b.keys()
        for k in a:
            if torch.is_tensor(a[k]): assert torch.equal(a[k], b[k]), k
            else: assert a[k] == b[k], k

def assert_clean(learn):
    "Nothing swapped in by a consumer, nothing subscribed (the fused path keeps its fused classes, which are the user's)"
    for _, m in attention_layers(learn.model):
        assert not type(m).__name__.endswith('_With_Weights'), type(m)
        assert not getattr(m, 'publishing', False) and '_subs' not in m.__dict__ and '_call' not in m.__dict__

def alone(learn, make):
    rec = make()
    learn.get_preds(cbs=[rec])
    return rec

SELECTIONS = [lambda: AttnRecorder(), lambda: AttnRecorder(idxs=[5, 21], max_len=20)]

# -- two recorders ---------------------------------------------------------------------------------------------------------
def test_two_recorders_each_get_what_they_asked_for(learn):
    "The issue's case: before, the first recorder got nothing (0 and 2 records); now each gets what it gets alone"
    ref = [records(alone(learn, s)) for s in SELECTIONS]
    assert len(ref[0]) == 16 * len(attention_layers(learn.model)) and len(ref[1]) == 2 * len(attention_layers(learn.model))
    a, b = (s() for s in SELECTIONS)
    learn.add_cbs([a, b])
    try: learn.get_preds()
    finally: learn.remove_cbs([a, b])
    assert_same_records(records(a), ref[0])
    assert_same_records(records(b), ref[1])
    assert_clean(learn)

def test_two_recorders_in_the_other_order_and_aggregating(learn):
    "Order does not matter; a recorder with mean maps (every row of every batch) and one with a few items"
    ref = [records(alone(learn, s)) for s in (lambda: AttnRecorder(samples=[3]), lambda: AttnRecorder(batches=None, max_len=10, aggregate='mean'))]
    mean_ref = alone(learn, lambda: AttnRecorder(batches=None, max_len=10, aggregate='mean')).recording.aggregates
    a, b = AttnRecorder(samples=[3]), AttnRecorder(batches=None, max_len=10, aggregate='mean')
    learn.get_preds(cbs=[b, a])
    assert_same_records(records(a), ref[0])
    assert_same_records(records(b), ref[1])
    (s1, n1), (s0, n0) = b.recording.aggregates['mean'], mean_ref['mean']  # the running sum of every item's reduced map
    assert n1 == n0 == 40 and torch.equal(s1, s0)
    assert_clean(learn)

# -- a recorder and relevance ----------------------------------------------------------------------------------------------
class RelevanceEachBatch(Callback):
    "Computes relevance of every batch inside the recorder's pass, before the recorder stores the batch's maps (after_pred, order 50 < 60)"
    order = 50
    def __init__(self, method): self.method, self.rel = method, []
    def after_pred(self):
        self.rel.append(model_relevance(self.learn.model, self.xb[0], self.method))

@pytest.mark.parametrize('method', ['attention', 'rollout'])
def test_recorder_during_relevance(learn, method):
    "Relevance's own forwards reach no recorder: the records are those of the recorder alone, relevance is relevance alone"
    ref = records(alone(learn, lambda: AttnRecorder(batches=None, samples=[0, 7])))
    rel_ref = [model_relevance(learn.model, xb, method) for xb, _ in learn.dls.valid]
    assert_clean(learn)
    rec, rc = AttnRecorder(batches=None, samples=[0, 7]), RelevanceEachBatch(method)
    learn.get_preds(cbs=[rec, rc])
    assert_same_records(records(rec), ref)
    assert len(rc.rel) == len(rel_ref) == 3
    for got, exp in zip(rc.rel, rel_ref): assert np.array_equal(got, exp)
    assert_clean(learn)

def test_grad_attention_during_a_recorded_pass(learn):
    "grad_attention (a backward through the maps) inside a recorder's pass: the same relevance, the same records"
    ref = records(alone(learn, lambda: AttnRecorder(samples=[2])))
    rel_ref = [model_relevance(learn.model, xb, 'grad_attention') for xb, _ in learn.dls.valid]
    rec, rc = AttnRecorder(samples=[2]), RelevanceEachBatch('grad_attention')
    learn.get_preds(cbs=[rec, rc])
    assert_same_records(records(rec), ref)
    for got, exp in zip(rc.rel, rel_ref): assert np.array_equal(got, exp)
    assert_clean(learn)

# -- AttnStatsHook and a recorder ------------------------------------------------------------------------------------------
def test_stats_hook_with_a_recorder(learn):
    "AttnStatsHook attached around a recorded pass: its statistics are those of the stock maps, the records those of the recorder alone"
    ref = records(alone(learn, lambda: AttnRecorder(idxs=[4, 30])))
    hook, rec = AttnStatsHook(), AttnRecorder(idxs=[4, 30])
    with attached(learn.model, hook):
        learn.get_preds(cbs=[rec])
        assert all(m.publishing for _, m in attention_layers(learn.model))  # the recorder left, the hook still listens
    assert_same_records(records(rec), ref)
    assert_clean(learn)
    names = [n for n, _ in attention_layers(learn.model)]
    n_batches, H = len(learn.dls.valid), len(set(d['head'] for d in hook.stats))
    assert len(hook.stats) == n_batches * len(names) * H
    assert [d['forward'] for d in hook.stats[::H]] == [b for b in range(n_batches) for _ in names]
    if learn.family == 'recomputed': return  # its stock maps are torch's fused kernel's: tested against need_weights in test_arch_transformer
    for b, (xb, _) in enumerate(learn.dls.valid):  # independent: the stock layer's maps, recomputed outside the package
        w, sm = (stock_effective_attention(exact_attention(copy.deepcopy(learn.model)), xb, part) for part in ('effective', 'softmax'))
        exp = attention_stats(w, sm)
        for got, e in zip(hook.stats[b * H:(b + 1) * H], exp):
            for k in STAT_NAMES:  # sums over rows chunk by chunk vs a mean over the map: a tolerance relative to the value
                assert abs(got[k] - e[k]) <= 1e-5 * max(1., abs(e[k])), (b, k, got[k], e[k])

# -- every way out --------------------------------------------------------------------------------------------------------
class Boom(AttnConsumer):
    "A consumer that fails on its `n`-th chunk"
    def __init__(self, exc, n=3): self.exc, self.n = exc, n
    def receive(self, c):
        self.n -= 1
        if self.n == 0: raise self.exc

class FailAt(Callback):
    "Raises in after_pred of batch 1"
    def __init__(self, exc): self.exc = exc
    def after_pred(self):
        if self.iter == 1: raise self.exc

@pytest.mark.parametrize('exc', [RuntimeError('boom'), KeyboardInterrupt()], ids=['error', 'interrupt'])
def test_nothing_left_when_a_pass_with_several_consumers_raises(learn, exc):
    "A consumer failing mid-pass, or the pass failing, with two recorders and a hook attached: every layer is left clean"
    for make in (lambda: [attached(learn.model, Boom(exc))], lambda: [FailAt(exc)]):
        extra = make()
        a, b = AttnRecorder(), AttnRecorder(idxs=[20])
        with pytest.raises(type(exc)):
            if isinstance(extra[0], Callback): learn.get_preds(cbs=[a, b] + extra)
            else:
                with extra[0], attached(learn.model, AttnStatsHook()): learn.get_preds(cbs=[a, b])
        assert_clean(learn)
    a, b = AttnRecorder(), AttnRecorder(idxs=[5, 21], max_len=20)  # and the next pass records as if nothing had happened
    learn.get_preds(cbs=[a, b])
    assert_same_records(records(b), records(alone(learn, SELECTIONS[1])))

def test_cancel_fit_with_two_recorders(learn):
    "fastai's CancelFitException during a fit that two recorders record: nothing left swapped or subscribed"
    from fastai.callback.core import CancelFitException
    class Cancel(Callback):
        order = 99
        def after_batch(self):
            if not self.training: raise CancelFitException
    state = copy.deepcopy(learn.model.state_dict())
    a, b = AttnRecorder(), AttnRecorder(idxs=[3])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0, cbs=[a, b, Cancel()])
    learn.model.load_state_dict(state)
    assert_clean(learn)
    assert len(records(a)) == len(attention_layers(learn.model)) * 16 and len(records(b)) == len(attention_layers(learn.model))

def test_overlapping_attachments_restore_only_when_the_last_leaves():
    "The first attachment (which swapped the layer) leaves before the second: the layer stays a twin until the second leaves"
    torch.manual_seed(0)
    m, x = ConvTranPlus(3, 2, 12).eval(), torch.randn(2, 3, 12)
    layer = m.backbone.attention_layer
    stock_cls, a, b = type(layer), AttnStatsHook(), AttnStatsHook()
    first, second = attached(m, a), attached(m, b)
    first.detach()
    assert type(layer).__name__.endswith('_With_Weights') and layer.publishing
    with torch.no_grad(): m(x)
    assert (len(a.stats), len(b.stats)) == (0, 8)
    second.detach()
    assert type(layer) is stock_cls and not any(k in layer.__dict__ for k in ('_subs', '_only', '_call', '_attn_stock', 'keep_weights'))
