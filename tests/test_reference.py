"Issue 10: values checked against computations made here, outside the package, so that one-line bugs fail a test."
import numpy as np, pytest, torch
import pandas as pd
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.all import *
from conftest import make_learner, stock_effective_attention, no_leftovers, device_of

def by_hand(layer, z):
    "Softmax part, bias and effective matrix of an eRPE layer for its input z [bs, L, d_model], from its parameters"
    bs, L, _ = z.shape
    H = layer.n_heads
    q = layer.query(z).reshape(bs, L, H, -1).transpose(1, 2)
    k = layer.key(z).reshape(bs, L, H, -1).transpose(1, 2)
    sm = torch.softmax(q @ k.transpose(-1, -2) * layer.scale, -1)
    i = torch.arange(L, device=z.device)
    bias = layer.relative_bias_table[i[:, None] - i[None, :] + L - 1].permute(2, 0, 1)  # [H, L, L]
    return sm, bias, sm + bias

@pytest.mark.parametrize('h', [1, 2, 4, 16])
def test_erpe_any_heads_values_with_a_nonzero_bias(h):
    torch.manual_seed(h)
    m = swap_attention(ConvTranPlus(3, 2, 25, d_model=16, n_heads=h)).eval()
    lay = m.backbone.attention_layer
    with torch.no_grad(): lay.relative_bias_table.normal_(0, 0.2)
    got = {}
    hk = lay.register_forward_hook(lambda mod, i, o: got.setdefault('z', i[0]))
    try:
        with torch.no_grad(): m(torch.randn(2, 3, 25))
    finally: hk.remove()
    with torch.no_grad(): sm, bias, eff = by_hand(lay, got['z'])
    torch.testing.assert_close(lay.attn_softmax, sm)
    torch.testing.assert_close(lay.relative_bias(), bias)
    torch.testing.assert_close(lay.attn_weights, eff)

@pytest.fixture(scope='module')
def untrained(bm_data):
    "A learner whose predictions differ from its targets, with a non-zero eRPE bias (as after training)"
    learn = make_learner(*bm_data)
    with torch.no_grad(): learn.model.backbone.attention_layer.relative_bias_table.normal_(0, 0.05)
    return learn

def test_statistics_per_record_and_per_forward(untrained):
    rec = AttnRecorder(batches=[0, 1], samples=[0, 3, 5], stats=True, max_len=None)
    untrained.get_preds(cbs=[rec])
    r = rec.recording
    eff = stock_effective_attention(untrained.model, r.inputs).double()          # [n, H, L, L]
    got = {}
    lay = untrained.model.backbone.attention_layer
    hk = lay.register_forward_hook(lambda mod, i, o: got.setdefault('z', i[0]))
    try:
        with torch.no_grad(): untrained.model(r.inputs.to(device_of(untrained.model)))
    finally: hk.remove()
    with torch.no_grad(): sm = by_hand(lay, got['z'])[0].double().cpu()
    L = eff.shape[-1]
    dist = (torch.arange(L)[:, None] - torch.arange(L)[None]).abs().double()
    rs = eff.sum(-1)
    want = torch.stack([eff.amin((-2, -1)), eff.amax((-2, -1)), eff.mean((-2, -1)), rs.amin(-1), rs.amax(-1),
                        (-(sm * sm.log()).sum(-1)).mean(-1), (sm * dist).sum(-1).mean(-1)], -1)   # [n, H, 7]
    df = r.stats_df()
    got_t = torch.tensor(df[list(STAT_NAMES)].to_numpy()).reshape(len(r), -1, 7)
    torch.testing.assert_close(got_t, want, rtol=1e-4, atol=1e-6)
    assert (want[..., 3] < 0.99).any()  # eRPE rows: row sums differ from 1, so min and max of row sums are told apart
    per = r.stats_df(per='forward')
    for (fwd, head), g in df.groupby(['forward', 'head']):
        row = per[(per['forward'] == fwd) & (per['head'] == head)].iloc[0]
        assert row['min'] == g['min'].min() and row['max'] == g['max'].max() and row['rowsum_min'] == g['rowsum_min'].min()
        assert row['rowsum_max'] == g['rowsum_max'].max()
        for k in ('mean', 'entropy', 'mean_distance'): assert row[k] == pytest.approx(g[k].mean())

def test_statistics_round_trip_with_split_and_forward(untrained, tmp_path):
    rec = AttnRecorder(samples=[1], stats=True, tag='fold 3')
    untrained.get_preds(cbs=[rec])
    r = rec.recording
    r2 = AttnRecording.load(r.save(tmp_path/'s.npz'))
    pd.testing.assert_frame_equal(r2.stats_df(), r.stats_df())
    assert (r2.splits, r2.forwards, r2.tags) == (r.splits, r.forwards, r.tags) == (['valid'], r.forwards, ['fold 3'])

def test_probe_runs_in_eval_mode_without_gradients(bm_data):
    learn = make_learner(*bm_data)
    seen = []
    def look(mod, i, o):
        if len(i[0]) == 2: seen.append((mod.training, torch.is_grad_enabled()))  # the probe is the only forward of 2 items
    hk = learn.model.backbone.attention_layer.register_forward_hook(look)
    try:
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=[AttnRecorder(every_epoch=True, probe=[0, 1])])
    finally: hk.remove()
    assert seen == [(False, False)] * 3  # before training and after each epoch
    mode = learn.model.training
    learn2 = make_learner(*bm_data)
    with learn2.no_bar(), learn2.no_logging(): learn2.fit(2, 1e-3)
    assert mode == learn2.model.training  # the mode fit leaves the model in, as without the recorder

def test_aggregates_count_validation_items_only(bm_data):
    X, y, splits = bm_data
    learn = make_learner(X, y, splits)
    rec = AttnRecorder(train=True, batches=None, samples=[0], aggregate='mean', max_len=20)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[rec])
    assert rec.recording.aggregates['mean'][1] == len(splits[1])  # training batches are recorded, not averaged
    assert {'train', 'valid'} == set(rec.recording.splits)

def test_training_records_are_the_items_they_name(bm_data):
    X, y, splits = bm_data
    learn = make_learner(X, y, splits)  # no batch tfms: a recorded input is the item itself
    rec = AttnRecorder(train=True, batches=None, samples=[0, 5, 9])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[rec])
    tr = rec.recording.filter(split='train')
    assert len(tr) == 6  # 2 full training batches (drop_last), 3 samples each
    for r in tr.records: assert torch.equal(r['input'], torch.tensor(X[splits[0][r['idx']]]))
    no_leftovers(learn.model)

def test_probe_recorder_with_train_records_no_validation_batches(bm_data, tmp_path):
    learn = make_learner(*bm_data)
    rec = AttnRecorder(every_epoch=True, train=True, batches=[0], samples=[0], aggregate='mean', max_len=10)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[rec])
    assert sorted(set(rec.recording.splits)) == ['probe', 'train']
    r2 = AttnRecording.load(rec.recording.save(tmp_path/'fit.npz'))  # every split, epoch and forward survives the file
    assert (r2.splits, r2.epochs, r2.forwards, r2.idxs) == (rec.recording.splits, rec.recording.epochs, rec.recording.forwards, rec.recording.idxs)
    assert 'mean' not in rec.recording.aggregates  # means are over validation passes: a probe fit has none
