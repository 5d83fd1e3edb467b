import numpy as np
import pytest
from PIL import Image

from core.faces import data, ingest, metrics
from core.faces import recognition as faces
from tests.bad_inputs import encode, png_header_only
from tests.conftest import rng_image


@pytest.fixture(scope="module")
def face_img(lfw_photo):
    return Image.open(lfw_photo).convert("RGB")


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: b"", ingest.NotAnImage, "empty"),
        (lambda: b"hello, this is a text file\n" * 20, ingest.NotAnImage, "not an image"),
        (lambda: encode(Image.fromarray(rng_image(1, (300, 300))))[:2000], ingest.CorruptImage, "truncated"),
        (lambda: png_header_only(8000, 6000), ingest.TooManyPixels, "megapixels"),
        (lambda: encode(Image.fromarray(rng_image(2, (256, 256)))), ingest.NoFaceFound, "No face"),
        (lambda: encode(Image.new("RGB", (8, 8))), ingest.NoFaceFound, "larger photo"),
    ],
    ids=["empty", "text", "truncated", "too-many-pixels", "no-face", "tiny"],
)
def test_bad_inputs_raise_typed_errors(make, error, words):
    with pytest.raises(error, match=words):
        ingest.ingest_face(make())
    assert issubclass(error, ingest.IngestError)


def _crop_distance(a, b):
    return float(metrics.distance(*faces.describe([a, b])))


def test_face_crop_matches_training_crop(face_img, lfw_photo):
    r = ingest.ingest_face(encode(face_img))
    assert r.crop.shape == (data.IMAGE_SIZE, data.IMAGE_SIZE, 3) and r.crop.dtype == np.uint8 and r.n_faces >= 1
    assert _crop_distance(r.crop, data.fixed_crop(lfw_photo)) < 0.45  # same geometry -> same person


@pytest.mark.parametrize(
    "convert",
    [
        lambda im: encode(im.convert("CMYK"), "JPEG"),
        lambda im: encode(im.convert("P", palette=Image.ADAPTIVE), "PNG"),
        lambda im: encode(im.convert("RGBA"), "PNG"),
        lambda im: encode(im.convert("L"), "PNG"),
        lambda im: encode(Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257), "PNG"),
        lambda im: encode(im, "WEBP"),
        lambda im: encode(im, "GIF", save_all=True, append_images=[im.rotate(30)]),
    ],
    ids=["cmyk", "palette", "alpha", "grey", "16-bit", "webp", "animated-gif"],
)
def test_every_mode_gives_an_rgb_face_crop(face_img, convert):
    r = ingest.ingest_face(convert(face_img))
    assert r.crop.shape == (data.IMAGE_SIZE, data.IMAGE_SIZE, 3)
    assert r.crop.std() > 10  # real content, not a blank or clipped image


def test_exif_rotation_is_applied(face_img):
    rotated = face_img.transpose(Image.Transpose.ROTATE_90)  # stored sideways (90 deg counter-clockwise) ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the tag that says "rotate 90 deg clockwise to display"
    r = ingest.ingest_face(encode(rotated, exif=exif.tobytes()))
    upright = ingest.ingest_face(encode(face_img))
    assert _crop_distance(r.crop, upright.crop) < 0.3


def test_similarity_transform_recovers_a_known_transform():
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    a = np.deg2rad(20)
    m = np.array([[1.7 * np.cos(a), -1.7 * np.sin(a), 5.0], [1.7 * np.sin(a), 1.7 * np.cos(a), -3.0]])
    dst = src @ m[:, :2].T + m[:, 2]
    assert np.allclose(ingest.similarity_transform(src, dst), m, atol=1e-8)


def test_template_is_inside_the_crop():
    t = ingest.load_template()
    assert t.shape == (5, 2) and (t > 0).all() and (t < ingest.TEMPLATE_SIZE).all()


def test_crop_beyond_the_photo_is_mirrored_and_marked(face_img):
    """A tightly framed face: the crop reaches past the photo's edge; those pixels are mirrored
    photo content (no flat grey bars) and `inside` marks them as not from the photo."""
    arr = np.asarray(face_img)
    tight = Image.fromarray(arr[82:172, 82:172])  # the face with no margin
    rect, pts, _ = ingest.find_face(tight)
    assert rect is not None
    al = ingest.align_face(tight, pts, ingest.load_template(), data.IMAGE_SIZE)
    assert 0.3 < al.inside_fraction < 1.0
    outside = al.crop[~al.inside]
    assert outside.std() > 5  # photo content, not a constant fill
    assert not (np.abs(outside.astype(int) - 127).max(axis=-1) == 0).mean() > 0.5


