"""AttnRecorder inside a torch.distributed process group: two processes (gloo, CPU, a file:// rendezvous), each a Learner
whose loaders are sharded by fastai's DistributedDL (as fastai's DistributedTrainer does it, without CUDA): the merged
recording on rank 0 against a one-process pass on the same weights."""
import os, time, warnings
from datetime import timedelta
import pytest, torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from fastcore.test import test_eq as _eq, test_close as _near
from fastai.callback.core import Callback
from fastai.distributed import DistributedDL  # needs accelerate
from tsai.basics import TSClassifier, TSClassification, TSStandardize, accuracy, set_seed
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.cli import load_dataset
from tsai_attnviz.record.recorder import AttnRecorder
from tsai_attnviz.record.recording import AttnRecording
import tsai_attnviz.record.store  # AttnRecording.open
from tsai_attnviz.record.distributed import shard_ready

N_VALID, BS, WORLD = 39, 20, 2  # 39 items padded to 40: rank 0 reads 0..19, rank 1 20..38 and item 0 again (padding)
PROBE, IDXS, SPLIT_IDXS = [0, 25], [1, 3], [3, 30]  # IDXS: only in rank 0's shard, so rank 1 records nothing
TIMEOUT = 60  # seconds a collective waits before it fails (gloo): a hang fails the test instead of stalling CI

def _learner(n_valid=N_VALID, bs=BS, ready=True, seed=0):
    X, y, (tr, va) = load_dataset('BasicMotions')
    set_seed(seed, reproducible=True)
    learn = TSClassifier(X, y, splits=(tr, va[:n_valid]), arch=ConvTranPlus, bs=bs, tfms=[None, TSClassification()],
                         batch_tfms=TSStandardize(by_var=True), metrics=accuracy, verbose=False, seed=seed)
    if ready: shard_ready(learn.dls)  # tsai's validation loader reads the indices of its shard
    return learn

class _CPUDistributedDL(DistributedDL):
    "fastai's DistributedDL with its indices broadcast on the CPU (fastai's moves them to CUDA, for nccl)"
    def _broadcast(self, t, rank):
        t = torch.LongTensor(t)
        dist.broadcast(t, rank)
        return t.tolist()

class _Sharded(Callback):
    "What fastai's DistributedTrainer does, without CUDA or accelerate: the model in DDP, the loaders sharded each pass"
    order = 11
    def _wrap(self, dl): return dl if isinstance(dl, DistributedDL) else _CPUDistributedDL(dl)
    def before_fit(self):
        self.learn.model, self.old = DistributedDataParallel(self.learn.model), list(self.dls)
        self.learn.dls.loaders = [self._wrap(dl) for dl in self.dls]
    def before_train(self): self.learn.dl = self._wrap(self.learn.dl)
    def before_validate(self): self.learn.dl = self._wrap(self.learn.dl)
    def after_fit(self): self.learn.model, self.learn.dls.loaders = self.learn.model.module, self.old

def _rec(r): return dict(records=r.records, aggregates=r.aggregates, meta=r.meta, biases=r.biases)

