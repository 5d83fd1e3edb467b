import numpy as np
import pytest
from PIL import Image

from core.faces import data
from core.faces import recognition as faces
from core.faces import ingest
from core.faces import metrics
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
        lambda im: encode(Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257)), "PNG"),
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
