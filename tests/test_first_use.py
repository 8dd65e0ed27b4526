"""First use in a fresh process: model libraries imported and models built from several
threads at once, as the engine does (device thread loads, CPU pool loads processors).

transformers' and diffusers' lazy modules fail when two threads use them for the first
time together, so these tests run in new processes with empty model caches: the suite's
own process has long since imported everything, which would hide the race.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sunset.jpg"

# Five first uses at the same instant: processors on "CPU pool" threads, models on others.
RACE = textwrap.dedent(
    """
    import dataclasses, sys, threading, traceback
    from pathlib import Path
    from bot.config import load_settings
    from bot.wiring import build_tasks
    from core.types import AskRequest, CaptionRequest, MoodRequest, TagsRequest

    settings = load_settings(None, "tiny")
    engine = dataclasses.replace(settings.engine, device="cpu", model_cache=Path(sys.argv[1]))
    tasks = build_tasks(dataclasses.replace(settings, engine=engine),
                        ["caption", "tags", "mood", "vqa", "write"])
    image = Path(sys.argv[2]).read_bytes()
    first_uses = [
        lambda: tasks["caption"].preprocess(CaptionRequest(image)),
        lambda: tasks["tags"].load(),
        lambda: tasks["mood"].preprocess(MoodRequest(image)),
        lambda: tasks["vqa"].preprocess(AskRequest(image, "what is it?")),
        lambda: tasks["write"].load(),
    ]
    start = threading.Barrier(len(first_uses))
    failures = []

    def use(first_use):
        start.wait()
        try:
            first_use()
        except Exception:
            failures.append(traceback.format_exc())

    threads = [threading.Thread(target=use, args=(f,)) for f in first_uses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("\\n".join(failures), file=sys.stderr)
    print(f"{len(failures)} failed")
    """
)


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    environment["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_first_loads_from_several_threads_at_once_all_succeed(tmp_path: Path) -> None:
    result = run(["-c", RACE, str(tmp_path / "models"), str(EXAMPLE)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("0 failed"), result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tags", "write"])
def test_a_fresh_cli_run_with_an_empty_model_cache_gives_output(
    command: str, tmp_path: Path
) -> None:
    """The two commands a new user's first runs failed in (the mood model, the writer)."""
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    config.write_text('profile = "tiny"\n[engine]\nmodel_cache = "models"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run(["-m", "bot", command, str(EXAMPLE), "--config", str(config)], cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not" not in result.stderr.lower()
    assert "traceback" not in result.stderr.lower()
    assert result.stdout.strip()
    # A relative path in a config file means beside that file, wherever the command ran.
    assert (config.parent / "models").is_dir()
    assert list(elsewhere.iterdir()) == []
