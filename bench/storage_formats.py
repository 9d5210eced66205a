"""Which storage for recordings on disk: `.npy` shards (numpy only, memory-mapped), zarr 3 or HDF5 (h5py), for the workload
of `AttnRecorder(path=...)`: records appended one batch at a time, each a [8, 256, 256] float16 map, [8, 3000] float32 key
attention and entropy and a [3, 3000] float32 input (the users' L=3000, reduced to 256 × 256); one record read lazily;
one writer per rank, each on its own shard. Prints write speed, size on disk, time to open and read one record (cold
process, page cache dropped where allowed), and the wall time of 2 concurrent writers against 1.

    OMP_NUM_THREADS=1 python bench/storage_formats.py            # 400 records (~500 MB a format)
    OMP_NUM_THREADS=1 python bench/storage_formats.py --n 96     # quick
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np

H, L, l, C, BS = 8, 3000, 256, 3, 16
SHAPES = dict(weights=((H, l, l), 'float16'), key_attn=((H, L), 'float32'), entropy=((H, L), 'float32'), input=((C, L), 'float32'))

def batch(seed, n=BS):
    "A batch of records: maps are softmax rows of smooth logits (as trained maps are), not white noise"
    g = np.random.default_rng(seed)
    lg = np.cumsum(g.standard_normal((n, H, l, l), dtype=np.float32), -1) * .3
    w = np.exp(lg - lg.max(-1, keepdims=True)); w /= w.sum(-1, keepdims=True)
    return dict(weights=w.astype('float16'), key_attn=g.random((n, H, L), dtype=np.float32) / L,
                entropy=g.random((n, H, L), dtype=np.float32) * 5, input=g.standard_normal((n, C, L), dtype=np.float32))

# -- .npy: a fixed-size header rewritten after each batch, raw rows appended (what tsai_attnviz.record.store does) --
def _npy_header(dtype, shape, size=128):
    body = ("{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.lib.format.dtype_to_descr(np.dtype(dtype)), tuple(shape))).encode('latin1')
    return b'\x93NUMPY\x01\x00' + (size - 10).to_bytes(2, 'little') + body + b' ' * (size - 11 - len(body)) + b'\n'

class NpyWriter:
    def __init__(self, d):
        self.d, self.n = Path(d), 0; self.d.mkdir(parents=True)
        self.f = {k: open(self.d/f'{k}.npy', 'wb') for k in SHAPES}
        for k, (s, dt) in SHAPES.items(): self.f[k].write(_npy_header(dt, (0, *s)))
    def add(self, b):
        n = len(b['weights'])
        for k, f in self.f.items(): f.seek(0, 2); f.write(np.ascontiguousarray(b[k]).tobytes())
        self.n += n
        for k, f in self.f.items(): f.seek(0); f.write(_npy_header(SHAPES[k][1], (self.n, *SHAPES[k][0]))); f.flush()
    def close(self):
        for f in self.f.values(): f.close()

def npy_read(d, i): return {k: np.array(np.load(Path(d)/f'{k}.npy', mmap_mode='r')[i]) for k in SHAPES}

# -- zarr 3: one chunk per record, arrays resized as batches come --
class ZarrWriter:
    def __init__(self, d, compress=True):
        import zarr
        self.g = zarr.open_group(str(d), mode='w', zarr_format=3)
        kw = {} if compress else dict(compressors=None)
        self.a = {k: self.g.create_array(k, shape=(0, *s), chunks=(1, *s), dtype=dt, **kw) for k, (s, dt) in SHAPES.items()}
        self.n = 0
    def add(self, b):
        n = len(b['weights'])
        for k, a in self.a.items(): a.resize((self.n + n, *a.shape[1:])); a[self.n:self.n + n] = b[k]
        self.n += n
    def close(self): pass

def zarr_read(d, i):
    import zarr
    g = zarr.open_group(str(d), mode='r')
    return {k: g[k][i] for k in SHAPES}

# -- HDF5: chunked, resizable datasets --
class H5Writer:
    def __init__(self, d, compression=None):
        import h5py
        Path(d).mkdir(parents=True)
        self.h = h5py.File(Path(d)/'rec.h5', 'w')
        self.a = {k: self.h.create_dataset(k, shape=(0, *s), maxshape=(None, *s), chunks=(1, *s), dtype=dt, compression=compression)
                  for k, (s, dt) in SHAPES.items()}
        self.n = 0
    def add(self, b):
        n = len(b['weights'])
        for k, a in self.a.items(): a.resize(self.n + n, axis=0); a[self.n:self.n + n] = b[k]
        self.n += n; self.h.flush()
    def close(self): self.h.close()

def h5_read(d, i):
    import h5py
    with h5py.File(Path(d)/'rec.h5', 'r') as h: return {k: h[k][i] for k in SHAPES}

FORMATS = {'npy': (NpyWriter, npy_read), 'zarr3 (zstd)': (ZarrWriter, zarr_read),
           'zarr3 (none)': (lambda d: ZarrWriter(d, compress=False), zarr_read),
           'hdf5 (none)': (H5Writer, h5_read), 'hdf5 (lzf)': (lambda d: H5Writer(d, 'lzf'), h5_read)}

def du(d): return sum(f.stat().st_size for f in Path(d).rglob('*') if f.is_file())

def write(fmt, d, n, seed=0):
    "Write n records in batches of BS; seconds spent writing (data generation excluded)"
    W = FORMATS[fmt][0](d); t = 0.
    for j in range(n // BS):
        b = batch(seed + j)
        t0 = time.perf_counter(); W.add(b); t += time.perf_counter() - t0
    t0 = time.perf_counter(); W.close(); return t + time.perf_counter() - t0

def _drop_cache(d):
    "Evict d's files from the page cache (posix_fadvise), so a read is a read from disk"
    for f in Path(d).rglob('*'):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try: os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written pages must be clean to be dropped
            finally: os.close(fd)

def cold_read(fmt, d, i):
    "Open and read record i in a fresh process (imports excluded): seconds"
    code = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r}); import storage_formats as s; "
            f"import zarr, h5py; "
            f"t=time.perf_counter(); r=s.FORMATS[{fmt!r}][1]({str(d)!r}, {i}); print(time.perf_counter()-t)")
    return float(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout)

def concurrent(fmt, root, n, ranks=2):
    "Seconds the slowest of `ranks` processes spends writing n records to its own shard (each generates its data first)"
    procs = [subprocess.Popen([sys.executable, __file__, '--_writer', fmt, str(Path(root)/f'rank{r}'), str(n)],
                              stdout=subprocess.PIPE, text=True) for r in range(ranks)]
    return max(float(p.communicate()[0]) for p in procs)

def killed(fmt, d, n):
    "SIGKILL a writer as it writes its 5th batch of n records: how many records can still be read (and are right)"
    p = subprocess.Popen([sys.executable, __file__, '--_writer', fmt, str(d), str(n), '--_stop', '5'], stdout=subprocess.PIPE, text=True)
    p.stdout.readline(); p.kill(); p.wait()  # the writer says when it starts the 5th batch
    try:
        if fmt == 'npy': m = len(np.load(Path(d)/'weights.npy', mmap_mode='r'))
        elif fmt.startswith('zarr'):
            import zarr; m = zarr.open_group(str(d), mode='r')['weights'].shape[0]
        else:
            import h5py
            with h5py.File(Path(d)/'rec.h5', 'r') as h: m = h['weights'].shape[0]
        good = sum(np.array_equal(FORMATS[fmt][1](d, i)['weights'], batch(i // BS)['weights'][i % BS]) for i in range(m))
        return f"{good} of {m}"
    except Exception as e: return f"unreadable ({type(e).__name__})"

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--n', type=int, default=400); p.add_argument('--dir', default=None)
    p.add_argument('--_writer', nargs=3, help=argparse.SUPPRESS); p.add_argument('--_stop', type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._writer:
        fmt, d, n = a._writer; n = int(n)
        bs = [batch(j) for j in range(n // BS)]
        W, t = FORMATS[fmt][0](d), time.perf_counter()
        for j, b in enumerate(bs):
            if j == a._stop: print('stop', flush=True)  # killed as it writes this batch
            W.add(b)
        W.close(); print(time.perf_counter() - t); return
    root = Path(a.dir or tempfile.mkdtemp(prefix='storage_formats_', dir=os.environ.get('TMPDIR', '/tmp')))
    n = a.n // BS * BS
    rec_mb = sum(np.prod(s) * np.dtype(dt).itemsize for s, dt in SHAPES.values()) / 2**20
    print(f"{n} records of {rec_mb:.2f} MB ({n * rec_mb:.0f} MB raw), batches of {BS}; in {root}")
    rows = []
    for fmt in FORMATS:
        d = root/fmt.replace(' ', '_').replace('(', '').replace(')', '')
        t = write(fmt, d, n)
        size = du(d)
        _drop_cache(d)
        r1 = np.median([cold_read(fmt, d, i) for i in (n // 2, n // 3, n - 1)])
        ok = all(np.array_equal(FORMATS[fmt][1](d, i)[k], batch(i // BS)[k][i % BS]) for i in (0, n - 1) for k in SHAPES)
        c1 = concurrent(fmt, d.parent/(d.name + '_c1'), n // 2, ranks=1)
        c2 = concurrent(fmt, d.parent/(d.name + '_c2'), n // 2, ranks=2)
        k = killed(fmt, d.parent/(d.name + '_k'), n)
        rows.append(dict(format=fmt, write_MBps=round(n * rec_mb / t), size_MB=round(size / 2**20), ratio=round(size / 2**20 / (n * rec_mb), 3),
                         read_one_ms=round(r1 * 1e3, 2), two_writers_vs_one=round(c2 / c1, 2), killed=k, equal=ok))
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(d); shutil.rmtree(d.parent/(d.name + '_c1')); shutil.rmtree(d.parent/(d.name + '_c2')); shutil.rmtree(d.parent/(d.name + '_k'))
    print('\n| format | write MB/s | size MB (vs raw) | open + read one record, ms (cold) | 2 writers / 1 (each its shard) | writer killed at batch 5: records readable | read back equal |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['format']} | {r['write_MBps']} | {r['size_MB']} ({r['ratio']}) | {r['read_one_ms']} | {r['two_writers_vs_one']} | {r['killed']} | {r['equal']} |")
    if a.dir is None: shutil.rmtree(root, ignore_errors=True)

if __name__ == '__main__': main()
