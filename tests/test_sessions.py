"""Sessions and privacy, through gradio_client on the app built on the tiny random pipeline: two
concurrent visitors never see each other's photos or LoRAs; a visitor's files live in their own
session dir, are served from there (never copied into Gradio's cache) and are gone from disk once the
session closes or times out; uploaded photos are deleted once read and never logged."""

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.bad_inputs import private_photos
from tests.conftest import launched_app
from ui import session as sess


@pytest.fixture(scope="module")
def gradio_cache(tmp_path_factory, monkeypatch_module):
    """Gradio's cache and upload folder of this module's app (a private one, to look into)."""
    cache = tmp_path_factory.mktemp("gradio_cache")
    monkeypatch_module.setenv("GRADIO_TEMP_DIR", str(cache))
    monkeypatch_module.setenv("GRADIO_HEARTBEAT_INTERVAL", "1")  # a closed client is noticed within a second
    return cache


@pytest.fixture(scope="module")
def app_url(gradio_cache, tiny_engine):
    for demo in launched_app(tiny_engine):
        yield demo.local_url


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)  # server-side paths, nothing copied client-side


def server_path(item) -> Path:
    """The server's file behind a gallery item / file output of a client that does not download."""
    if isinstance(item, dict) and "image" in item:
        item = item["image"]
    if isinstance(item, dict):
        item = item["path"]
    return Path(item)


def session_dir(path: Path) -> Path:
    root = sess.SESSION_ROOT.resolve()
    path = path.resolve()
    assert root in path.parents, f"{path} is not in a session dir"
    return root / path.relative_to(root).parts[0]


def files_in(folder):
    """Files with content under ``folder`` (Gradio's upload handler leaves empty spool files behind)."""
    return {p for p in Path(folder).rglob("*") if p.is_file() and p.stat().st_size}


def no_new_files(folder, before, within: float = 30.0) -> bool:
    """Whether every file with content added under ``folder`` since ``before`` is gone within ``within``
    seconds (the spare link a byte-identical twin may need lives a few seconds, ui.uploads)."""
    deadline = time.monotonic() + within
    while files_in(folder) - before and time.monotonic() < deadline:
        time.sleep(0.5)
    left = files_in(folder) - before
    assert not left, sorted(str(p) for p in left)
    return True


def ingest_and_train(c, photos, steps=20):  # the slider's minimum
    from gradio_client import handle_file

    crops, report = c.predict([handle_file(str(p)) for p in photos], api_name="/ingest")
    status, _, previews, score, lora, *_ = c.predict(steps, 4, 3e-3, 0, False, api_name="/train")
    return crops, report, status, previews if isinstance(previews, list) else [], lora  # (the last update may skip it)


def test_two_concurrent_sessions_never_see_each_other(app_url, gradio_cache, tmp_path):
    from gradio_client.exceptions import AppError

    before = files_in(gradio_cache)
    photos = {"a": private_photos(tmp_path, 0, tag="a"), "b": private_photos(tmp_path, 1, tag="b")}
    clients = {k: client(app_url) for k in photos}
    out = {}

    def visit(k):
        out[k] = ingest_and_train(clients[k], photos[k])

    threads = [threading.Thread(target=visit, args=(k,)) for k in photos]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(out) == {"a", "b"}
    dirs = {}
    for k, (crops, report, status, previews, lora) in out.items():
        assert len(crops) == 3 and "3 usable photos" in report and "Done: 20 steps" in status
        shown = [server_path(c) for c in crops + previews] + [server_path(lora)]
        dirs[k] = {session_dir(p) for p in shown}
        assert len(dirs[k]) == 1  # every file a visitor sees lies in their own session dir
    assert dirs["a"].isdisjoint(dirs["b"])
    crops_a = [np.asarray(Image.open(server_path(c))) for c in out["a"][0]]
    crops_b = [np.asarray(Image.open(server_path(c))) for c in out["b"][0]]
    assert all(not np.array_equal(x, y) for x in crops_a for y in crops_b)  # each sees only their own faces
    assert server_path(out["a"][4]) != server_path(out["b"][4])

    # b's "attack my LoRA" scores against b's photos only; a third visitor has no LoRA to attack
    status, *_, refs, table = clients["b"].predict(api_name="/attack_mine")
    assert "Attacked your LoRA" in status
    assert [np.asarray(Image.open(server_path(r))).tolist() for r in refs] == [c.tolist() for c in crops_b]
    with pytest.raises(AppError, match="not fine-tuned a LoRA in this session"):
        client(app_url).predict(api_name="/attack_mine")

    # nothing of either visitor was left in Gradio's cache: uploads deleted once read, outputs served from session dirs
    assert no_new_files(gradio_cache, before)
    for c in clients.values():
        c.close()