def _worker(rank, init, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))  # what fastai's rank_distrib / num_distrib read
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init}', rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT))
    res, t0 = {}, time.time()
    try:
        learn = _learner()
        learn.add_cb(_Sharded())
        res['weights'] = {k: v.clone() for k, v in learn.model.state_dict().items()}
        with learn.no_bar(), learn.no_logging(), warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            # every item (the padding too, which must be left out), class means
            rec = AttnRecorder(batches=None, aggregate='class')
            preds, _ = learn.get_preds(cbs=rec)
            res['predict'] = dict(_rec(rec.recording), preds=preds)
            # the same pass streamed to disk: a shard per rank in one directory, rank 0's holding every rank's mean maps
            rec = AttnRecorder(batches=None, aggregate='class', path=os.path.join(out, 'disk'))
            learn.get_preds(cbs=rec)
            res['disk_n'] = len(rec.sink)
            # a rank that records nothing
            rec = AttnRecorder(idxs=IDXS, aggregate='mean')
            learn.get_preds(cbs=rec)
            res['nothing'] = _rec(rec.recording)
            # items on both ranks: rank 0, which warns, must not warn of the one on rank 1
            rec = AttnRecorder(idxs=SPLIT_IDXS)
            learn.get_preds(cbs=rec)
            res['both'] = _rec(rec.recording)
            # a 2-epoch fit: the probe, and every validation item of each epoch
            probe, valid = AttnRecorder(every_epoch=True, probe=PROBE), AttnRecorder(batches=None)
            learn.fit(2, 1e-3, cbs=[probe, valid])
            res['fit'] = dict(probe=_rec(probe.recording), valid=_rec(valid.recording),
                              weights={k: v.clone() for k, v in learn.model.state_dict().items()})
        res['warnings'] = [str(x.message) for x in w if 'AttnRecorder' in str(x.message)]
        # a stock tsai loader that would misread the shards (40 items, batches of 32): refused on both ranks
        learn = _learner(n_valid=40, bs=32, ready=False)
        learn.add_cb(_Sharded())
        try:
            with learn.no_bar(), learn.no_logging(): learn.get_preds(cbs=AttnRecorder(batches=None))
            res['refused'] = None
        except ValueError as e: res['refused'] = str(e)
        res['seconds'] = time.time() - t0
    finally:
        torch.save(res, os.path.join(out, f'rank{rank}.pt'))
        dist.destroy_process_group()

@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    "What each of the two ranks recorded"
    d = tmp_path_factory.mktemp('ddp')
    t0 = time.time()
    ctx = mp.spawn(_worker, args=(str(d / 'rendezvous'), str(d)), nprocs=WORLD, join=False)
    while not ctx.join(timeout=5):  # raises with the rank's traceback when a rank fails
        if time.time() - t0 > 4 * TIMEOUT:
            for p in ctx.processes: p.terminate()
            pytest.fail(f"the two ranks did not finish in {4 * TIMEOUT} s: a hang")
    print(f"2 ranks: {time.time() - t0:.1f} s")
    out = [torch.load(d / f'rank{r}.pt', weights_only=False) for r in range(WORLD)]
    for o in out: o['dir'] = d
    return out

def _one_process(weights, **kw):
    "A one-process pass of `AttnRecorder(**kw)` over the stock tsai loader, with `weights`"
    learn = _learner(ready=False)
    learn.model.load_state_dict(weights)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        with learn.no_bar(), learn.no_logging():
            rec = AttnRecorder(**kw)
            preds, _ = learn.get_preds(cbs=rec)
    finally: torch.set_num_threads(n)
    return rec.recording, preds

def _keyed(records):
    "{(dataset index, layer, epoch, split): record}, failing on a duplicate"
    out = {}
    for r in records:
        k = (r['idx'], r['layer'], r['epoch'], r['split'])
        assert k not in out, f"record {k} twice"
        out[k] = r
    return out

def _close(a, b, what):
    scale = max(float(b.abs().max()), 1e-12)
    _near(a.float(), b.float(), eps=1e-6 * scale)

_FIELDS = ('weights', 'key_attn', 'entropy', 'input', 'pred', 'softmax')

def _same_records(got, ref, bitwise=()):
    "Records with the same keys, their arrays bitwise equal for the items in `bitwise` (computed in the same batch), else close"
    g, r = _keyed(got), _keyed(ref)
    _eq(sorted(g, key=str), sorted(r, key=str))
    for k, rr in r.items():
        _eq(g[k]['target'], rr['target'])
        for f in _FIELDS:
            if rr.get(f) is None: _eq(g[k].get(f), None); continue
            if k[0] in bitwise: assert torch.equal(g[k][f], rr[f]), (k, f)
            else: _close(g[k][f], rr[f], (k, f))

def _same_aggregates(got, ref):
    _eq(sorted(got), sorted(ref))
    for kind, v in ref.items():
        pairs = [(got[kind], v)] if kind == 'mean' else [(got[kind][c], v[c]) for c in v]
        if kind != 'mean': _eq(sorted(got[kind]), sorted(v))
        for (s, n), (s0, n0) in pairs: _eq(n, n0); _close(s, s0, kind)

