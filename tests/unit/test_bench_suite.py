"""The benchmark harness (benchmarks.run, .judge, .report) at tiny sizes: every section runs and reports its keys.

No timing is asserted: these check that ``make bench`` can produce its JSON and markdown."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks import judge, report
from benchmarks import run as bench
from fedmq.shared.ckks import DEFAULT_PRESET

TINY = bench.Sizes.tiny()


def test_sizes_full_is_the_make_bench_configuration():
    full = bench.Sizes.full()
    assert full.repeats >= 3 and 64 in full.site_counts
    assert set(full.model_presets) == {"small_cnn", "resnet18", "resnet50"}
    assert full.auc_levels == (1.0, 0.5, 0.25, 0.12)


def test_wire_bytes_keys(tmp_path):
    out = bench.wire_bytes(TINY, tmp_path)
    assert out["wire_bytes_ratio_vs_dense_fp32"] > 0
    assert out["wire_default"]["ckks_preset"] == DEFAULT_PRESET
    rows = out["wire_table"]
    assert {(r["preset"], r["topk_fraction"]) for r in rows} == {(DEFAULT_PRESET, 1.0), (DEFAULT_PRESET, 0.5)}
    dense = next(r for r in rows if r["topk_fraction"] == 1.0)
    half = next(r for r in rows if r["topk_fraction"] == 0.5)
    assert half["bytes"] < dense["bytes"] and dense["ratio_vs_dense_fp32"] > 1.0  # CKKS ~6.2 B/value vs 4 B


def test_scaling_sections_keys(tmp_path):
    sites = bench.scaling_sites(TINY, tmp_path)["scaling_sites"]
    assert [r["sites"] for r in sites["rows"]] == list(TINY.site_counts)
    assert all(r["seconds_per_version"] > 0 and r["values_per_s"] > 0 for r in sites["rows"])
    model = bench.scaling_model(TINY, tmp_path)["scaling_model"]
    (row,) = model["rows"]
    assert row["model"] == "small_cnn" and row["mode"] == "dense" and row["aggregator_seconds_per_version"] > 0
    # a memory budget too small for dense falls back to top-k
    small = bench.scaling_model(replace(TINY, memory_budget_bytes=1), tmp_path / "b")["scaling_model"]["rows"][0]
    assert small["mode"].startswith("topk")


def test_verdicts_markdown_and_files(tmp_path):
    result = {
        "machine": bench.machine(), "total_seconds": 1.0,
        "aggregator_fold_values_per_s": 4e5, "aggregator_floor_values_per_s": 8e6, "aggregator_vs_floor": 0.05,
        "aggregator_floor_same_units_values_per_s": 3e6, "plaintext_fp32_sum_values_per_s": 1e9,
        "wire_bytes_ratio_vs_dense_fp32": 3.8, "wire_default": {"ckks_preset": "n4096-q54", "topk_fraction": 0.5},
        "wire_table": [{"preset": "n4096-q54", "topk_fraction": 0.12, "blocks_sent": 3, "bytes": 10,
                        "ratio_vs_dense_fp32": 0.9}],
        "auc_table": [{"preset": "n4096-q54", "topk_fraction": 0.12, "blocks_sent": 3, "bytes": 10,
                       "ratio_vs_dense_fp32": 0.9, "auc_cost_points": 0.5},
                      {"preset": "n4096-q54", "topk_fraction": 0.5, "blocks_sent": 9, "bytes": 40,
                       "ratio_vs_dense_fp32": 3.8, "auc_cost_points": 0.1}],
        "site_overhead_fraction": 0.05, "shard_speedup_2": 1.4, "async_vs_sync_speedup": 1.8,
        "gpu_resnet50_training": {"measured": False, "reason": "not measured: no GPU machine was lent"},
    }
    result["verdicts"] = v = judge.verdicts(result)
    assert v["aggregator_vs_floor"]["met"] is False
    assert v["site_overhead_fraction"]["met"] is True
    assert v["shard_speedup_2"]["met"] is False
    assert v["wire_bytes_ratio_vs_dense_fp32"]["met"] is False
    assert v["wire_bytes_ratio_vs_dense_fp32"]["settings_meeting_goal"] == [("n4096-q54", 0.12)]
    j, m = report.write(result, tmp_path)
    data = json.loads(j.read_text())
    for key in ("aggregator_fold_values_per_s", "aggregator_floor_values_per_s", "plaintext_fp32_sum_values_per_s",
                "wire_bytes_ratio_vs_dense_fp32", "site_overhead_fraction", "shard_speedup_2",
                "async_vs_sync_speedup", "gpu_resnet50_training"):
        assert key in data
    md = m.read_text()
    assert "| figure | this run | goal | verdict |" in md and "no GPU machine was lent" in md
    assert any("two shards" in line for line in report.summary_lines(result))
    assert v["ckks_bytes_per_value"]["met"] is None  # not in this result: no verdict, not a pass


@pytest.mark.broker
def test_resnet50_section_reports_the_issue_keys(tmp_path, amqp_url):
    """benchmarks.resnet50 at a tiny size: the keys make bench adds to latest.json (issue 13 item 5)."""
    out = bench.resnet50_scale(lambda: amqp_url, tmp_path, params=TINY.resnet50_params)
    for key in ("ckks_bytes_per_value", "resnet50_update_bytes", "resnet50_site_build_seconds",
                "resnet50_fold_seconds", "aggregator_peak_rss_bytes"):
        assert out[key] and out[key] > 0, key
    assert out["ckks_bytes_per_value"] <= 7.1
    assert out["resnet50_update_bytes"] > 4 * TINY.resnet50_params  # ciphertexts are larger than float32
    v = judge.verdicts(out)
    assert v["ckks_bytes_per_value"]["met"] is True
    md = report.markdown({**out, "machine": bench.machine(), "verdicts": v})
    assert "Privacy at ResNet-50 scale" in md


@pytest.mark.broker
def test_broker_sections_keys(tmp_path, amqp_url):
    """fold end to end + floor, and the two-shard speedup, tiny, on the test broker's vhost."""
    urls = lambda: amqp_url  # noqa: E731  (the sections only need somewhere to publish)
    fold = bench.fold_end_to_end(TINY, urls, tmp_path)
    for key in ("aggregator_fold_values_per_s", "aggregator_floor_values_per_s", "plaintext_fp32_sum_values_per_s",
                "aggregator_vs_floor", "aggregator_floor_same_units_values_per_s"):
        assert fold[key] > 0
    shards = bench.shard_speedup(TINY, urls, tmp_path)
    assert shards["shard_speedup_2"] > 0 and len(shards["shard_workload"]["two_shards_seconds"]) == TINY.repeats


def test_signatures_section_keys(tmp_path):
    """Signature sizes and rates, the aggregator's verification share, the 100 x 3 audit chain."""
    out = bench.signature_costs(TINY, tmp_path, {"train_s": 2.0})
    sg = out["signatures"]
    assert (sg["ed25519_signature_bytes"], sg["mldsa65_signature_bytes"]) == (64, 3309)
    assert sg["hybrid_signature_bytes"] > 64 + 3309 and sg["mldsa65_public_key_bytes"] == 1952
    for key in ("ed25519_sign_per_s", "mldsa65_sign_per_s", "hybrid_sign_per_s", "hybrid_verify_per_s"):
        assert sg[key] > 0
    assert 0 < sg["hybrid_verify_share_of_engine"] and sg["site_sign_plus_verify_share_of_training"] > 0
    assert out["audit_verify_100x3_s"] > 0 and sg["audit_chain_bytes"] > 100 * sg["hybrid_signature_bytes"]
    md = report.markdown({**out, "machine": bench.machine(), "verdicts": judge.verdicts(out)})
    assert "hybrid Ed25519 + ML-DSA-65" in md and "audit verify, 100 versions x 3 sites" in md
