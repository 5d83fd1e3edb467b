"""ui.uploads: an upload is read once and deleted, and a visitor who uploaded byte-identical bytes
(Gradio gives both the same path) still reads them after the first visitor's handler deleted the file."""

import threading

import pytest

from ui import uploads


@pytest.fixture(autouse=True)
def fresh():
    uploads.forget_all()
    yield
    uploads.forget_all()


def test_read_deletes_the_copy_and_a_twin_still_reads_the_bytes(tmp_path):
    f = tmp_path / "abc" / "me.jpg"
    f.parent.mkdir()
    f.write_bytes(b"photo bytes")
    assert uploads.read_upload(f) == b"photo bytes"
    assert not f.exists()  # deleted once read
    assert uploads.read_upload(f) == b"photo bytes"  # the twin's handler, after the file is gone


def test_a_path_never_read_is_gone(tmp_path):
    with pytest.raises(uploads.UploadGone):
        uploads.read_upload(tmp_path / "never.jpg")


def test_held_bytes_expire(tmp_path, monkeypatch):
    f = tmp_path / "x.png"
    f.write_bytes(b"x")
    uploads.read_upload(f)
    now = uploads.time.monotonic()
    monkeypatch.setattr(uploads.time, "monotonic", lambda: now + uploads.RECENT_TTL + 1)
    with pytest.raises(uploads.UploadGone):
        uploads.read_upload(f)


def test_keep_leaves_the_file_and_holds_nothing(tmp_path):
    f = tmp_path / "example.png"
    f.write_bytes(b"bundled")
    assert uploads.read_upload(f, keep=True) == b"bundled"
    assert f.read_bytes() == b"bundled"
    f.unlink()
    with pytest.raises(uploads.UploadGone):
        uploads.read_upload(f)


def test_too_large_is_deleted_unread(tmp_path):
    f = tmp_path / "huge.bin"
    f.write_bytes(b"0" * 101)
    with pytest.raises(uploads.UploadTooLarge) as e:
        uploads.read_upload(f, max_bytes=100)
    assert (e.value.size, e.value.limit) == (101, 100) and not f.exists()


def test_many_twins_at_once_all_read_the_bytes(tmp_path):
    f = tmp_path / "same.jpg"
    f.write_bytes(b"same selfie" * 1000)
    got, errors = [], []

    def visit():
        try:
            got.append(uploads.read_upload(f))
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    threads = [threading.Thread(target=visit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [b"same selfie" * 1000] * 16 and not f.exists()
