"""``python -m bot eval``: captions of a folder scored against COCO references, tiny profile."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from bot.evaluate import (
    METRICS,
    ModelCaptions,
    add_eval_arguments,
    clip_scores,
    clipscore,
    find_images,
    load_references,
    ptb_tokenize,
    run_eval,
    score_captions,
)
from core.settings import EngineSettings

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "eval"
REFERENCES = FIXTURE / "captions.json"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    path = tmp_path_factory.mktemp("eval") / "config.toml"
    path.write_text(f'profile = "tiny"\n[engine]\ndevice = "cpu"\nmodel_cache = "{model_cache}"\n')
    return path


def eval_args(*argv: str) -> argparse.Namespace:
    """The arguments as ``python -m bot eval ...`` parses them."""
    parser = argparse.ArgumentParser(prog="python -m bot")
    commands = parser.add_subparsers(dest="command", required=True)
    add_eval_arguments(commands.add_parser("eval"))
    return parser.parse_args(["eval", *argv])


def references_by_image() -> dict[str, list[str]]:
    """The fixture's captions per file name, read here without the code under test."""
    document = json.loads(REFERENCES.read_text())
    names = {image["id"]: image["file_name"] for image in document["images"]}
    captions: dict[str, list[str]] = {}
    for annotation in document["annotations"]:
        captions.setdefault(names[annotation["image_id"]], []).append(annotation["caption"])
    return captions


