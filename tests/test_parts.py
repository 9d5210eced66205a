"The parts of a ConvTranPlus (eRPE) map on a trained Learner: softmax + bias == effective, each against the stock layer by hand"
import pytest, torch
from tsai_attnviz.all import *
from tsai_attnviz.core.reduce import reduce_map
from conftest import stock_effective_attention, no_leftovers

@pytest.fixture
def recording(bm_learner):
    rec = AttnRecorder(idxs=[0, 7, 20], max_len=None)
    bm_learner.get_preds(cbs=[rec])
    no_leftovers(bm_learner.model)
    return bm_learner, rec.recording

@pytest.mark.bitwise
def test_parts_add_up_and_match_the_stock_layer(recording):
    learn, r = recording
    sm, eff = stock_effective_attention(learn.model, r.inputs, 'softmax'), stock_effective_attention(learn.model, r.inputs)
    for i, x in enumerate(r.records):
        assert torch.equal(r.part(x, 'softmax') + r.part(x, 'bias'), x['weights'])  # bitwise, as recorded
        torch.testing.assert_close(r.part(x, 'softmax'), sm[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(x['weights'], eff[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(r.part(x, 'bias'), eff[i] - sm[i], atol=1e-6, rtol=0)  # the same bias for every item
        torch.testing.assert_close(r.part(x, 'softmax', 'key_attn'), sm[i].mean(-2), atol=1e-6, rtol=0)

def test_bias_share_by_hand(recording):
    learn, r = recording
    sm, eff = stock_effective_attention(learn.model, r.inputs, 'softmax').double(), stock_effective_attention(learn.model, r.inputs).double()
    df = r.part_stats()
    for i in range(len(r)):
        for h in range(8):
            vs, vb = sm[i, h].var().item(), (eff[i, h] - sm[i, h]).var().item()
            got = df[(df['idx'] == r.idxs[i]) & (df['head'] == h)]['bias_share'].item()
            assert got == pytest.approx(vb / (vs + vb), rel=1e-4)

@pytest.mark.bitwise
def test_reduced_parts(bm_learner):
    rec = AttnRecorder(idxs=[3], max_len=10)
    bm_learner.get_preds(cbs=[rec])
    r = rec.recording
    sm = stock_effective_attention(bm_learner.model, r.inputs, 'softmax')
    torch.testing.assert_close(r.part(r.records[0], 'softmax'), reduce_map(sm, 10)[0], atol=1e-6, rtol=0)
    assert torch.equal(r.part(r.records[0], 'softmax') + r.part(r.records[0], 'bias'), r.records[0]['weights'])

def test_parts_of_a_model_without_bias(bm_data):
    from conftest import make_learner
    learn = make_learner(*bm_data, arch_config=dict(rel_pos_encode='vector'))
    rec = AttnRecorder(idxs=[0])
    learn.get_preds(cbs=[rec])
    r = rec.recording
    assert torch.equal(r.part(r.records[0], 'softmax'), r.records[0]['weights']) and not r.biases
    with pytest.raises(ValueError, match="part='bias': layer backbone.attention_layer adds no bias"): r.part(r.records[0], 'bias')
