"""RSS of a process that opens a TextEncoderOutputCache and reads every entry, at 1k .. 1M entries.

Why: the diffusers SDXL example keeps every text embedding in RAM (138k images -> 44 GB); our cache must
stay flat: < 1 KB of RAM per entry, whatever the entry width, because rows are read with pread and not kept.

Each size runs in two fresh subprocesses: one writes synthetic entries (random fp16 rows reused under
distinct captions), one measures VmRSS before opening, after opening (index built), after the first
100 reads and after reading every entry once. Columns (B/e = bytes per entry): index arrays; RSS growth
from before opening to after opening, and to after all reads (both include a few MB that do not grow with
the entry count); "steady" = RSS growth per read after the first 100. Disk use is checked with ``shutil.disk_usage`` first and the data is deleted afterwards.

SDXL-shaped rows (77 x 2048 + 1280 pooled, fp16 = 315 KB) are used for 1k and 10k entries. 100k of those
would be 31 GB of disk, so 100k uses 77 x 128 + 80 (20 KB) and 1M uses 77 x 8 + 8 (1.2 KB): the index
code is the same, and what is measured (RAM per entry) does not depend on the row width.

    python bench/te_cache_memory.py [--root /tmp] [--sizes 1000,10000,100000,1000000] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# entries -> (hidden length, hidden width, pooled width)
SHAPES = {1000: (77, 2048, 1280), 10000: (77, 2048, 1280), 100000: (77, 128, 80), 1000000: (77, 8, 8)}
IDENTITY = "bench-synthetic-sdxl"
BLOCK = 256  # rows per add() call
WARMUP = 100  # reads before the steady-state RSS sample


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc, else psutil)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def caption(i: int) -> str:
    return f"synthetic caption number {i}, a photo of something"


def write(folder: Path, entries: int, length: int, width: int, pooled_width: int) -> dict:
    import torch

    from library.cache.text_encoder_files import TextEncoderOutputCache
    from library.models.text_encoding import EncodedPrompts

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(BLOCK, length, width, generator=generator).half()
    pooled = torch.randn(BLOCK, pooled_width, generator=generator).half()
    cache = TextEncoderOutputCache(folder, IDENTITY)
    start = time.perf_counter()
    for first in range(0, entries, BLOCK):
        n = min(BLOCK, entries - first)
        cache.add([caption(i) for i in range(first, first + n)], EncodedPrompts(hidden[:n], pooled[:n]))
    cache.flush()
    return {"write_s": time.perf_counter() - start, "write_peak_rss": peak_rss_bytes(),
            "shards": len(list(cache.folder.glob("*.keys.npy")))}


def read(folder: Path, entries: int) -> dict:

    from library.cache.text_encoder_files import TextEncoderOutputCache

    baseline = rss_bytes()
    start = time.perf_counter()
    cache = TextEncoderOutputCache(folder, IDENTITY)
    assert len(cache) == entries, (len(cache), entries)
    opened = rss_bytes()
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    checksum = 0.0
    warm = rss_bytes()
    for i in range(entries):
        hidden, pooled = cache.get(caption(i))
        checksum += float(hidden[0, 0]) + float(pooled[0])
        if i + 1 == WARMUP:  # the first reads allocate a few MB once (buffers, lazily imported code)
            warm = rss_bytes()
    read_s = time.perf_counter() - start
    after = rss_bytes()
    return {"baseline_rss": baseline, "opened_rss": opened, "warm_rss": warm, "after_read_rss": after,
            "open_s": open_s, "read_s": read_s, "index_nbytes": cache.index_nbytes(), "checksum": checksum}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=tempfile.gettempdir(), help="where the synthetic caches are written")
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--keep", action="store_true", help="do not delete the caches afterwards")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        mode, folder, entries, *shape = args._child
        result = write(Path(folder), int(entries), *map(int, shape)) if mode == "write" else read(Path(folder), int(entries))
        print(json.dumps(result))
        return

    mib = 1 << 20
    print(f"{'entries':>8} {'row (LxD+P)':>16} {'disk MiB':>9} {'shards':>6} {'write s':>8} {'write peak MiB':>14} "
          f"{'open s':>7} {'read us':>7} {'index B/e':>9} {'RSS open B/e':>12} {'RSS read B/e':>12} {'steady B/e':>10}")
    for entries in (int(s) for s in args.sizes.split(",")):
        length, width, pooled_width = SHAPES.get(entries, (77, 2048, 1280))
        need = entries * (length * width + pooled_width) * 2 + 16 * entries
        free = shutil.disk_usage(args.root).free
        if need * 1.2 + (2 << 30) > free:
            print(f"{entries:>8}: skipped, needs {need / mib:.0f} MiB and only {free / mib:.0f} MiB are free")
            continue
        folder = Path(tempfile.mkdtemp(prefix="te_cache_bench_", dir=args.root))
        try:
            w = run_child("--_child", "write", str(folder), str(entries), str(length), str(width), str(pooled_width))
            r = run_child("--_child", "read", str(folder), str(entries))
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        print(f"{entries:>8} {f'{length}x{width}+{pooled_width}':>16} {need / mib:>9.0f} {w['shards']:>6} "
              f"{w['write_s']:>8.1f} {w['write_peak_rss'] / mib:>14.0f} {r['open_s']:>7.2f} "
              f"{r['read_s'] / entries * 1e6:>7.1f} {r['index_nbytes'] / entries:>9.1f} "
              f"{(r['opened_rss'] - r['baseline_rss']) / entries:>12.1f} "
              f"{(r['after_read_rss'] - r['baseline_rss']) / entries:>12.1f} "
              f"{(r['after_read_rss'] - r['warm_rss']) / max(1, entries - WARMUP):>10.2f}"
              f"   (RSS MiB: baseline {r['baseline_rss'] / mib:.1f}, opened {r['opened_rss'] / mib:.1f}, "
              f"after {WARMUP} reads {r['warm_rss'] / mib:.1f}, after all {r['after_read_rss'] / mib:.1f})",
              flush=True)


if __name__ == "__main__":
    main()
