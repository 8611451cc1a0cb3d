"""The segmenter's label mask at the upload's size."""

from __future__ import annotations

import torch
from PIL import Image

from app.pipeline.decoding import Box, DecodedImage
from app.pipeline.tasks.segmentation import upload_labels


def test_labels_resized_to_the_upload_are_writable() -> None:
    # torch.from_numpy warns (once per process, in the server's log) on a read-only array.
    image = Image.new("RGB", (8, 6))
    decoded = DecodedImage("x.png", image, (8, 6), torch.zeros(3, 3, 4), Box(0, 0, 4, 3))
    logits = torch.zeros(2, 3, 4)
    logits[1, :, 2:] = 1.0
    labels = upload_labels(decoded, logits)
    assert labels.shape == (6, 8) and labels.flags.writeable
    assert (labels[:, 4:] == 1).all() and (labels[:, :4] == 0).all()
