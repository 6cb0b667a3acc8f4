"""CKKS cost per preset, beside float32 numpy doing the same work, measured in one run.

For every preset in ``shared.ckks.PRESETS``: encrypt (a fresh, seeded ciphertext as a site
sends it), serialize (a folded ciphertext, as the aggregator writes versions), deserialize (into
the aggregator's PUBLIC context) and fold (``w * ct`` added to a running sum, as the aggregator
folds) throughput in values/s, bytes per value on the wire, and the error budget: the max abs
error of an encrypted weighted average of 64 updates (integer weights 1..1000, values in
[-100, 100]) against the float64 one, and the same at the headroom's corner (every weight 1000,
every value +-100). float32 numpy does the same block-wise work: encode = astype(float32),
serialize = tobytes, deserialize = frombuffer, add = +. Throughputs are the median of repeats;
ratios compare numbers taken in this same run, on this machine.

    python -m benchmarks.crypto            # full run, writes benchmarks/results/crypto.json
    python -m benchmarks.crypto --quick    # a few seconds, same table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.shared.ckks import (
    AGGREGATION_ERROR_BUDGET,
    DEFAULT_PRESET,
    PRESETS,
    CkksPreset,
    LoadedContext,
    accumulate,
    decrypt_block,
    encrypt_block,
    init_keys,
    load_ciphertext,
    load_context,
    serialize,
)

RESULTS = Path(__file__).resolve().parent / "results" / "crypto.json"
OPS = ("encrypt", "serialize", "deserialize", "add")


def throughput(work: Callable[[], Any], n_values: int, repeats: int, min_seconds: float) -> float:
    """Median values/s of ``work`` (which handles ``n_values`` values), over ``repeats`` timings.

    Each timing loops ``work`` enough times to last ``min_seconds``, so float32's microsecond
    operations are measured as reliably as CKKS's millisecond ones.
    """
    work()  # warm-up
    loops, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(loops):
            work()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            break
        loops = max(loops * 2, int(loops * min_seconds / max(elapsed, 1e-9) * 1.2))
    rates = [loops * n_values / elapsed]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(loops):
            work()
        rates.append(loops * n_values / (time.perf_counter() - t0))
    return statistics.median(rates)


def aggregation_error(
    secret: LoadedContext, public: LoadedContext, rng: np.random.Generator, trials: int, n_sites: int, *, corner: bool = False,
) -> float:
    """Max abs error of the decrypted weighted average vs float64: ``n_sites`` updates in
    [-bound, bound], integer weights 1..1000; ``corner``: every weight 1000, every value +-bound
    (the largest sum the error budget promises to hold without wrapping)."""
    size, bound = secret.block_size, secret.preset.value_bound
    worst = 0.0
    for _ in range(trials):
        if corner:
            updates = np.where(rng.random((n_sites, size)) < 0.5, -bound, bound)
            updates[:, : size // 2] = bound  # half the values at +bound in every update: |sum| = n * 1000 * bound
            units = np.full(n_sites, 1000)
        else:
            updates = rng.uniform(-bound, bound, size=(n_sites, size))
            units = rng.integers(1, 1001, size=n_sites)
        folded = None
        for u, w in zip(updates, units):
            folded = accumulate(folded, load_ciphertext(public, encrypt_block(secret, u)), int(w))
        if folded is None:
            raise ValueError("aggregation_error needs at least one update")
        got = decrypt_block(secret, serialize(folded)) / units.sum()
        expected = (units[:, None] * updates).sum(axis=0) / units.sum()
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst


def bench_preset(preset: CkksPreset, blocks: np.ndarray, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        files = init_keys(tmp, preset.name)
        secret = load_context(files.secret_context, require_secret=True)
        public = load_context(files.public_context, require_secret=False)
    n_values = blocks.size
    wire = [encrypt_block(secret, b) for b in blocks]
    received = [load_ciphertext(public, w) for w in wire]
    folded = [accumulate(load_ciphertext(public, w), r, 3) for w, r in zip(wire, received[::-1])]

    def fold_all() -> None:
        acc = None
        for w in wire:
            acc = accumulate(acc, load_ciphertext(public, w), 7)

    rates = {
        "encrypt": throughput(lambda: [encrypt_block(secret, b) for b in blocks], n_values, args.repeats, args.min_seconds),
        "serialize": throughput(lambda: [serialize(v) for v in folded], n_values, args.repeats, args.min_seconds),
        "deserialize": throughput(lambda: [load_ciphertext(public, w) for w in wire], n_values, args.repeats, args.min_seconds),
        "add": throughput(lambda: [accumulate(None, r, 5) for r in received], n_values, args.repeats, args.min_seconds),
        "deserialize_fold": throughput(fold_all, n_values, args.repeats, args.min_seconds),
    }
    single = max(float(np.max(np.abs(decrypt_block(secret, w)[: b.size] - b))) for w, b in zip(wire, blocks))
    error = aggregation_error(secret, public, rng, args.error_trials, args.sites)
    corner = aggregation_error(secret, public, rng, 1, args.sites, corner=True)
    return {
        "name": preset.name,
        "poly_modulus_degree": preset.poly_modulus_degree,
        "prime_bits": preset.prime_bits,
        "total_modulus_bits": preset.modulus_bits,
        "scale_bits": preset.scale_bits,
        "block_size": preset.block_size,
        "value_bound": preset.value_bound,
        "headroom": preset.headroom,
        "bytes_per_ciphertext": len(wire[0]),
        "bytes_per_folded_ciphertext": len(serialize(folded[0])),
        "bytes_per_value": len(wire[0]) / preset.block_size,
        **{f"{op}_values_per_s": rates[op] for op in (*OPS, "deserialize_fold")},
        "max_abs_error": error,
        "max_abs_error_headroom_corner": corner,
        "max_abs_error_single_ciphertext": single,
        "meets_error_budget": max(error, corner) <= AGGREGATION_ERROR_BUDGET,
    }


def bench_float32(blocks: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    n_values = blocks.size
    as32 = [b.astype(np.float32) for b in blocks]
    raw = [a.tobytes() for a in as32]
    other = as32[::-1]
    rates = {
        "encrypt": throughput(lambda: [b.astype(np.float32) for b in blocks], n_values, args.repeats, args.min_seconds),
        "serialize": throughput(lambda: [a.tobytes() for a in as32], n_values, args.repeats, args.min_seconds),
        "deserialize": throughput(lambda: [np.frombuffer(r, dtype=np.float32) for r in raw], n_values, args.repeats, args.min_seconds),
        "add": throughput(lambda: [a + b for a, b in zip(as32, other)], n_values, args.repeats, args.min_seconds),
    }
    single = float(np.max(np.abs(np.stack(as32).astype(np.float64) - blocks)))
    return {
        "bytes_per_value": len(raw[0]) / blocks.shape[1],
        **{f"{op}_values_per_s": rates[op] for op in OPS},
        "max_abs_error_single": single,
        "note": "encrypt = astype(float32), serialize = tobytes, deserialize = frombuffer, add = +",
    }


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tenseal": metadata.version("tenseal"),
    }


def _fmt_rate(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def table(result: dict[str, Any]) -> str:
    f32 = result["float32"]
    head = f"{'preset':<18}{'B/value':>9}{'encrypt/s':>11}{'serial/s':>11}{'deser/s':>11}{'add/s':>11}{'max err':>10}"
    lines = [head, "-" * len(head)]
    for p in result["presets"]:
        mark = "*" if p["name"] == result["default_preset"] else " "
        lines.append(
            f"{p['name'] + mark:<18}{p['bytes_per_value']:>9.2f}"
            + "".join(f"{_fmt_rate(p[f'{op}_values_per_s']):>11}" for op in OPS)
            + f"{p['max_abs_error']:>10.1e}"
        )
    lines.append(
        f"{'float32 numpy':<18}{f32['bytes_per_value']:>9.2f}"
        + "".join(f"{_fmt_rate(f32[f'{op}_values_per_s']):>11}" for op in OPS)
        + f"{f32['max_abs_error_single']:>10.1e}"
    )
    lines += ["", "CKKS vs float32, same run (x = times slower / times larger):", f"{'preset':<18}{'size':>9}{'encrypt':>11}{'serial':>11}{'deser':>11}{'add':>11}"]
    for p in result["presets"]:
        lines.append(
            f"{p['name']:<18}{p['size_vs_float32']:>8.1f}x"
            + "".join(f"{p[f'{op}_slowdown_vs_float32']:>10.0f}x" for op in OPS)
        )
    for p in result["presets"]:
        lines.append(
            f"\n{p['name']}: {p['bytes_per_value']:.3f} bytes/value ({p['bytes_per_ciphertext']} B per {p['block_size']} values); "
            f"error budget {AGGREGATION_ERROR_BUDGET:g}: max error {p['max_abs_error']:.2e} (random), "
            f"{p['max_abs_error_headroom_corner']:.2e} (headroom corner: 64 x 1000 x {p['value_bound']:g}); "
            f"{'meets' if p['meets_error_budget'] else 'MISSES'} it"
        )
    lines.append(f"\n* default preset. max err: encrypted weighted average of {result['config']['sites']} updates in [-100,100], "
                 f"weights 1..1000, vs float64 (budget {AGGREGATION_ERROR_BUDGET:g}); float32 row: rounding error.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    size = max(p.block_size for p in PRESETS.values())
    # the same values for every preset; a block is one ciphertext of the smallest preset
    values = rng.uniform(-1.0, 1.0, size=args.blocks * size)
    f32_blocks = values.reshape(-1, min(p.block_size for p in PRESETS.values()))
    presets = []
    names = args.presets or list(PRESETS)
    for name in names:
        preset = PRESETS[name]
        blocks = values.reshape(-1, preset.block_size)
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        presets.append(bench_preset(preset, blocks, args, rng))
    f32 = bench_float32(f32_blocks, args)
    for p in presets:
        p["size_vs_float32"] = p["bytes_per_value"] / f32["bytes_per_value"]
        for op in OPS:
            p[f"{op}_slowdown_vs_float32"] = f32[f"{op}_values_per_s"] / p[f"{op}_values_per_s"]
    return {
        "default_preset": DEFAULT_PRESET,
        "error_budget": AGGREGATION_ERROR_BUDGET,
        "ckks_bytes_per_value": next(p["bytes_per_value"] for p in presets if p["name"] == DEFAULT_PRESET)
        if any(p["name"] == DEFAULT_PRESET for p in presets) else None,
        "presets": presets,
        "float32": f32,
        "machine": machine(),
        "config": {
            "quick": args.quick, "values": int(values.size), "repeats": args.repeats, "min_seconds": args.min_seconds,
            "sites": args.sites, "error_trials": args.error_trials, "seed": args.seed,
            "ratio_meaning": "*_slowdown_vs_float32 = float32 values/s / CKKS values/s; size_vs_float32 = bytes/value ratio",
        },
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crypto", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few values and repeats: a smoke run of a few seconds")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (median reported)")
    parser.add_argument("--blocks", type=int, help="values = blocks * 4096")
    parser.add_argument("--preset", dest="presets", action="append", choices=sorted(PRESETS), help="only this preset (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.blocks = args.blocks or (2 if args.quick else 8)
    args.min_seconds = 0.02 if args.quick else 0.2
    args.sites, args.error_trials = 64, (1 if args.quick else 4)
    result = run(args)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(p["meets_error_budget"] for p in result["presets"] if p["name"] == DEFAULT_PRESET) else 1


if __name__ == "__main__":
    sys.exit(main())
