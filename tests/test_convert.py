import pytest
import torch

import vitlab
from vitlab import VisionTransformer
from vitlab.reference import SEED_CIFAR10_ARGS, SeedVisionTransformer

from .conftest import tiny_vit_kwargs


def test_seed_state_dict_gives_the_same_logits_on_the_seed_instance():
    torch.manual_seed(0)
    seed = SeedVisionTransformer(**SEED_CIFAR10_ARGS).eval()
    model = VisionTransformer(**SEED_CIFAR10_ARGS).eval()
    model.load_state_dict(vitlab.from_seed_state_dict(seed.state_dict()))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = (model(x) - seed(x)).abs().max().item()
    assert diff <= 1e-5


def test_seed_reference_and_vitlab_have_the_same_parameter_count():
    seed = SeedVisionTransformer(**SEED_CIFAR10_ARGS)
    assert sum(p.numel() for p in seed.parameters()) == 18_979_338


def test_seed_conversion_names_keys_it_does_not_know():
    sd = SeedVisionTransformer(**{**SEED_CIFAR10_ARGS, "depth": 1}).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 key\(s\) are not part of a seed ViT: extra.weight"):
        vitlab.from_seed_state_dict(sd)


@pytest.mark.parametrize("options", [{}, {"pooling": "mean"}, {"qkv_bias": False},
                                     {"layer_scale": 0.5, "norm_eps": 1e-6}])
def test_timm_round_trip_gives_the_same_logits(options):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = VisionTransformer(**tiny_vit_kwargs(**options, init="trunc_normal")).eval()
    reference = TimmViT(**vitlab.timm_model_kwargs(model.config)).eval()
    reference.load_state_dict(vitlab.to_timm_state_dict(model.state_dict(), pooling=model.config.pooling))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model(x), atol=1e-5, rtol=1e-5)
    # and back: timm's own weights load into vitlab
    back = VisionTransformer.from_config(model.config).eval()
    back.load_state_dict(vitlab.from_timm_state_dict(reference.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(back(x), reference(x), atol=1e-5, rtol=1e-5)
    assert timm is not None


def test_timm_seed_sized_model_matches():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = vitlab.create_model("seed").eval()
    reference = TimmViT(**vitlab.timm_model_kwargs(model.config)).eval()
    assert sum(p.numel() for p in reference.parameters()) == model.num_parameters()
    reference.load_state_dict(vitlab.to_timm_state_dict(model.state_dict()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (reference(x) - model(x)).abs().max() <= 1e-4
