"""The *report* half of ``make bench``: ``benchmarks/results/latest.json`` (every figure, the
goals and the verdicts) and ``latest.md`` (the same for people), and the lines printed at the
end. The goals table comes from ``benchmarks.goals``, the verdicts from ``benchmarks.judge``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.goals import GOALS, Goal
from benchmarks.harness import median
from fedmq.shared.ckks import DEFAULT_PRESET

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _f(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        return format(x, spec)
    return str(x)


def _label(g: Goal, r: dict[str, Any]) -> str:
    return g.figure.format(preset=DEFAULT_PRESET, cpus=(r.get("machine") or {}).get("cpus", "?"))


def _gpu(r: dict[str, Any]) -> str:
    gpu = r.get("gpu_resnet50_training") or {}
    return "measured" if gpu.get("measured") else str(gpu.get("reason", "not measured"))


def goal_rows(r: dict[str, Any]) -> list[str]:
    """The goals table of latest.md, one row per goal of ``benchmarks.goals``."""
    vd = r.get("verdicts", {})
    rows = []
    for g in GOALS:
        m = vd.get(g.key, {}).get("met")
        verdict = "" if g.op is None else ("met" if m else ("missed" if m is False else "n/a"))
        value = f"{_f(g.value(r))}{g.unit}"
        if g.bytes_key:
            value += f" ({_f(r.get(g.bytes_key))} B)"
        rows.append(f"| {_label(g, r)} | {value} | {g.text} | {verdict} |")
    rows.append(f"| ResNet-50 GPU training throughput | {_gpu(r)} | | |")
    return rows


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# fedmq benchmarks (latest run)",
        "",
        f"Machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}, torch {r['machine']['torch']}, "
        f"{r['machine']['platform']}. Every figure is a median of repeats of this run; ratios compare figures of this "
        f"run. Total {r.get('total_seconds', 0):.0f} s. Produced by `make bench` (`python -m benchmarks`).",
        "",
        "## Goals",
        "",
        "| figure | this run | goal | verdict |",
        "|---|---|---|---|",
        *goal_rows(r),
        "",
        "## Aggregator throughput (encrypted values per second)",
        "",
        "| path | values/s |",
        "|---|---|",
        f"| end to end: broker -> consumer -> folded, committed, published | {_f(r.get('aggregator_fold_values_per_s'))} |",
        f"| floor: deserialize + add (m = 1), alone | {_f(r.get('aggregator_floor_values_per_s'))} |",
        f"| floor with the run's weight units (double-and-add) | {_f(r.get('aggregator_floor_same_units_values_per_s'))} |",
        f"| plaintext float32 summation, same values | {_f(r.get('plaintext_fp32_sum_values_per_s'))} |",
        "",
    ]
    if r.get("wire_table"):
        lines += ["## Wire bytes and AUC cost (small_cnn)", "",
                  "| CKKS preset | top-k fraction | blocks sent | bytes / update | vs dense float32 | AUC cost (points) |",
                  "|---|---|---|---|---|---|"]
        rows = r.get("auc_table") or r["wire_table"]
        for row in rows:
            lines.append(f"| {row['preset']} | {row['topk_fraction']} | {row['blocks_sent']} | {row['bytes']:,} | "
                         f"{row['ratio_vs_dense_fp32']:.2f}x | {_f(row.get('auc_cost_points'), '.2f')} |")
        if r.get("auc_method"):
            lines += ["", f"AUC: {r['auc_method']}. Dense AUC {_f(r.get('auc_dense'), '.4f')}."]
        lines.append("")
    so = r.get("site_overhead")
    if so:
        lines += ["## Site overhead per round", "",
                  f"small_cnn, {so['train_samples']} images, DP-SGD {'on' if so['dp_enabled'] else 'off'}, {so['sparsity']}: "
                  f"training {so['train_s']:.2f} s, sparsify+encrypt+sign {so['sparsify_encrypt_sign_s']:.3f} s, "
                  f"publish {so['publish_s']:.3f} s.", ""]
    sg = r.get("signatures")
    if sg:
        lines += ["## Signatures (hybrid Ed25519 + ML-DSA-65) and the audit chain", "",
                  f"Sizes: Ed25519 {sg['ed25519_signature_bytes']} B, ML-DSA-65 {sg['mldsa65_signature_bytes']} B, "
                  f"hybrid (both, msgpack) {sg['hybrid_signature_bytes']} B per signed message; public keys "
                  f"{sg['ed25519_public_key_bytes']} + {sg['mldsa65_public_key_bytes']} B.", "",
                  "| operation | Ed25519 | ML-DSA-65 | hybrid |", "|---|---|---|---|",
                  f"| sign / s | {_f(sg['ed25519_sign_per_s'])} | {_f(sg['mldsa65_sign_per_s'])} | {_f(sg['hybrid_sign_per_s'])} |",
                  f"| verify / s | {_f(sg['ed25519_verify_per_s'])} | {_f(sg['mldsa65_verify_per_s'])} | "
                  f"{_f(sg['hybrid_verify_per_s'])} |", "",
                  f"Aggregator, one dense update of {sg['update_values']:,} values ({sg['update_bytes']:,} B, "
                  f"{sg['update_chunks']} chunk(s)): hybrid verification {sg['aggregator_verify_update_s'] * 1e3:.1f} ms "
                  f"(of which SHA-512 of the payload {sg['aggregator_hash_update_s'] * 1e3:.1f} ms; Ed25519 alone would be "
                  f"{sg['aggregator_ed25519_only_verify_update_s'] * 1e3:.1f} ms) = "
                  f"{_f(sg['hybrid_verify_share_of_engine'])} of the engine's {sg['aggregator_engine_update_s']:.3f} s "
                  f"for that update; the ML-DSA half adds {_f(sg['hybrid_extra_vs_ed25519_share_of_engine'])}. "
                  f"Site: signing the update {sg['site_sign_update_s'] * 1e3:.1f} ms. "
                  f"Audit chain of 100 versions x 3 sites ({sg['audit_chain_bytes']:,} B) verified in "
                  f"{sg['audit_verify_100x3_s']:.3f} s. {sg['note']}.", ""]
    ss = r.get("scaling_sites")
    if ss:
        lines += ["## Aggregator time per version vs number of sites", "",
                  f"Engine in-process (decode, verify, WAL fsync, fold, commit + checkpoint), dense updates of "
                  f"{ss['params_per_update']:,} values, K = number of sites.", "",
                  "| sites | s / version | s / update | values/s |", "|---|---|---|---|"]
        lines += [f"| {x['sites']} | {x['seconds_per_version']:.3f} | {x['seconds_per_update']:.4f} | {_f(x['values_per_s'])} |"
                  for x in ss["rows"]]
        lines.append("")
    sm = r.get("scaling_model")
    if sm:
        lines += ["## Aggregator time per version vs model size", "",
                  "One update, K = 1, random delta of the model's size. Dense where ~5 copies of its ciphertexts fit "
                  f"half the available memory ({sm['memory_budget_bytes'] / 2**30:.1f} GiB), else top-k.", "",
                  "| model | parameters | sent | update bytes | dense would be | site build s | aggregator s / version | values/s |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['model']} | {x['params']:,} | {x['mode']} ({x['blocks_sent']} blocks) | {x['update_bytes']:,} | "
                  f"{x['dense_update_bytes_estimate']:,} | {x['site_build_seconds']:.1f} | "
                  f"{x['aggregator_seconds_per_version']:.2f} | {_f(x['values_per_s'])} |" for x in sm["rows"]]
        lines.append("")
    r50 = r.get("resnet50")
    if r50:
        lines += ["## Privacy at ResNet-50 scale", "",
                  f"One dense update of {r50['params']:,} values ({r50['blocks']} blocks): "
                  f"{_f(r.get('resnet50_update_bytes'))} bytes = {r50['update_vs_dense_fp32']:.2f}x its float32 form; "
                  f"built in {_f(r.get('resnet50_site_build_seconds'))} s on {r50['encrypt_workers']} encryption workers "
                  f"(load average {r50['load_average_at_build']:.1f} when it started); folded end to end in "
                  f"{_f(r.get('resnet50_fold_seconds'))} s (floor: deserialize + fold alone "
                  f"{_f(r.get('resnet50_floor_seconds'))} s, ratio {_f(r.get('resnet50_fold_vs_floor'))}); version 1 "
                  f"committed and published in {_f(r.get('resnet50_version_seconds'))} s; aggregator peak RSS "
                  f"{_f(r.get('aggregator_peak_rss_bytes'))} B for an encrypted model of {r50['encrypted_model_bytes']:,} B. "
                  f"{r50['note']}.", ""]
    sw = r.get("shard_workload")
    if sw:
        lines += ["## Shards", "",
                  f"{sw['updates']} dense updates of {sw['params_per_update']:,} values, K = {sw['K']}; aggregator "
                  f"processes consuming, paused, workload published, resumed; clock stops when every shard committed. "
                  f"One shard {median(sw['one_shard_seconds']):.2f} s, two shards {median(sw['two_shards_seconds']):.2f} s.", ""]
    avs = r.get("async_vs_sync")
    if avs:
        lines += ["## Async vs sync", "", "```", json.dumps(avs, indent=1, default=str)[:1500], "```", ""]
    errors = {k: v for k, v in r.items() if k.endswith("_error")}
    if errors:
        lines += ["## Errors", ""] + [f"- {k}: {v}" for k, v in errors.items()] + [""]
    return "\n".join(lines)


def write(result: dict[str, Any], out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "latest.json", out_dir / "latest.md"
    j.write_text(json.dumps(result, indent=2, default=str) + "\n")
    m.write_text(markdown(result) + "\n")
    return j, m


def summary_lines(r: dict[str, Any]) -> list[str]:
    """What ``make bench`` prints at the end: every goal's figure, value and verdict."""
    vd = r.get("verdicts", {})
    lines = []
    for g in GOALS:
        verdict = f": {vd.get(g.key, {}).get('met')}" if g.op is not None else ""
        lines.append(f"{_label(g, r)}: {_f(g.value(r))}{g.unit} (goal {g.text}{verdict})")
    lines.append(f"ResNet-50 GPU training: {_gpu(r)}")
    return lines
