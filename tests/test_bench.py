"""The benchmarks run end to end and report every documented key (figures are not asserted:
timings on shared machines are measured by running the benchmark, not by unit tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.cli import main

CAPTION_KEYS = {
    "seed_loop_images_per_s",
    "engine_fp32_images_per_s",
    "engine_images_per_s",
    "speedup",
    "speedup_fp32",
    "loop_lag_p99_ms",
    "precision",
    "batch_size",
    "plain_batched_images_per_s",
    "plain_batched_fp32_images_per_s",
    "efficiency",
    "efficiency_fp32",
    "engine_idle_share",
    "engine_idle_share_fp32",
}


def test_bench_caption_reports_side_by_side_rates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nmodel_cache = "{tmp_path / "models"}"\n')
    argv = ["bench", "caption", "--json", "--images", "4", "--tokens", "3"]
    assert main([*argv, "--model", "tiny/blip-caption", "--config", str(config)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= CAPTION_KEYS
    assert result["seed_loop_images_per_s"] > 0
    assert result["engine_images_per_s"] > 0
    assert result["speedup"] == pytest.approx(
        result["engine_images_per_s"] / result["seed_loop_images_per_s"], rel=0.02
    )
    assert result["precision"] in {"bf16", "int8"}
    assert 1 <= result["batch_size"] <= 8
    # Reported to two decimals, from rates reported to three.
    assert result["efficiency"] == pytest.approx(
        result["engine_images_per_s"] / result["plain_batched_images_per_s"], abs=0.01
    )
    assert 0 <= result["engine_idle_share"] < 1 and 0 <= result["engine_idle_share_fp32"] < 1


def test_bench_caption_on_ray_reports_each_replica_count_beside_the_local_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nmodel_cache = "{tmp_path / "models"}"\n')
    argv = ["bench", "caption", "--json", "--images", "4", "--tokens", "3", "--backend", "ray"]
    argv += ["--replicas", "1,2", "--model", "tiny/blip-caption", "--config", str(config)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    assert result["local_images_per_s"] > 0
    assert set(result["ray"]) == {"1", "2"}
    for run in result["ray"].values():
        assert run["images_per_s"] > 0 and run["replica_batch_size"] >= 1
        assert run["vs_local"] == pytest.approx(
            run["images_per_s"] / result["local_images_per_s"], abs=0.02
        )


def test_bench_refuses_a_ray_backend_for_what_it_does_not_measure_on_ray() -> None:
    with pytest.raises(SystemExit, match="bench caption only"):
        main(["bench", "vqa", "--backend", "ray"])
    with pytest.raises(SystemExit, match="replica counts"):
        main(["bench", "caption", "--backend", "ray", "--replicas", "0,x"])


def test_bench_overhead_pushes_items_through_the_engine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "overhead", "--json", "--items", "2000"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["items"] == 2000
    assert result["items_per_s"] > 0
    assert 0 < result["overhead_p50_ms"] <= result["overhead_p99_ms"]


def test_bench_telegram_answers_everyone_who_posts_at_once(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nmodel_cache = "{model_cache}"\n')
    assert main(["bench", "telegram", "--json", "--users", "4", "--config", str(config)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["users"] == 4
    assert result["answered"] == 4 and result["answered_pct"] == 100.0
    for wait in ("first_message", "first_part", "full_answer"):
        assert 0 < result[wait]["p50_s"] <= result[wait]["p95_s"] <= result[wait]["max_s"]
    assert result["first_message"]["max_s"] <= result["full_answer"]["max_s"]
    assert result["max_messages_per_chat_in_1s"] == 1
    assert result["bot_errors_logged"] == 0 and result["bot_exit_code"] == 0


def test_bench_discord_answers_every_member_who_posts_at_once(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nmodel_cache = "{model_cache}"\n')
    arguments = ["bench", "discord", "--json", "--users", "3", "--channels", "2"]
    assert main([*arguments, "--config", str(config)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["users"], result["channels"]) == (3, 2)
    assert result["answered"] == 3 and result["answered_pct"] == 100.0
    for wait in ("first_message", "first_part", "full_answer"):
        assert 0 < result[wait]["p50_s"] <= result[wait]["p95_s"] <= result[wait]["max_s"]
    assert result["first_message"]["max_s"] <= result["full_answer"]["max_s"]
    assert result["bot_errors"] == []


def test_bench_describe_times_the_first_part_with_and_without_the_cpu_lanes(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nmodel_cache = "{model_cache}"\n')
    arguments = ["bench", "describe", "--json", "--users", "3"]
    assert main([*arguments, "--config", str(config)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["users"], result["profile"], result["answered"]) == (3, "tiny", 3)
    for run in (result, result["one_device_thread"]):
        first, full = run["first_part"], run["full_answer"]
        assert 0 < first["p50_s"] <= first["p95_s"] <= first["max_s"] <= full["max_s"]


def test_forward_time_counts_overlaps_once_and_only_inside_the_run() -> None:
    from bot.bench import _covered_s

    spans = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (9.0, 12.0), (-3.0, -1.0)]
    # [0.5, 3] from the first two (overlapping), [5, 6], and [9, 10] clipped at the end.
    assert _covered_s(spans, 0.5, 10.0) == pytest.approx(2.5 + 1.0 + 1.0)
    assert _covered_s([], 0.0, 1.0) == 0.0
