"""ui.uploads: every upload gets a private path of its own; a handler reads only its visitor's own
uploads and session files (once, then the upload is gone), never another's; nothing read is kept in
memory; abandoned uploads are swept."""

import os
import threading
import time
from pathlib import Path

import pytest

from ui import session as sess
from ui import uploads


@pytest.fixture
def gradio_upload(tmp_path, monkeypatch):
    """An upload as Gradio stores it (``<upload folder>/<hash>/<name>``), in a private upload folder."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))

    def make(data: bytes, name: str = "me.jpg", digest: str = "a" * 64) -> Path:
        p = tmp_path / "gradio" / digest / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    return make


def test_an_upload_is_moved_to_a_private_folder_and_read_once(gradio_upload):
    shared = gradio_upload(b"photo bytes")
    p = uploads.make_private(shared)
    assert not shared.exists()
    assert p.name == "me.jpg" and len(p.parent.name) == 32 and p.parent.parent == uploads.upload_root()
    assert uploads.origin(p, None) == "upload"
    assert uploads.read_upload(p) == b"photo bytes"
    assert not p.exists() and not p.parent.exists()  # deleted once read, folder too
    with pytest.raises(uploads.UploadGone):  # nothing of it is held anywhere
        uploads.read_upload(p)


def test_twins_finishing_together_each_get_their_own_copy(gradio_upload):
    """Two byte-identical uploads: Gradio's second rename lands on the first's path; whichever private
    copy is made second still gets the bytes (a link to the first's copy)."""
    shared = gradio_upload(b"same selfie" * 100)
    first = uploads.make_private(shared)
    second = uploads.make_private(shared)  # the shared path is already gone
    assert first != second and first.read_bytes() == second.read_bytes() == b"same selfie" * 100
    assert uploads.read_upload(first) and uploads.read_upload(second) == b"same selfie" * 100


def test_many_twins_at_once(gradio_upload):
    shared = gradio_upload(b"x" * 5000)
    got, errors = [], []

    def visit():
        try:
            got.append(uploads.read_upload(uploads.make_private(shared)))
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    threads = [threading.Thread(target=visit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [b"x" * 5000] * 16


def test_files_of_another_session_or_elsewhere_are_refused_untouched(gradio_upload, tmp_path):
    mine, theirs = sess.VisitorSession(), sess.VisitorSession()
    try:
        own = mine.dir / "lora.safetensors"
        own.write_bytes(b"mine")
        other = theirs.dir / "lora.safetensors"
        other.write_bytes(b"theirs")
        elsewhere = tmp_path / "x.png"
        elsewhere.write_bytes(b"x")
        cached = gradio_upload(b"output", "out.png", "b" * 64)  # Gradio's cache: not an upload of this visitor
        for p in (other, elsewhere, cached):
            assert uploads.origin(p, mine) is None
            with pytest.raises(uploads.NotYours):
                uploads.read_upload(p, mine)
            with pytest.raises(uploads.NotYours):
                with uploads.local_file(p, mine):
                    pass
            assert p.exists()
        assert uploads.read_upload(own, mine) == b"mine" and own.exists()  # own files are read, kept
        assert uploads.origin(uploads.EXAMPLES / "person_1000" / "x.png", None) == "example"
    finally:
        mine.close()
        theirs.close()


def test_too_large_is_deleted_unread(gradio_upload):
    p = uploads.make_private(gradio_upload(b"0" * 101))
    with pytest.raises(uploads.UploadTooLarge) as e:
        uploads.read_upload(p, max_bytes=100)
    assert (e.value.size, e.value.limit) == (101, 100) and not p.exists()


def test_local_file_deletes_the_upload_whatever_happens(gradio_upload):
    p = uploads.make_private(gradio_upload(b"lora"))
    with pytest.raises(RuntimeError):
        with uploads.local_file(p) as f:
            assert f == p and f.read_bytes() == b"lora"
            raise RuntimeError("validation failed")
    assert not p.exists()


def test_sweep_deletes_abandoned_uploads_only(gradio_upload):
    old = uploads.make_private(gradio_upload(b"old", "old.png", "c" * 64))
    new = uploads.make_private(gradio_upload(b"new", "new.png", "d" * 64))
    spool = uploads.upload_root().parent / "tmpabc123"  # Gradio's spool file of an upload cut off half-way
    spool.write_bytes(b"half a photo")
    then = time.time() - uploads.UPLOAD_TTL - 5
    for p in (old, old.parent, spool):
        os.utime(p, (then, then))
    assert uploads.sweep() == 2
    assert not old.exists() and not spool.exists() and new.exists()


def test_the_sweep_deletes_within_a_minute():
    assert uploads.UPLOAD_TTL + sess.SWEEP_EVERY <= 60


def test_a_group_photo_is_used_and_the_crop_says_which_face(tmp_path, monkeypatch):
    """Of several faces the largest is used: the report says so and the crop shown carries the note
    (the crop is the face that was taken)."""
    from tests.bad_inputs import encode, face, group_photo
    from tests.raw_api import as_upload
    from ui.finetune_tab import ingest_files

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    files = []
    for i, img in enumerate([group_photo(), face(0), face(1)]):
        (tmp_path / f"p{i}.jpg").write_bytes(encode(img))
        files.append(str(as_upload(tmp_path / f"p{i}.jpg")))
    shown, head, s = ingest_files(files, None, 64)
    try:
        assert "3 usable photos" in head and "3 faces were found and the largest was used" in head
        crop, caption = shown[0]
        assert caption.startswith("photo 1: 3 faces were found") and crop.shape == (64, 64, 3)
        assert all(not isinstance(x, tuple) for x in shown[1:])
    finally:
        s.close()
