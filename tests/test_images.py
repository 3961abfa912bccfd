"""One image reader and one face aligner for gallery photos, export faces and training faces."""
from __future__ import annotations

import cv2
import numpy as np

from conftest import require_models, require_shared_faces


def _large_photo() -> np.ndarray:
    """A real LFW photo (250 px) enlarged to 1500 px: a camera photo's size, above YuNet's 640."""
    from petal_runtime.images import read_image

    path = sorted((require_shared_faces() / "lfw10").rglob("*.jpg"))[0]
    return cv2.resize(read_image(path), (1500, 1500), interpolation=cv2.INTER_CUBIC)


def test_gallery_export_and_training_get_the_same_crop_of_a_large_photo():
    require_models()
    from petal_runtime.gallery import ImageFaceAligner
    from petal_runtime.images import FaceAligner
    from petal_train.faces import Aligner

    bgr = _large_photo()
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    gallery_aligner = ImageFaceAligner()
    gallery = gallery_aligner(bgr)
    assert gallery_aligner.detector.scale == 640 / 1500  # detected at YuNet's size, not at 1500 px
    training = Aligner()(rgb)
    export = FaceAligner().from_rgb(rgb)
    assert gallery is not None and gallery.shape == (112, 112, 3)
    np.testing.assert_array_equal(training, gallery)
    np.testing.assert_array_equal(export, gallery)


def test_aligned_crops_pass_through_and_grey_photos_are_aligned():
    require_models()
    from petal_runtime.images import FaceAligner

    aligner = FaceAligner()
    crop = np.zeros((112, 112, 3), np.uint8)
    assert aligner.from_rgb(crop) is crop
    grey = cv2.cvtColor(_large_photo(), cv2.COLOR_BGR2GRAY)
    assert aligner(grey).shape == (112, 112, 3)


def test_one_image_suffix_list(tmp_path):
    from petal_runtime import gallery, sources
    from petal_runtime.images import IMAGE_SUFFIXES, read_image, read_rgb
    from petal_train import faces, synth

    assert {".tif", ".tiff", ".webp"} <= IMAGE_SUFFIXES
    assert gallery.IMAGE_SUFFIXES is sources.IMAGE_SUFFIXES is faces.IMAGE_SUFFIXES is synth.IMAGE_SUFFIXES
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for name in ("empty.jpg", "junk.png"):
        assert read_image(tmp_path / name) is None and read_rgb(tmp_path / name) is None
