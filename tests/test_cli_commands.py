"""``ask``, ``write``, ``reimagine`` and ``imagine`` on the command line, tiny profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from bot.cli import main

ROOT = Path(__file__).resolve().parents[1]
SUNSET = ROOT / "examples" / "sunset.jpg"  # 480x320
SIGN = ROOT / "examples" / "bakery_sign.png"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    path = tmp_path_factory.mktemp("cli") / "config.toml"
    path.write_text(f'profile = "tiny"\n[engine]\ndevice = "cpu"\nmodel_cache = "{model_cache}"\n')
    return path


def test_ask_answers_a_question(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["ask", str(SUNSET), "what colour is the sky?", "--config", str(config)]
    assert main([*argv, "--format", "jsonl"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["question"] == "what colour is the sky?"
    assert record["answer"].strip()


def test_ask_refuses_an_empty_question_with_a_reason(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ask", str(SUNSET), "   ", "--config", str(config)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "question is empty" in last.lower()


def test_write_streams_a_draft_and_prints_the_caption(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["write", str(SIGN), "--author", "@bakery", "--platform", "Instagram"]
    assert main([*argv, "--config", str(config), "--format", "jsonl"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert "GRAND OPENING" in record["ocr_text"]
    assert record["hashtags"] and all(tag.startswith("#") for tag in record["hashtags"])
    assert record["social"].strip()
    assert len(record["social"]) <= 280
    assert captured.err.strip()  # the streamed draft


def test_reimagine_writes_a_png_that_keeps_the_aspect_ratio(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new.png"
    argv = ["reimagine", str(SUNSET), "a frozen lake", "--out", str(out), "--seed", "7"]
    assert main([*argv, "--strength", "0.5", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "seed 7" in captured.out
    assert "step " in captured.err
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width % 8 == 0 and height % 8 == 0
    assert width / height == pytest.approx(480 / 320, rel=0.1)


def test_imagine_is_reproducible_with_a_seed(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for out in (first, second):
        argv = ["imagine", "a lighthouse", "--out", str(out), "--seed", "3", "--steps", "2"]
        assert main([*argv, "--config", str(config)]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert "2 steps, seed 3" in capsys.readouterr().out


def test_out_of_bounds_steps_are_refused(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["imagine", "a lighthouse", "--out", str(tmp_path / "x.png"), "--steps", "999"]
    assert main([*argv, "--config", str(config)]) == 1
    assert "steps must be between" in capsys.readouterr().err.lower()
    assert not (tmp_path / "x.png").exists()