def test_byte_identical_uploads_at_the_same_moment_both_work(app_url, gradio_cache, tmp_path):
    """Gradio stores both uploads at one content-addressed path; the first handler deletes it, the
    second still gets its photos (ui.uploads), and no copy is left in Gradio's cache."""
    from gradio_client import handle_file

    before = files_in(gradio_cache)
    photos = private_photos(tmp_path, 0, tag="twin")  # both visitors upload these very files
    visitors = [client(app_url) for _ in range(4)]
    out = {}
    start = threading.Barrier(len(visitors))

    def visit(i):
        start.wait()
        out[i] = visitors[i].predict([handle_file(str(p)) for p in photos], api_name="/ingest")

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(len(visitors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(out) == set(range(len(visitors)))
    for crops, report in out.values():
        assert len(crops) == 3 and "3 usable photos" in report, report
    assert len({session_dir(server_path(crops[0])) for crops, _ in out.values()}) == len(visitors)
    assert no_new_files(gradio_cache, before)
    for c in visitors:
        c.close()


def test_closing_a_session_deletes_its_files(app_url, tmp_path):
    c = client(app_url)
    crops, report, status, previews, lora = ingest_and_train(c, private_photos(tmp_path, 0, tag="close"))
    folder = session_dir(server_path(lora))
    assert server_path(lora).is_file() and all(server_path(x).is_file() for x in crops)
    c.close()  # the browser tab closes: its heartbeat ends, the app's unload handler runs
    deadline = time.monotonic() + 20
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists()
    assert not any(server_path(x).exists() for x in crops + previews)
    # the app keeps serving other visitors
    assert len(client(app_url).predict(0, 1, 5, 1.0, api_name="/sample")) == 1


def test_photos_are_never_logged(app_url, tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    photos = private_photos(tmp_path, 1, tag="log")
    c = client(app_url)
    ingest_and_train(c, photos)
    c.close()
    out, err = capfd.readouterr()
    text = out + err + "\n".join(r.getMessage() for r in caplog.records)
    for p in photos:
        assert p.stem not in text
    assert "leaklab-session-" not in text


def test_time_out_sweep_closes_idle_sessions_and_leftover_dirs():
    idle, busy = sess.VisitorSession(), sess.VisitorSession()
    idle.crops.append(np.zeros((4, 4, 3), np.uint8))
    (idle.dir / "lora.safetensors").write_bytes(b"x")
    idle.last_used -= sess.SESSION_TTL + 1
    leftover = sess.SESSION_ROOT / "leaklab-session-from-an-old-server"
    leftover.mkdir(parents=True, exist_ok=True)
    old = time.time() - sess.SESSION_TTL - 60
    os.utime(leftover, (old, old))
    try:
        assert sess.sweep() >= 2
        assert idle.closed and not idle.crops and not leftover.exists()
        assert not busy.closed and sess.ensure(busy) is busy
        assert sess.ensure(idle) is not idle  # a closed session is replaced by a fresh one
    finally:
        busy.close()


def test_media_writes_images_into_the_session_dir():
    s = sess.VisitorSession()
    try:
        img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        out = sess.media(s, [img, (img, "caption"), "text", {"__type__": "update", "value": [img], "visible": True}])
        assert out[0] == out[1][0] == out[3]["value"][0] and out[1][1] == "caption" and out[2] == "text"
        assert Path(out[0]).parent.parent == s.dir and np.array_equal(np.asarray(Image.open(out[0])), img)
    finally:
        s.close()
    assert not Path(out[0]).exists()


# a visit leaves nothing behind -------------------------------------------------------------------


def test_watermark_images_are_served_from_the_session_dir(app_url, gradio_cache, tmp_path, monkeypatch):
    """The Watermark tab's images (drawn with the visitor's LoRA) are files in the visitor's session
    dir, like every other image, never copies in Gradio's cache."""
    from ui import watermark_tab

    drawn = [
        (np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8), f"correlation 0.{i}") for i in range(3)
    ]
    monkeypatch.setattr(watermark_tab, "backdoor_report", lambda engine, lora, alpha: ("#### Baseline backdoor", drawn))
    c = client(app_url)
    from gradio_client import handle_file

    crops, report = c.predict([handle_file(str(p)) for p in private_photos(tmp_path, 0, tag="wm")], api_name="/ingest")
    assert "3 usable photos" in report, report
    lora = c.predict(20, 4, 3e-3, 0, False, api_name="/train")[4]
    before = files_in(gradio_cache)
    aiao, backdoor, gallery = c.predict(api_name="/watermark")
    assert backdoor == "#### Baseline backdoor" and len(gallery) == 3
    folder = session_dir(server_path(lora))
    assert all(session_dir(server_path(g)) == folder for g in gallery)
    assert files_in(gradio_cache) - before == set()
    c.close()


def test_a_refused_file_leaves_no_session_folder(app_url, tmp_path):
    """A visitor whose only input is refused has no folder on disk (none is made before it is needed)."""
    from tests.raw_api import Visitor, file_data

    before = set(sess.SESSION_ROOT.glob("*"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a lora" * 100)
    v = Visitor(app_url)
    ok, (status, *_) = v.call("attack", file_data(v.upload(junk)), 80, None)
    assert ok and "refused" in status
    assert set(sess.SESSION_ROOT.glob("*")) - before == set()
    v.close()


def test_uploads_never_submitted_are_deleted(app_url, gradio_cache, tmp_path, monkeypatch):
    """An upload no event ever read (a tab closed right after uploading) is deleted once it has
    waited ui.uploads.UPLOAD_TTL (45 s; shortened here, with the sweep's tick)."""
    from tests.raw_api import Visitor
    from ui import uploads

    monkeypatch.setattr(uploads, "UPLOAD_TTL", 1.0, raising=False)
    monkeypatch.setattr(sess, "SWEEP_EVERY", 0.5, raising=False)
    before = files_in(gradio_cache)
    v = Visitor(app_url)
    for p in private_photos(tmp_path, 1, tag="never"):
        v.upload(p)
    v.close()
    assert files_in(gradio_cache) - before  # they arrived
    deadline = time.monotonic() + 60
    while files_in(gradio_cache) - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert files_in(gradio_cache) - before == set()


def test_the_visits_end_closes_every_session_of_its_session_hash():
    """demo.unload's handler finds the visitor's sessions by request.session_hash (Gradio's
    documented idiom), not through Gradio's internal state holder."""
    from types import SimpleNamespace

    request = SimpleNamespace(session_hash="visit-42")
    s = sess.ensure(None, request)
    (s.dir / "lora.safetensors").write_bytes(b"x")
    other = sess.ensure(None, SimpleNamespace(session_hash="visit-43"))
    (other.dir / "lora.safetensors").write_bytes(b"y")
    sess.end_session(request)
    assert s.closed and not s.path.exists() and not other.closed and other.path.exists()
    other.close()


def test_a_visitors_first_events_at_once_share_one_session():
    """An upload's own handler and a button pressed right after it both start before either has stored
    a session in the page's state: they get the browser session's one session (one reading lock), not
    one each (two readers of one upload deleted it under each other); another browser gets its own."""
    import threading
    from types import SimpleNamespace

    request = SimpleNamespace(session_hash="visit-first-events")
    start, got = threading.Barrier(4), []

    def first_event():
        start.wait()
        got.append(sess.ensure(None, request))

    threads = [threading.Thread(target=first_event) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in got}) == 1 and got[0].session_hash == "visit-first-events"
    other = sess.ensure(None, SimpleNamespace(session_hash="visit-someone-else"))
    assert other is not got[0]
    got[0].close()  # the visit's session closed: a later event opens a fresh one
    again = sess.ensure(None, request)
    assert again is not got[0] and not again.closed
    for s in (other, again):
        s.close()
