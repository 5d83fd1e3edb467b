"""The bad-input corpus (tests/bad_inputs.py) through the running app, as a visitor's browser would send
it (gradio_client): every case gets its own clear message, photos the app can fix are kept, and the app
answers the next visitor afterwards. Runs on the tiny random pipeline: the checks are the app's, not the
model's."""

import pytest

from tests.bad_inputs import CASES, make_case
from tests.conftest import launched_app

# a refusal must say what to do next
NEXT_STEP = ("upload", "use ", "add ", "convert", "export", "save", "unzip", "fine-tuned from")


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
    text = message
    for p in paths:
        text = text.replace(p.name, "<file>")
    text = text.lower()
    for word in case.expect:
        assert word.lower() in text, f"{case.name}: {word!r} not in {message!r}"
    return text


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_message_and_the_app_keeps_serving(case, client, tiny_engine, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    paths = make_case(case, tmp_path, tiny_engine.pipe)
    if case.kind == "lora":
        status, attack, naive, fx, refs, table = client.predict(handle_file(str(paths[0])), 80, None, api_name="/attack")
        text = said(status, paths, case)
        assert text.startswith("**this file was refused.**") and attack == naive == fx == [] and table == ""
        assert any(w in text for w in NEXT_STEP + ("expected", "must", "accepted")), status
    else:
        crops, report = client.predict([handle_file(str(p)) for p in paths], api_name="/ingest")
        text = said(report, paths, case)
        assert len(crops) == case.usable
        if case.usable == 0:
            assert "left out" in text and any(w in text.split("left out", 1)[1] for w in NEXT_STEP), report
        if case.usable < 3:  # too few photos to train: the Train button says so
            with pytest.raises(AppError, match=f"Add at least 3 usable photos of one face first \\(you have {case.usable}\\)"):
                client.predict(20, 4, 3e-3, 0, False, api_name="/train")
    still_serving(client)
