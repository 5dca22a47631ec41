"""The Classifier's inference precision: fp32 is the plain model, bf16 a cached bf16 copy that
answers like it, and "auto" picks bf16 only where the hardware computes it natively."""

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab import precision as precision_rule
from vitlab.classifier import Classifier

from .conftest import tiny_vit_kwargs


def tiny_classifier(**kwargs) -> Classifier:
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(init="trunc_normal"))
    return Classifier(model, ["a", "b", "c", "d", "e"], **kwargs)


def images(n=16, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))  # [0, 1] pixels


def test_fp32_inference_is_the_plain_model_bit_for_bit():
    classifier = tiny_classifier(precision="fp32")
    x = images()
    batch = classifier.preprocess(x)
    with torch.no_grad():
        logits = classifier.model(batch)
        tokens = classifier.model.forward_features(batch, cls_only=True)  # as embed() and forward() run
    assert torch.equal(classifier.probabilities(x), F.softmax(logits, dim=-1))
    assert torch.equal(classifier.embed(x), classifier.model.forward_head(tokens, pre_logits=True))
    assert classifier.inference_network() is classifier.model


def test_bf16_inference_answers_like_fp32(capsys):
    classifier = tiny_classifier()
    x = images(64)
    fp32 = classifier.set_precision("fp32").probabilities(x)
    fp32_features = classifier.embed(x)
    bf16 = classifier.set_precision("bf16").probabilities(x)
    bf16_features = classifier.embed(x)
    assert classifier.inference_precision == "bf16"
    assert bf16.dtype == bf16_features.dtype == torch.float32  # fp32 out, whatever runs inside
    assert bf16.shape == fp32.shape == (64, 5)
    torch.testing.assert_close(bf16.sum(dim=1), torch.ones(64))
    assert (bf16 - fp32).abs().max() < 0.01
    assert not torch.equal(bf16, fp32)  # it really ran in bf16
    assert (bf16.argmax(1) == fp32.argmax(1)).float().mean() >= 0.9
    relative = (bf16_features - fp32_features).norm(dim=1) / fp32_features.norm(dim=1)
    assert relative.max() < 0.05


def test_bf16_copy_leaves_the_fp32_model_and_its_state_dict_alone():
    classifier = tiny_classifier(precision="bf16")
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    classifier.predict(images(4))
    after = classifier.state_dict()
    assert list(after) == list(before)  # the bf16 copy is not a submodule
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in after.items())
    x = classifier.preprocess(images(4))
    with torch.no_grad():
        assert torch.equal(classifier(x), classifier.model(x))  # forward() stays fp32 for training


def test_bf16_copy_follows_changes_to_the_weights():
    classifier = tiny_classifier(precision="bf16")
    x = images(8)
    first = classifier.probabilities(x)
    other = vitlab.VisionTransformer(**tiny_vit_kwargs(init="trunc_normal"))
    classifier.model.load_state_dict(other.state_dict())
    fresh = Classifier(other, classifier.class_names, precision="bf16")
    assert torch.equal(classifier.probabilities(x), fresh.probabilities(x))
    assert not torch.equal(classifier.probabilities(x), first)

    # an optimizer step on .model (fine-tuning a loaded classifier) reaches inference too
    optimizer = torch.optim.SGD(classifier.model.parameters(), lr=0.5)
    classifier.model.train()
    F.cross_entropy(classifier(classifier.preprocess(x)), torch.zeros(8, dtype=torch.long)).backward()
    optimizer.step()
    stepped = classifier.probabilities(x)
    assert not torch.equal(stepped, fresh.probabilities(x))
    torch.testing.assert_close(stepped, classifier.set_precision("fp32").probabilities(x), atol=0.01, rtol=0)


def test_auto_means_bf16_only_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(precision_rule, "bf16_supported", lambda device: True)
    assert tiny_classifier().inference_precision == "bf16"
    monkeypatch.setattr(precision_rule, "bf16_supported", lambda device: False)
    classifier = tiny_classifier()
    assert classifier.precision == "auto" and classifier.inference_precision == "fp32"
    assert classifier.set_precision("bf16").inference_precision == "bf16"  # forced: runs, emulated


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        tiny_classifier(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        tiny_classifier().set_precision("half")


def test_class_names_come_from_the_argument_or_are_numbered():
    model = vitlab.VisionTransformer(**tiny_vit_kwargs())
    assert Classifier(model).class_names == ["0", "1", "2", "3", "4"]
    with pytest.raises(ValueError, match="3 class names for a model with 5 classes"):
        Classifier(model, ["a", "b", "c"])
