"""The VGG family matches the paper's Table 1 and torchvision, weight for weight and output for output."""

import pytest
import torch
import torchvision

from pipeline.model.vgg import ARCHS, build_vgg, init_weights
from pipeline.decode.preprocess import preprocess_pil
from tests.corpus import sample_photos


def test_vgg16_has_the_papers_parameter_count():
    assert sum(p.numel() for p in build_vgg("vgg16").parameters()) == 138_357_544


def test_conv_layer_counts_follow_table_1():
    convs = {a: sum(isinstance(m, torch.nn.Conv2d) for m in build_vgg(a).features) for a in
             ("vgg11", "vgg13", "vgg16", "vgg19")}
    assert convs == {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="vgg16"):
        build_vgg("vgg17")


@pytest.fixture(scope="module")
def photo_batch():
    photos = sample_photos()
    return torch.stack([preprocess_pil(photos[0][1]), preprocess_pil(photos[1][1])])


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_state_dict_loads_and_outputs_match(arch, photo_batch):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    ours = build_vgg(arch)
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    with torch.inference_mode():
        fc7, logits = ours(photo_batch)
        expected_logits = reference(photo_batch)
        # fc7 = classifier up to relu7, computed by hand from torchvision's modules
        x = torch.flatten(reference.avgpool(reference.features(photo_batch)), 1)
        expected_fc7 = reference.classifier[4](reference.classifier[3](reference.classifier[1](reference.classifier[0](x))))
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(fc7, expected_fc7)
    assert (fc7 >= 0).all(), "fc7 is taken after relu7"


def test_seeded_init_is_deterministic():
    a, b, c = build_vgg("vgg11"), build_vgg("vgg11"), build_vgg("vgg11")
    init_weights(a, 3), init_weights(b, 3), init_weights(c, 4)
    assert torch.equal(a.classifier[0].weight, b.classifier[0].weight)
    assert not torch.equal(a.classifier[0].weight, c.classifier[0].weight)