def pycocoevalcap_scores(captions: dict[str, str]) -> dict[str, float]:
    references = references_by_image()
    gts = {name: [ptb_tokenize(text) for text in references[name]] for name in captions}
    res = {name: [ptb_tokenize(text)] for name, text in captions.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return dict(zip(METRICS, [*bleu, rouge_l, cider], strict=True))


@pytest.fixture(scope="module")
def two_models_json(config: Path, single_torch_thread: None) -> dict[str, Any]:
    """One ``--json`` run comparing two tiny captioners on the fixture."""
    argv = [str(FIXTURE), "--json", "--model", "tiny/vit-gpt2", "--model", "tiny/git"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_eval(eval_args(*argv, "--config", str(config))) == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


# -- the command on the fixture -------------------------------------------------------------


def test_table_has_every_metric_and_one_row_per_model(
    config: Path, single_torch_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(FIXTURE), "--model", "tiny/blip2-opt", "--model", "tiny/vit-gpt2"]
    assert run_eval(eval_args(*argv, "--config", str(config))) == 0
    captured = capsys.readouterr()
    header, *rows, note = captured.out.strip().splitlines()
    assert header.split() == ["model", "images", "failed", *METRICS]
    assert [row.split()[0] for row in rows] == ["tiny/blip2-opt", "tiny/vit-gpt2"]
    for row in rows:
        _, images, failed, *scores = row.split()
        assert images == "4"
        assert 0 <= int(failed) <= 4
        assert len(scores) == len(METRICS)
        assert all(float(score) >= 0.0 for score in scores)
    assert note.startswith("CLIPScore not computed")
    assert "random weights" in note
    # Progress on stderr, never on stdout.
    assert "4/4 images" in captured.err
    assert "4/4 images" not in captured.out


def test_json_gives_numbers_and_the_captions_per_model(two_models_json: dict[str, Any]) -> None:
    assert two_models_json["profile"] == "tiny"
    assert sorted(two_models_json["images"]) == sorted(references_by_image())
    assert [m["model"] for m in two_models_json["models"]] == ["tiny/vit-gpt2", "tiny/git"]
    for model in two_models_json["models"]:
        assert set(model["scores"]) == {*METRICS, "CLIPScore"}
        assert all(isinstance(model["scores"][metric], float) for metric in METRICS)
        assert model["scores"]["CLIPScore"] is None
        assert set(model["captions"]) == set(two_models_json["images"])
        assert set(model["failed"]) <= set(model["captions"])
    assert "random weights" in two_models_json["clipscore_note"]


def test_scores_equal_pycocoevalcaps_on_the_captions_of_the_run(
    two_models_json: dict[str, Any],
) -> None:
    for model in two_models_json["models"]:
        expected = pycocoevalcap_scores(model["captions"])
        for metric in METRICS:
            assert model["scores"][metric] == pytest.approx(expected[metric], abs=1e-12), metric


def test_the_default_model_is_the_profiles(
    config: Path, single_torch_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_eval(eval_args(str(FIXTURE), "--json", "--config", str(config))) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert [model["model"] for model in models] == ["tiny/blip2-opt"]


def test_a_clip_that_is_not_a_tiny_build_adds_a_clipscore_column(
    tmp_path: Path,
    model_cache: Path,
    single_torch_thread: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from core.tiny import resolve_model

    # Only tiny/ and random/ names count as random weights; the tiny CLIP's folder stands
    # in here for a real CLIP, which cannot be downloaded on these machines.
    clip_folder = resolve_model("tiny/clip", model_cache)
    config = tmp_path / "config.toml"
    config.write_text(
        f'profile = "tiny"\n[engine]\ndevice = "cpu"\nmodel_cache = "{model_cache}"\n'
        f'[profiles.tiny.mood]\nmodel = "{clip_folder}"\n'
    )
    assert run_eval(eval_args(str(FIXTURE), "--config", str(config))) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["model", "images", "failed", *METRICS, "CLIPScore"]
    assert 0.0 <= float(row.split()[-1]) <= 2.5


def test_an_image_that_does_not_decode_counts_as_an_empty_caption(
    tmp_path: Path,
    config: Path,
    single_torch_thread: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "images"
    shutil.copytree(FIXTURE, folder)
    (folder / "stripes.jpg").write_bytes(b"not a jpeg at all")
    assert run_eval(eval_args(str(folder), "--json", "--config", str(config))) == 0
    captured = capsys.readouterr()
    [model] = json.loads(captured.out)["models"]
    assert list(model["failed"]) == ["stripes.jpg"]
    assert model["captions"]["stripes.jpg"] == ""
    assert len(model["captions"]) == 4  # still scored on every image
    expected = pycocoevalcap_scores(model["captions"])
    assert [model["scores"][metric] for metric in METRICS] == pytest.approx(
        [expected[metric] for metric in METRICS], abs=1e-12
    )
    assert "stripes.jpg" in captured.err


def test_a_mood_model_that_is_not_clip_leaves_clipscore_out_with_the_reason(
    tmp_path: Path, model_cache: Path, single_torch_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from core.tiny import resolve_model

    captioner_folder = resolve_model("tiny/blip2-opt", model_cache)
    config = tmp_path / "config.toml"
    config.write_text(
        f'profile = "tiny"\n[engine]\ndevice = "cpu"\nmodel_cache = "{model_cache}"\n'
        f'[profiles.tiny.mood]\nmodel = "{captioner_folder}"\n'
    )
    assert run_eval(eval_args(str(FIXTURE), "--config", str(config))) == 0
    header, _, note = capsys.readouterr().out.strip().splitlines()
    assert "CLIPScore" not in header
    assert note.startswith("CLIPScore not computed:")
    assert "not a CLIP model" in note


# -- scoring ---------------------------------------------------------------------------------


def test_captions_equal_to_a_reference_score_as_pycocoevalcap_says() -> None:
    references = references_by_image()
    # One image gets one of its own references: n-grams that are rare elsewhere count.
    captions = {name: texts[0] for name, texts in references.items()}
    captions["stripes.jpg"] = "a red circle on a white background"
    scores = score_captions(load_references(REFERENCES), captions).named()
    expected = pycocoevalcap_scores(captions)
    assert scores == pytest.approx(expected, abs=1e-12)
    assert scores["CIDEr"] > 1.0
    assert 0.5 < scores["BLEU-4"] < 1.0
    assert 0.5 < scores["ROUGE-L"] < 1.0


def test_a_perfect_caption_set_scores_one_on_bleu_and_rouge() -> None:
    references = references_by_image()
    scores = score_captions(references, {name: texts[0] for name, texts in references.items()})
    assert scores.bleu == pytest.approx((1.0, 1.0, 1.0, 1.0), abs=1e-6)
    assert scores.rouge_l == pytest.approx(1.0)


def test_clipscore_is_two_and_a_half_times_the_positive_cosine() -> None:
    import torch

    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    texts = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [1.0, 3**0.5], [5.0, 0.0]])
    assert clipscore(images, texts).tolist() == pytest.approx([0.0, 0.0, 1.25, 2.5])


def test_clip_scores_average_the_images_and_count_a_failed_caption_as_zero(
    model_cache: Path, single_torch_thread: None
) -> None:
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from core.tiny import resolve_model

    images = find_images(FIXTURE)
    captions = {job.name: f"a drawing in {job.name}" for job in images}
    runs = [
        ModelCaptions("made", captions, {}),
        ModelCaptions("failed", dict.fromkeys(captions, ""), dict.fromkeys(captions, "x")),
    ]
    engine = EngineSettings(device="cpu", model_cache=model_cache)
    made, failed = clip_scores("tiny/clip", engine, images, runs)

    # The same figure through CLIPModel's own forward, which normalises its embeddings.
    folder = resolve_model("tiny/clip", model_cache)
    model, processor = AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    inputs = processor(
        text=[f"A photo depicts {captions[job.name]}" for job in images],
        images=[Image.open(FIXTURE / job.name).convert("RGB") for job in images],
        return_tensors="pt",
        padding=True,
    )
    with torch.inference_mode():
        output = model(**inputs)
    cosine = (output.image_embeds * output.text_embeds).sum(dim=-1)
    assert made == pytest.approx(float((2.5 * cosine.clamp(min=0)).mean()), abs=1e-5)
    assert 0.0 <= made <= 2.5
    assert failed == 0.0


# -- the tokenizer ---------------------------------------------------------------------------

# Inputs and what pycocoevalcap's PTBTokenizer (the Stanford CoreNLP 3.4.1 jar it ships,
# run with Java) returns for them once its punctuation is removed.
PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("The dog's ball, isn't it?  \"Yes!\" she said...", "the dog 's ball is n't it yes she said"),
    (
        "Two (2) cats [sitting] on a couch; one is black-and-white -- the other isn't.",
        "two -lrb- 2 -rrb- cats -lsb- sitting -rsb- on a couch one is black-and-white the "
        "other is n't",
    ),
    (
        "I'm sure they're here. We've seen 'em, you'll see: he'd go & can't stop!!",
        "i 'm sure they 're here we 've seen 'em you 'll see he 'd go & ca n't stop !!",
    ),
    (
        "A U.S. flag and Mr. Smith at 3.5 p.m. with $5.00, 50% off, 1,000 people.",
        "a u.s. flag and mr. smith at 3.5 p.m. with $ 5.00 50 % off 1,000 people",
    ),
    ("It’s a “fancy” car — really… the kids' toys.", "it 's a fancy car really the kids toys"),
    ("  Leading spaces and TRAILING CAPS?!  ", "leading spaces and trailing caps ?!"),
    ("A bathroom with a toilet,sink and shower .", "a bathroom with a toilet sink and shower"),
    ("A photo of the letter A.", "a photo of the letter a."),
    ("", ""),
]


@pytest.mark.parametrize(("text", "tokens"), PTB_CASES)
def test_tokenizer_gives_what_ptbtokenizer_gives(text: str, tokens: str) -> None:
    assert ptb_tokenize(text) == tokens


@pytest.mark.skipif(shutil.which("java") is None, reason="no Java to run Stanford's tokenizer")
def test_tokenizer_agrees_with_stanford_ptbtokenizer_on_the_references() -> None:
    texts = [caption for captions in references_by_image().values() for caption in captions]
    texts += [text for text, _ in PTB_CASES if text.strip()]
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer"]
    java = subprocess.run(
        [*command, "-preserveLines", "-lowerCase"],
        input="\n".join(texts),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    expected = [
        " ".join(t for t in line.rstrip().split(" ") if t not in ptbtokenizer.PUNCTUATIONS)
        for line in java
    ]
    assert [ptb_tokenize(text) for text in texts] == expected


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read the references"),
        ("{not json", "not valid JSON"),
        ('{"images": []}', "not in COCO's caption format"),
        ('{"images": [{"id": 1}], "annotations": []}', 'needs an "id" and a "file_name"'),
        (
            '{"images": [{"id": 1, "file_name": "red_circle.png"}],'
            ' "annotations": [{"image_id": 2, "caption": "a dot"}]}',
            "image id 2, which is not",
        ),
        (
            '{"images": [{"id": 1, "file_name": "red_circle.png"}],'
            ' "annotations": [{"image_id": 1, "caption": ""}]}',
            'non-empty "caption"',
        ),
        (
            '{"images": [{"id": 1, "file_name": "elsewhere.png"}],'
            ' "annotations": [{"image_id": 1, "caption": "a dot"}]}',
            "none of the 4 images",
        ),
    ],
)
def test_bad_references_are_refused_in_one_line_with_status_2(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    reason: str,
) -> None:
    references = tmp_path / "captions.json"
    if content is not None:
        references.write_text(content)
    argv = [str(FIXTURE), "--references", str(references), "--config", str(config)]
    assert run_eval(eval_args(*argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [error] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert reason in error
    assert "Traceback" not in captured.err


def test_a_folder_without_images_is_refused_with_status_2(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "captions.json").write_text(REFERENCES.read_text())
    (tmp_path / "notes.txt").write_text("not an image")
    assert run_eval(eval_args(str(tmp_path), "--config", str(config))) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [error] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: {tmp_path} holds no images")


def test_a_model_named_twice_is_refused(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(FIXTURE), "--model", "tiny/git", "--model", "tiny/git", "--config", str(config)]
    assert run_eval(eval_args(*argv)) == 2
    assert "given more than once" in capsys.readouterr().err


def test_a_model_that_cannot_be_loaded_stops_the_run_with_status_1(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(FIXTURE), "--model", "tiny/no-such-model", "--config", str(config)]
    assert run_eval(eval_args(*argv)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: caption model tiny/no-such-model cannot be loaded" in captured.err


def test_references_load_by_file_name() -> None:
    references = load_references(REFERENCES)
    assert sorted(references) == sorted(job.name for job in find_images(FIXTURE))
    assert all(2 <= len(captions) <= 5 for captions in references.values())
