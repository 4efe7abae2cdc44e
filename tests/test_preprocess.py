"""Preprocessing is torchvision's IMAGENET1K_V1 recipe, bit for bit on the CPU path."""

import numpy as np
import pytest
import torch
from torchvision.models import VGG16_Weights
from torchvision import transforms as T

from pipeline.decode.cpu import decode_image
from pipeline.decode.preprocess import normalize_batch, preprocess_pil, resize_crop_uint8
from tests.corpus import encode, sample_photos

REFERENCE = VGG16_Weights.IMAGENET1K_V1.transforms()
CLASSIC = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def _variants():
    photos = sample_photos()
    out = []
    for name, img in photos[:4]:
        out.append((f"{name}-{img.size}", img))
        small = img.resize((img.width // 3 + 1, img.height // 2 + 1))
        out.append((f"{name}-small", small))
    out.append(("grey", photos[0][1].convert("L")))
    out.append(("rgba", photos[1][1].convert("RGBA")))
    out.append(("tiny", photos[2][1].resize((60, 40))))
    return out


@pytest.mark.parametrize("name,img", _variants(), ids=lambda v: v if isinstance(v, str) else "")
def test_matches_torchvision_transforms(name, img):
    # Through our decoder (mode -> RGB) exactly as the pipeline does, then both recipes.
    rgb = decode_image(encode(img, "PNG"))
    ours = preprocess_pil(rgb)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, REFERENCE(rgb), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, CLASSIC(rgb), rtol=0, atol=1e-6)


def test_tensor_path_is_close_to_pil_path():
    img = sample_photos()[0][1]
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    gpu_style = normalize_batch(resize_crop_uint8(x)[None])[0]
    diff = (gpu_style - preprocess_pil(img)).abs()
    assert diff.mean() < 0.02, diff.mean()
