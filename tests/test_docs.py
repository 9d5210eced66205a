"README.md and nbs/index.ipynb say the same thing (nbdev-readme needs Quarto, which is not installable here)."
import json
from pathlib import Path

ROOT = Path(__file__).parents[1]

def test_readme_matches_index_notebook():
    nb = json.loads((ROOT/'nbs'/'index.ipynb').read_text())
    md = '\n\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    readme = (ROOT/'README.md').read_text().strip('\n')
    if md != readme:
        a, b = md.splitlines(), readme.splitlines()
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise AssertionError(f"README.md and nbs/index.ipynb differ from line {i + 1}:\n  index:  {a[i] if i < len(a) else '<end>'}\n"
                             f"  README: {b[i] if i < len(b) else '<end>'}\nEdit both so they say the same.")
    assert not [c for c in nb['cells'] if c['cell_type'] == 'code' and c.get('outputs')]

def test_readme_figures_exist():
    for f in ['docs/demo_grid.png', 'docs/demo_series.png', 'docs/report.png']:
        assert (ROOT/f).stat().st_size < 300_000, f