@pytest.mark.bitwise
def test_predict_merged(ranks):
    "get_preds: rank 0 holds every item once, the padding left out; rank 0's batch bitwise as one process's, class means as one pass's"
    r0, r1 = ranks[0]['predict'], ranks[1]['predict']
    ref, preds = _one_process(ranks[0]['weights'], batches=None, aggregate='class')
    _eq(sorted(r['idx'] for r in r0['records']), list(range(N_VALID)))
    _same_records(r0['records'], ref.records, bitwise=range(BS))  # items 0..19: the same batch on rank 0 as in one process
    _same_aggregates(r0['aggregates'], ref.aggregates)
    _eq(sum(n for _, n in r0['aggregates']['class'].values()), N_VALID)  # the padding (item 0 again) counted once
    _eq(r1['records'], []); _eq(r1['aggregates'], {})  # sent to rank 0
    _close(r0['preds'], preds, 'preds')  # fastai's gather, now that the shards are read right
    for k in ('seq_len', 'block', 'heads', 'agg_block', 'vocab'): _eq(r0['meta'][k], ref.meta[k])

def test_rank_that_records_nothing(ranks):
    "idxs only in rank 0's shard: rank 1 records nothing, no rank hangs; idxs on both ranks: no warning of missing items"
    r0, r1 = ranks[0]['nothing'], ranks[1]['nothing']
    ref, _ = _one_process(ranks[0]['weights'], idxs=IDXS, aggregate='mean')
    _eq(sorted(r['idx'] for r in r0['records']), IDXS)
    _same_records(r0['records'], ref.records)
    _same_aggregates(r0['aggregates'], ref.aggregates)
    _eq(r1['records'], [])
    _eq(sorted(r['idx'] for r in ranks[0]['both']['records']), SPLIT_IDXS)  # 30 is rank 1's
    _eq(ranks[0]['warnings'] + ranks[1]['warnings'], [])  # rank 0 warns of no idx that rank 1 had

def test_fit_probe_once(ranks):
    "A 2-epoch fit: the probe recorded once (on rank 0), not once per rank; each validation item once an epoch"
    f0, f1 = ranks[0]['fit'], ranks[1]['fit']
    probe = f0['probe']['records']
    _eq(sorted((r['epoch'], r['idx']) for r in probe), [(e, i) for e in range(3) for i in PROBE])
    _eq(f1['probe']['records'], [])
    ref, _ = _one_process(f0['weights'], idxs=PROBE)  # the probe after the last epoch holds the final weights
    last = [dict(r, epoch=0, split='valid') for r in probe if r['epoch'] == 2]
    _same_records(last, ref.records)
    valid = f0['valid']['records']
    _eq(sorted((r['epoch'], r['idx']) for r in valid), [(e, i) for e in range(2) for i in range(N_VALID)])
    ref, _ = _one_process(f0['weights'], batches=None)  # the last validation: the final weights too
    _same_records([dict(r, epoch=0) for r in valid if r['epoch'] == 1], ref.records)

def test_stock_tsai_loader_refused(ranks):
    "A stock tsai loader that would misread its shard: refused on both ranks, with what to do, and nothing hangs"
    for r in ranks: assert r['refused'] is not None and 'shard_ready(learn.dls)' in r['refused'], r['refused']
    assert 'rank 0 would read items 0..31 instead of 0..19' in ranks[0]['refused'], ranks[0]['refused']
    print(f"ranks' own time: {[round(r['seconds'], 1) for r in ranks]} s")

def test_disk_shards_open_as_the_merged_recording(ranks):
    "path=: each rank streams its shard; opened together they are rank 0's merged recording in memory, records bitwise, mean maps once"
    d = ranks[0]['dir'] / 'disk'
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ['shard-000', 'shard-001']
    rec, mem = AttnRecording.open(d), ranks[0]['predict']
    _eq(len(rec), len(mem['records'])); _eq(ranks[0]['disk_n'] + ranks[1]['disk_n'], N_VALID)  # the padding left out on disk too
    _same_records([dict(r) for r in rec.records], mem['records'], bitwise=range(N_VALID))   # the same batches computed the same way
    _same_aggregates(rec.aggregates, mem['aggregates'])
