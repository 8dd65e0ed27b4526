"""The command line, in-process, with the tiny profile and the real OCR weights."""

from __future__ import annotations

import csv
import http.server
import io
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.cli import main
from tests import imagekit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "config.toml"
    path.write_text(
        f'profile = "tiny"\n[engine]\ndevice = "cpu"\nmodel_cache = "{folder / "models"}"\n'
    )
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """The shipped examples plus a broken upload and a non-image file."""
    folder = tmp_path / "photos"
    shutil.copytree(ROOT / "examples", folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.PNG").write_bytes(imagekit.not_an_image())
    (folder / "readme.txt").write_text("not an image and not an image extension")
    return folder


GOOD = ["bakery_sign.png", "fruit_bowl.png", "posters/jazz_night.JPG", "sunset.jpg"]


def test_caption_folder_writes_name_caption_lines(
    config: Path, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["caption", str(photos), "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == GOOD
    assert all(line.split(": ", 1)[1] for line in lines)
    assert "empty.jpg: " in err and "empty (0 bytes)" in err
    assert "notes.PNG: " in err and "not an image" in err
    assert "readme.txt" not in out + err
    assert "6/6 images, 2 failed" in err  # the progress bar


def test_jsonl_and_csv_carry_every_image_and_the_errors(
    config: Path, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["caption", str(photos), "--config", str(config), "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 6
    errors = {r["file"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {"empty.jpg", "notes.PNG"}
    assert all(isinstance(r["caption"], str) for r in records if "error" not in r)

    assert main(["caption", str(photos), "--config", str(config), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["file"] for r in rows] == [
        "bakery_sign.png",
        "empty.jpg",
        "fruit_bowl.png",
        "notes.PNG",
        "posters/jazz_night.JPG",
        "sunset.jpg",
    ]
    assert {r["file"] for r in rows if r["error"]} == {"empty.jpg", "notes.PNG"}


def test_out_and_resume_skip_what_is_done(config: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "captions.txt"
    single = photos / "sunset.jpg"
    assert main(["caption", str(single), "--config", str(config), "--out", str(out)]) == 0
    assert out.read_text().startswith("sunset.jpg: ")
    assert (
        main(["caption", str(photos), "--config", str(config), "--out", str(out), "--resume"]) == 0
    )
    names = [line.split(": ", 1)[0] for line in out.read_text().splitlines()]
    assert names.count("sunset.jpg") == 1
    assert sorted(names) == sorted(GOOD)


def test_nothing_processable_exits_non_zero(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(imagekit.truncated_jpeg())
    assert main(["caption", str(bad), str(tmp_path / "missing"), "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "missing: no such file or folder" in err
    assert "a.jpg: " in err and "truncated" in err


def test_ocr_reads_the_sign(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "ocr",
                str(ROOT / "examples" / "bakery_sign.png"),
                "--config",
                str(config),
                "--format",
                "jsonl",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert "GRAND OPENING" in record["text"]
    assert record["has_text"] is True
    assert all(0 <= line["confidence"] <= 1 and len(line["box"]) == 4 for line in record["lines"])


def test_tags_runs_caption_ocr_and_tags(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = ROOT / "examples" / "posters" / "jazz_night.JPG"
    assert main(["tags", str(image), "--config", str(config), "--format", "jsonl"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert "JAZZ" in record["ocr_text"]
    assert record["hashtags"] and all(tag.startswith("#") for tag in record["hashtags"])


def test_a_config_error_exits_2_with_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[engine]\nmax_in_flite = 3\n")
    assert main(["caption", str(ROOT / "examples"), "--config", str(path)]) == 2
    assert "engine.max_in_flite" in capsys.readouterr().err


def test_resume_redoes_failed_rows_and_survives_a_torn_last_line(
    config: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "captions.jsonl"
    out.write_text(
        '{"file": "sunset.jpg", "caption": "Done before."}\n'
        '{"file": "fruit_bowl.png", "error": "The bot is busy right now"}\n'
        '{"file": "bakery_sign.png", "capt'
    )
    argv = ["caption", str(photos), "--config", str(config), "--format", "jsonl"]
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    lines = out.read_text().splitlines()
    assert lines[1].endswith('"The bot is busy right now"}')  # the torn line was cut
    records = [json.loads(line) for line in lines[2:]]
    redone = {r["file"] for r in records if "error" not in r}
    assert {"fruit_bowl.png", "bakery_sign.png"} <= redone
    assert "sunset.jpg" not in {r["file"] for r in records}


def test_an_output_folder_is_a_one_line_error(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["caption", str(ROOT / "examples" / "sunset.jpg"), "--config", str(config)]
    assert main([*argv, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)


def test_a_small_in_flight_bound_never_fails_images(
    tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    tight = tmp_path / "tight.toml"
    tight.write_text(config.read_text().replace("[engine]", "[engine]\nmax_in_flight = 3"))
    assert main(["tags", str(photos), "--config", str(tight), "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert not [r for r in records if "busy" in r.get("error", "")]


@pytest.fixture
def image_server() -> Iterator[str]:
    """A web server on 127.0.0.1 (in a thread: the CLI runs its own event loop) serving
    the bakery sign at /sign.png."""
    sign = (ROOT / "examples" / "bakery_sign.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/sign.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(sign)))
            self.end_headers()
            self.wfile.write(sign)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_links_are_taken_beside_paths_and_private_ones_refused(
    config: Path, image_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sign = f"{image_server}/sign.png"
    # Loopback is refused unless the operator allow-lists it.
    assert main(["ocr", sign, "--config", str(config)]) == 1
    assert "private or local network" in capsys.readouterr().err
    allowing = tmp_path / "config.toml"
    allowing.write_text(config.read_text() + '[links]\nallow_private = ["127.0.0.1"]\n')
    photo = ROOT / "examples" / "sunset.jpg"
    missing = f"{image_server}/missing.png"
    assert main(["ocr", sign, str(photo), missing, "--config", str(allowing)]) == 0
    out, err = capsys.readouterr()
    assert f"{sign}: GRAND OPENING" in out
    assert "sunset.jpg: " in out
    assert f"{missing}: " in err and "404" in err