def test_large_photos_are_shrunk_before_the_warp(face_img):
    """A photo 8x larger gives (nearly) the same crop: the warp does not alias."""
    big = face_img.resize((face_img.width * 8, face_img.height * 8), Image.BICUBIC)
    a, b = ingest.ingest_face(encode(face_img)), ingest.ingest_face(encode(big))
    assert _crop_distance(a.crop, b.crop) < 0.2
    assert np.abs(a.crop.astype(float) - b.crop.astype(float)).mean() < 12


# photos that are not one face, and files Pillow gives up on (issue 17) -----------------------------


@pytest.mark.parametrize("size", [(30000, 16), (16, 30000), (20000, 20)])
def test_a_thin_strip_is_refused_with_a_sentence(size):
    with pytest.raises(ingest.NoFaceFound, match=f"{size[0]}x{size[1]} pixels, a thin strip"):
        ingest.ingest_face(encode(Image.new("RGB", size, (90, 90, 90)), "PNG"))


def test_png_metadata_over_pillows_limit_is_named():
    from PIL import PngImagePlugin

    from tests.bad_inputs import face

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 2**21, zip=True)
    for png in (encode(face(0), "PNG", pnginfo=info), encode(face(0), "PNG", icc_profile=b"\0" * 2**21)):
        with pytest.raises(ingest.CorruptImage, match="hidden text or colour-profile data"):
            ingest.ingest_face(png)


def test_only_the_first_frame_is_read_and_a_refusal_says_so():
    from tests.bad_inputs import blank, face, frames

    for fmt in ("WEBP", "GIF", "TIFF"):
        with pytest.raises(ingest.NoFaceFound, match="only the first frame is read"):
            ingest.ingest_face(frames(blank(), face(1), fmt))
        assert ingest.ingest_face(frames(face(1), blank(), fmt)).crop.std() > 10


def test_a_lying_orientation_tag_is_overruled_by_the_face():
    from tests.bad_inputs import face, lying_exif

    got = ingest.ingest_face(lying_exif())
    upright = ingest.ingest_face(encode(face(2)))
    assert any("orientation tag" in n for n in got.notes) and _crop_distance(got.crop, upright.crop) < 0.3


def test_of_several_faces_the_largest_is_used_and_the_visitor_is_told():
    from tests.bad_inputs import face, group_photo

    got = ingest.ingest_face(encode(group_photo()))
    assert got.n_faces == 3 and any("3 faces were found and the largest was used" in n for n in got.notes)
    alone = [ingest.ingest_face(encode(face(6 * i + 1, 256))).crop for i in range(3)]
    d = [_crop_distance(got.crop, a) for a in alone]
    assert int(np.argmin(d)) == 1  # the middle face, the largest one


def test_a_fully_transparent_image_is_named():
    with pytest.raises(ingest.NotAnImage, match="fully transparent"):
        ingest.ingest_face(encode(Image.new("RGBA", (256, 256)), "PNG"))


def test_a_drawn_face_is_refused_and_photos_are_not(face_img):
    """A cartoon of a face (flat colours, black outlines: what dlib still detects as a face) is
    refused; real photos (LFW, as stored and re-compressed) and the base model's drawn-like example
    faces are not (core.faces.drawn; its measurement: python -m core.faces.drawn)."""
    from tests.bad_inputs import drawn, face

    # a JPEG drawing is refused when large; at ~250 px its flat fills drown in JPEG noise, the rule's
    # stated limit (core.faces.drawn, docs/results/drawn_faces.md)
    for img, fmt in ((drawn(face(1)), "PNG"), (drawn(face(2, 400)), "JPEG"), (drawn(face_img), "PNG")):
        with pytest.raises(ingest.DrawnFace, match="drawn"):
            ingest.ingest_face(encode(img, fmt))
    for img in (face_img, face(0), face(3)):
        for encoded in (encode(img, "PNG"), encode(img, "JPEG", quality=40)):
            assert ingest.ingest_face(encoded).crop.std() > 10
