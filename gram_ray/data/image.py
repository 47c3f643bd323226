"""Still images (Flickr30k, MSCOCO: `data.video.format: image`) as clips of one frame.

GRAM reads an image as a one-frame video (its `image_rawimage` vision format); so does gram-ray: the image is
decoded by torchvision's image decoder (libjpeg-turbo / libpng; no video decoder is involved), its short side
resized to S and centre-cropped as video frames are, and cached as frames [N, 3, S, S] with N =
data.video.num_frames (1 in the image configs; a larger N repeats the still, which mean pooling over frames
leaves unchanged).
"""

from __future__ import annotations

import numpy as np
import torch

from gram_ray.data.errors import DecodeError, Media, load_media

__all__ = ["decode_image"]


def decode_image(source: Media | None, num_frames: int, size: int) -> np.ndarray:
    """uint8 [num_frames, 3, size, size] from an image's path, storage URI or bytes. DecodeError with the reason
    for a file that cannot be used."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode
    from torchvision.transforms.v2.functional import center_crop, resize

    media = load_media(source, "image")
    if not isinstance(media, bytes):
        with open(media, "rb") as f:
            media = f.read()
    try:
        image = tv_decode(torch.frombuffer(bytearray(media), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise DecodeError(f"image cannot be decoded ({str(e).splitlines()[0][:200]})") from None
    image = center_crop(resize(image, [size], antialias=True), [size, size])
    return np.ascontiguousarray(image.numpy()[None].repeat(num_frames, axis=0))
