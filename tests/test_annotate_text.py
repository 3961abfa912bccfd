"""Annotated video labels: accented names are drawn as themselves. OpenCV 4.x's putText draws every
non-ASCII character as '?', which is why pyproject pins opencv-python-headless>=5."""
from __future__ import annotations

import cv2
import numpy as np


def _drawn(text: str) -> np.ndarray:
    image = np.zeros((40, 240, 3), np.uint8)
    cv2.putText(image, text, (2, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def test_put_text_draws_accented_names_not_question_marks():
    assert int(cv2.__version__.split(".")[0]) >= 5, cv2.__version__
    for name, ascii_fallback in (("José", "Jos??"), ("Zoë", "Zo??"), ("Łukasz", "??ukasz")):
        assert not np.array_equal(_drawn(name), _drawn(ascii_fallback)), name
