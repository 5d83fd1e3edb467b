"""The bad-input corpus (tests/bad_inputs.py) through the running app, as a visitor's browser would send
it (gradio_client): every case gets its own clear message, photos the app can fix are kept, one bad
photo never drops the good ones, and the app answers the next visitor afterwards (after each case and
after the whole corpus). Runs on the tiny random pipeline: the checks are the app's, not the model's."""

import re

import pytest

from tests.bad_inputs import CASES, EXAMPLE_FACES, make_case
from tests.conftest import launched_app

# a refusal must say what to do next
NEXT_STEP = ("upload", "use ", "add ", "convert", "export", "save", "unzip", "fine-tuned from")
TRAIN_DEFAULTS = (20, 4, 3e-3, 0, False, False, 1.0, "none", 0.9)


@pytest.fixture(scope="module")
def app(tiny_engine):
    yield from launched_app(tiny_engine)


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    c = Client(app.local_url, verbose=False, download_files=False)
    yield c
    c.close()


def still_serving(client):
    images = client.predict(0, 1, 5, 1.0, api_name="/sample")
    assert len(images) == 1


def said(message, paths, case):
    """The message without the uploaded file names (a name must not be what satisfies a check)."""
    assert message and message.strip() not in ("Error", "error"), f"{case.name}: a bare error"
    text = message
    for p in paths:
        text = text.replace(p.name, "<file>")
    text = text.lower()
    for word in case.expect:
        assert word.lower() in text, f"{case.name}: {word!r} not in {message!r}"
    return text


def own_names_only(message, paths):
    """A refusal quotes the visitor's own file name, never the app's private copy's name."""
    assert not re.search(r"[0-9a-f]{16}-", message), message
    for quoted in re.findall(r"The file '([^']+)'", message):
        assert quoted in {p.name for p in paths}, message


def error_of(call) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_message_and_the_app_keeps_serving(case, client, app, tiny_engine, tmp_path):
    from gradio_client import handle_file

    made = make_case(case, tmp_path, tiny_engine.pipe)
    if case.kind in ("train", "sample"):
        if case.kind == "train":  # three usable photos first: the settings are what is refused
            crops, _ = client.predict([handle_file(str(p)) for p in EXAMPLE_FACES[:3]], api_name="/ingest")
            assert len(crops) == 3
        said(error_of(lambda: client.predict(*made, api_name=f"/{case.kind}")), [], case)
    elif case.kind == "oversize":
        import httpx

        with open(made[0], "rb") as f:
            r = httpx.post(
                f"{app.local_url.rstrip('/')}/gradio_api/upload", files=[("files", (made[0].name, f))], timeout=120
            )
        assert r.status_code == 413
        said(r.text, made, case)
    elif case.kind.startswith("lora"):
        status, attack, naive, fx, refs, table = client.predict(handle_file(str(made[0])), 80, None, api_name="/attack")
        text = said(status, made, case)
        own_names_only(status, made)
        if case.kind == "lora":
            assert text.startswith("**this file was refused.**") and attack == naive == fx == [] and table == ""
            assert any(w in text for w in NEXT_STEP + ("expected", "must", "accepted")), status
        else:
            assert len(naive) == len(fx) == 4
    else:
        crops, report = client.predict([handle_file(str(p)) for p in made], api_name="/ingest")
        text = said(report, made, case)
        assert len(crops) == case.usable, report
        if case.usable == 0:
            assert "left out" in text and any(w in text.split("left out", 1)[1] for w in NEXT_STEP), report
        if case.usable < 3:  # too few photos to train: the Train button says so
            msg = error_of(lambda: client.predict(*TRAIN_DEFAULTS, api_name="/train"))
            assert f"Add at least 3 usable photos of one face first (you have {case.usable})" in msg
    still_serving(client)


def test_the_app_answers_after_the_whole_corpus(app, tmp_path):
    """A fresh visitor, after every case above: photos in, a fine-tune out."""
    from gradio_client import Client, handle_file

    c = Client(app.local_url, verbose=False, download_files=False)
    crops, report = c.predict([handle_file(str(p)) for p in EXAMPLE_FACES[:3]], api_name="/ingest")
    assert "3 usable photos" in report
    status, *_ = c.predict(*TRAIN_DEFAULTS, api_name="/train")
    assert "Done: 20 steps" in status
    c.close()


def test_the_corpus_covers_every_case_of_the_probe():
    """Issue 17's list: each of these is a case of the corpus."""
    names = {c.name for c in CASES}
    wanted = {
        "truncated-png",
        "48-bit-png",
        "palette-with-transparency",
        "animated-webp-face-in-frame-1",
        "animated-webp-face-only-in-frame-2",
        "avif",
        "multi-page-tiff-face-on-page-2",
        "lying-exif",
        "strip-20000x20",
        "three-faces",
        "lab-tiff",
        "float-tiff",
        "malformed-exif",
        "20-px-face",
        "fully-transparent",
        "header-length-2-to-the-60",
        "overlapping-offsets",
        "dtype-byte-length-mismatch",
        "2-to-the-40-elements",
        "ten-thousand-tensors",
        "infinite-weights",
        "rank-300",
        "sd15-layout-peft-naming",
        "ten-megabyte-metadata",
        "json-array-header",
        "eight-byte-file",
        "text-encoder-only",
        "rank-0",
        "negative-alpha",
        "f16-bf16-mix",
        "rank-256",
        "duplicate-json-keys",
        "transposed-shapes",
        "thin-strip-30000x16",
        "png-text-over-pillows-limit",
        "png-icc-over-pillows-limit",
        "deeply-nested-header",
        "deeply-nested-adapter-metadata",
        "leaklab-steps-2-to-the-63",
        "leaklab-steps-10-to-the-4000",
        "weights-3e38",
        "alpha-1e308",
        "seed-1e30",
        "drawn-face-png",
    }
    assert wanted <= names, wanted - names
    assert len(CASES) >= 75
