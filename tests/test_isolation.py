"""Two visitors on the app built on the tiny random pipeline, the second one hostile: it speaks Gradio's
HTTP API by hand (tests/raw_api.py) and sends the first visitor's server paths as its own inputs. It
must not be able to read, attack with or delete the other's files through any endpoint, nor replay
the other's uploads; session files and uploads live under names with >= 128 bits of randomness."""

import hashlib
import re
from pathlib import Path

import pytest

from tests.bad_inputs import private_photos
from tests.conftest import launched_app
from tests.raw_api import Visitor, file_data, server_path
from ui import session as sess
from ui import uploads

HEX128 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def app_url(tiny_engine):
    for demo in launched_app(tiny_engine):
        yield demo.local_url


@pytest.fixture(scope="module")
def owner(app_url, tmp_path_factory):
    """Visitor A: uploads 3 photos, fine-tunes a LoRA; its crops and LoRA are files in its session dir."""
    folder = tmp_path_factory.mktemp("owner")
    a = Visitor(app_url)
    photos = private_photos(folder, 0, tag="owner")
    paths = [a.upload(p) for p in photos]
    ok, (crops, report) = a.call("ingest", [file_data(p) for p in paths])
    assert ok and "3 usable photos" in report, report
    ok, out = a.call("train", 20, 4, 3e-3, 0, False, False, 1.0, "none", 0.9)
    assert ok and "Done: 20 steps" in out[0], out
    lora = server_path(out[4])
    a.crops, a.lora, a.uploads = [server_path(c) for c in crops], lora, paths
    yield a
    a.close()


def is_served(url, path) -> bool:
    import httpx

    return httpx.get(f"{url.rstrip('/')}/gradio_api/file={path}").status_code == 200


def test_a_stranger_cannot_attack_with_or_delete_anothers_lora(app_url, owner):
    assert owner.lora.is_file() and is_served(app_url, owner.lora)
    b = Visitor(app_url)
    ok, out = b.call("attack", file_data(owner.lora), 80, None)
    assert ok, out
    status, attack, naive, fx, refs, table = out
    assert "not a file you uploaded" in status.lower() and "upload" in status.lower(), status
    assert attack == naive == fx == refs == [] and table == ""
    assert owner.lora.is_file() and is_served(app_url, owner.lora)  # the owner's download still works
    # and with the owner's crops as "reference photos"
    ok, out = b.call("attack", file_data(owner.lora), 80, [file_data(c) for c in owner.crops])
    assert ok and all(c.is_file() for c in owner.crops)
    b.close()


def test_session_files_are_not_kept_by_the_browser(app_url, owner):
    """A shared computer's browser cache keeps no copy of a visitor's crops or LoRA."""
    import httpx

    for p in (owner.crops[0], owner.lora):
        r = httpx.get(f"{app_url.rstrip('/')}/gradio_api/file={p}")
        assert r.status_code == 200 and r.headers.get("cache-control") == "no-store"


def test_a_stranger_cannot_ingest_anothers_crops_or_lora(app_url, owner):
    b = Visitor(app_url)
    ok, (crops, report) = b.call("ingest", [file_data(c) for c in owner.crops] + [file_data(owner.lora)])
    assert ok and crops == [] and "0 usable photos" in report, report
    assert report.lower().count("not a file you uploaded") == len(owner.crops) + 1, report
    assert all(c.is_file() for c in owner.crops) and owner.lora.is_file()
    b.close()


def test_uploads_are_not_replayed_to_another_session(app_url, owner, tmp_path):
    """A's uploads were read (and deleted) by A's ingest; B holding their paths gets nothing, while A
    sending them again (a browser re-sends a File's value) still gets its own photos."""
    b = Visitor(app_url)
    ok, (crops, report) = b.call("ingest", [file_data(p) for p in owner.uploads])
    assert ok and crops == [] and "0 usable photos" in report
    assert report.lower().count("please upload it again") == len(owner.uploads), report
    ok, (crops, report) = owner.call("ingest", [file_data(p) for p in owner.uploads])
    assert ok and len(crops) == 3 and "3 usable photos" in report, report
    b.close()


def test_an_upload_is_private_to_whoever_sent_it(app_url, tmp_path):
    """Byte-identical uploads (same name too) get two paths of their own, each in a folder with a
    128-bit random name, never the content-addressed path Gradio would share between them."""
    photo = private_photos(tmp_path, 1, n=1, tag="twin")[0]
    a, b = Visitor(app_url), Visitor(app_url)
    pa, pb = Path(a.upload(photo)), Path(b.upload(photo))
    assert pa != pb and pa.name == pb.name == photo.name
    for p in (pa, pb):
        assert p.is_file() and uploads.upload_root() in p.parents and HEX128.fullmatch(p.parent.name)
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    assert digest not in str(pa) and digest not in str(pb)
    for v in (a, b):
        v.close()


def test_session_files_have_unguessable_names_that_never_repeat(app_url, tmp_path):
    """Two visitors ingesting the very same photos see crops under different names in folders with
    128-bit random names; a file name is not a hash of its content."""
    photos = private_photos(tmp_path, 0, tag="same")
    seen = []
    for _ in range(2):
        v = Visitor(app_url)
        ok, (crops, _) = v.call("ingest", [file_data(v.upload(p)) for p in photos])
        assert ok and len(crops) == 3
        paths = [server_path(c) for c in crops]
        root = sess.SESSION_ROOT.resolve()
        folder = root / paths[0].resolve().relative_to(root).parts[0]
        assert HEX128.search(folder.name) and all(folder in p.resolve().parents for p in paths)
        for p in paths:
            assert HEX128.fullmatch(p.stem)
            assert hashlib.sha256(p.read_bytes()).hexdigest()[:24] not in p.stem
        seen.append({p.name for p in paths})
        v.close()
    assert seen[0].isdisjoint(seen[1])


def test_a_stranger_cannot_use_anothers_files_in_the_metadata_layers_and_membership_panels(app_url, owner):
    """The panels added beside the Attack tab (metadata scan, the Layers tab's file, membership) take
    only the visitor's own uploads too, and leave the owner's files where they are."""
    b = Visitor(app_url)
    ok, (report, rest, cleaned) = b.call("scan_metadata", file_data(owner.lora))
    assert ok and "not a file you uploaded" in report.lower() and not cleaned, report
    ok, (status, plot, table) = b.call("layers_file", file_data(owner.lora))
    assert ok and "not a file you uploaded" in status.lower() and not table, status
    ok, message = b.call("membership", file_data(owner.lora), [file_data(c) for c in owner.crops])
    assert not ok and message.lower().count("not a file you uploaded") == len(owner.crops), message
    assert owner.lora.is_file() and is_served(app_url, owner.lora) and all(c.is_file() for c in owner.crops)
    b.close()
