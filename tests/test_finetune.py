import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab import VisionTransformer
from vitlab.weights import adapt_input_channels, detect_format, load_initial_weights, read_state_dict
from vitlab.reference import SeedVisionTransformer

from .conftest import tiny_vit_kwargs


def _eval(model):
    return model.eval()


def test_head_replacement_keeps_the_backbone_outputs_unchanged():
    source = _eval(VisionTransformer(**tiny_vit_kwargs(num_classes=5)))
    target = _eval(VisionTransformer(**tiny_vit_kwargs(num_classes=2)))
    notes = load_initial_weights(target, source.state_dict())
    assert any("replaced the head: 5 -> 2 classes" in n for n in notes)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(target.forward_features(x), source.forward_features(x))
    assert target(x).shape == (2, 2)


def test_position_interpolation_keeps_the_original_size_outputs():
    source = _eval(VisionTransformer(**tiny_vit_kwargs()))
    # a smooth position embedding, as training produces, survives resampling up and back down
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 4), torch.linspace(0, 1, 4), indexing="ij")
    smooth = torch.stack([torch.sin(rows * k / 16 + cols * (2 - k / 16)) for k in range(32)], dim=-1)
    smooth = smooth.reshape(1, 16, 32)
    with torch.no_grad():
        source.pos_embedding[:, 1:] = smooth
    target = _eval(VisionTransformer(**tiny_vit_kwargs(num_classes=2, image_size=32)))
    notes = load_initial_weights(target, source.state_dict())
    assert any("from a 4x4 to a 8x8 patch grid" in n for n in notes)
    assert target(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    target.set_image_size(16)
    x = torch.randn(2, 3, 16, 16)
    got, want = target.forward_features(x), source.forward_features(x)
    assert (got - want).abs().mean() < 0.01 * want.abs().mean()


def test_rgb_to_grey_sums_the_patch_filters_so_grey_images_match():
    source = _eval(VisionTransformer(**tiny_vit_kwargs()))
    target = _eval(VisionTransformer(**tiny_vit_kwargs(in_channels=1)))
    notes = load_initial_weights(target, source.state_dict())
    assert any("from 3 to 1 input channel(s): summed the RGB filters" in n for n in notes)
    grey = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(target(grey), source(grey.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_other_channel_counts_repeat_and_rescale():
    w = torch.randn(8, 3, 4, 4)
    out = adapt_input_channels(w, 4)
    assert out.shape == (8, 4, 4, 4)
    torch.testing.assert_close(out[:, 3], w[:, 0] * 0.75)


def test_misfitting_weights_are_named_or_skipped_with_partial():
    source = VisionTransformer(**tiny_vit_kwargs(mlp_dim=128)).state_dict()
    target = VisionTransformer(**tiny_vit_kwargs())
    with pytest.raises(ValueError, match=r"6 weight\(s\) do not fit the model: blocks.0.mlp.fc1.weight "
                                         r"\(shape \(128, 32\) vs \(64, 32\)\)"):
        load_initial_weights(target, source)
    notes = load_initial_weights(target, source, partial=True)
    assert any(n.startswith("skipped 6 weight(s)") for n in notes)


def test_timm_and_seed_weights_load_and_give_the_same_logits(tmp_path):
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = _eval(VisionTransformer(**tiny_vit_kwargs(init="trunc_normal")))
    timm_model = _eval(TimmViT(**vitlab.timm_model_kwargs(model.config)))
    save_file(timm_model.state_dict(), tmp_path / "timm.safetensors")
    sd = read_state_dict(tmp_path / "timm.safetensors")
    assert detect_format(sd) == "timm"
    load_initial_weights(model, sd)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), timm_model(x), atol=1e-5, rtol=1e-5)

    seed = _eval(SeedVisionTransformer(16, 4, 3, 5, 32, 2, 4, 64, 0.0))
    torch.save({"state_dict": seed.state_dict()}, tmp_path / "seed.pt")
    sd = read_state_dict(tmp_path / "seed.pt")
    assert detect_format(sd) == "seed"
    load_initial_weights(model, sd)
    torch.testing.assert_close(model(x), seed(x), atol=1e-5, rtol=1e-5)


def test_read_state_dict_refuses_pickled_objects_and_garbage(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"weights": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt cannot be loaded as plain tensors"):
        read_state_dict(tmp_path / "evil.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        read_state_dict(tmp_path / "missing.pt")


# ---------------------------------------------------------------- end to end through vitlab.train
def _grey_folder(root, per_class=30):
    """The generated three-class folder, saved as 1-channel (mode L) PNGs."""
    from PIL import Image

    from tests.image_fixtures import make_image_folder

    make_image_folder(root, per_class=per_class)
    for path in root.rglob("*.png"):
        Image.open(path).convert("L").save(path)
    return root


def test_init_from_a_run_at_another_size_replaces_head_and_interpolates(tmp_path, capsys):
    import shutil

    from tests.image_fixtures import make_image_folder, tiny_config, train_tiny_run

    source = train_tiny_run(tmp_path / "pre")
    two_class = make_image_folder(tmp_path / "two", per_class=30)
    shutil.rmtree(two_class / "train" / "stripes")
    result = vitlab.train(tiny_config(two_class, tmp_path / "tuned", init=str(source), epochs=2,
                                      model_overrides={"image_size": 24}, val_size=12))
    out = capsys.readouterr().out
    assert "replaced the head: 3 -> 2 classes" in out
    assert "from a 4x4 to a 6x6 patch grid" in out
    tuned = vitlab.load(result.run_dir)
    assert tuned.image_size == (24, 24) and tuned.class_names == ["circle", "cross"]
    assert tuned.model.config.dim == 32  # the architecture came from the checkpoint


def test_init_grey_from_rgb_sums_filters_and_trains_a_one_channel_model(tmp_path, capsys):
    from tests.image_fixtures import tiny_config, train_tiny_run

    source = train_tiny_run(tmp_path / "pre")
    grey = _grey_folder(tmp_path / "grey")
    result = vitlab.train(tiny_config(grey, tmp_path / "grey-run", init=str(source), epochs=2,
                                      model_overrides={"in_channels": 1}))
    assert "from 3 to 1 input channel(s): summed the RGB filters" in capsys.readouterr().out
    model = vitlab.load(result.run_dir)
    assert model.in_channels == 1 and len(model.mean) == 1
    assert result.best_val_top1 > 0.5  # three classes: chance is 0.33


def test_one_channel_from_scratch(tmp_path):
    from tests.image_fixtures import tiny_config

    grey = _grey_folder(tmp_path / "grey")
    result = vitlab.train(tiny_config(grey, tmp_path / "run", model_overrides={
        **tiny_config(grey, tmp_path).model_overrides, "in_channels": 1}))
    assert vitlab.load(result.run_dir).model.patch_embedding.projection.weight.shape[1] == 1
    assert result.best_val_top1 > 0.5


def test_init_from_timm_and_seed_files_through_train(tmp_path, capsys):
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from tests.image_fixtures import TINY_MODEL, make_image_folder, tiny_config

    images = make_image_folder(tmp_path / "images")
    config = vitlab.ViTConfig(**{**vitlab.presets.PRESETS["nano"], **TINY_MODEL, "num_classes": 7})
    save_file(TimmViT(**vitlab.timm_model_kwargs(config)).state_dict(), tmp_path / "timm.safetensors")
    seed = SeedVisionTransformer(16, 4, 3, 7, 32, 2, 4, 64, 0.0)
    torch.save(seed.state_dict(), tmp_path / "seed.pth")
    for weights in ("timm.safetensors", "seed.pth"):
        vitlab.train(tiny_config(images, tmp_path / f"run-{weights}", init=str(tmp_path / weights), epochs=1))
        out = capsys.readouterr().out
        assert f"({'timm' if 'timm' in weights else 'seed'} format)" in out
        assert "replaced the head: 7 -> 3 classes" in out


def test_freeze_backbone_trains_only_the_head(tmp_path):
    from tests.image_fixtures import tiny_config, train_tiny_run

    source = train_tiny_run(tmp_path / "pre")
    result = vitlab.train(tiny_config(tmp_path / "pre" / "images", tmp_path / "probe", init=str(source),
                                      freeze="backbone", epochs=1, ema_decay=None))
    before, after = vitlab.load(source).model, vitlab.load(result.run_dir).model
    assert torch.equal(before.blocks[0].mlp.fc1.weight, after.blocks[0].mlp.fc1.weight)
    assert not torch.equal(before.head.weight, after.head.weight)


def test_cli_init_flags_and_bad_weights(tmp_path, capsys):
    from vitlab.cli import main

    from tests.image_fixtures import make_image_folder

    images = make_image_folder(tmp_path / "images")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    code = main(["train", "--data", str(images), "--out", str(tmp_path / "run"), "--init",
                 str(tmp_path / "junk.pt"), "--epochs", "1"])
    assert code == 2
    assert "junk.pt cannot be loaded as plain tensors" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tune_cifar_checkpoint_on_two_classes_at_another_size(cifar_jpeg_archive, tmp_path, capsys):
    """A small model pretrained on a CIFAR-10 slice, fine-tuned on airplane-vs-frog at 48x48."""
    import tarfile

    from vitlab.config import train_preset

    pretrain = train_preset("nano", data=str(cifar_jpeg_archive), out=str(tmp_path / "pre"), subset=2000,
                            val_size=500, epochs=2, batch_size=64, lr=3e-3, warmup_epochs=0.3,
                            model_overrides=dict(dim=64, depth=3, heads=4, mlp_dim=128, patch_size=8))
    source = vitlab.train(pretrain).run_dir

    folder = tmp_path / "two"
    wanted = {"airplane": 0, "frog": 0}
    with tarfile.open(cifar_jpeg_archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and wanted.get(parts[1], 300) < 300:
                wanted[parts[1]] += 1
                (folder / parts[1]).mkdir(parents=True, exist_ok=True)
                (folder / parts[1] / parts[2]).write_bytes(tar.extractfile(member).read())
            if all(n == 300 for n in wanted.values()):
                break
    tuned = train_preset("finetune", data=str(folder), out=str(tmp_path / "tuned"), init=str(source),
                         model_overrides={"image_size": 48}, val_size=100, epochs=3, batch_size=50)
    result = vitlab.train(tuned)
    out = capsys.readouterr().out
    assert "replaced the head: 10 -> 2 classes" in out and "from a 4x4 to a 6x6 patch grid" in out
    assert result.best_val_top1 > 0.75  # chance is 0.5


def test_initial_weights_from_a_checkpoint_fix_the_architecture(tmp_path):
    """InitialWeights (what --init reads) on a vitlab checkpoint, one whose model_config still
    holds class names (as checkpoints did before they moved out of ViTConfig), and a timm file."""
    import json

    from safetensors.torch import load_file

    from vitlab.checkpoint import read_safetensors_metadata, save_model
    from vitlab.presets import preset_config
    from vitlab.weights import InitialWeights

    source = VisionTransformer(**tiny_vit_kwargs(image_size=24, init="trunc_normal")).eval()
    path = tmp_path / "best.safetensors"
    save_model(path, source, class_names=list("abcde"), mean=(0.5,) * 3, std=(0.5,) * 3)
    raw = read_safetensors_metadata(path)
    raw["model_config"] = json.dumps({**json.loads(raw["model_config"]), "class_names": list("abcde")})
    save_file(load_file(path), path, metadata=raw)

    init = InitialWeights(tmp_path)  # a run directory: its best checkpoint
    assert init.config.dim == 32 and init.config.image_size in (24, (24, 24))
    assert set(init.tensors) == set(source.state_dict())
    config = init.model_config(preset_config("nano"), {"image_size": 16})
    assert (config.dim, config.depth, to_pair(config.image_size)) == (32, 2, (16, 16))
    model = VisionTransformer.from_config(config).eval()
    notes = init.load_into(model)
    assert notes[0].startswith(f"initialised from {tmp_path}: loaded") and "(vitlab format)" in notes[0]
    assert any("from a 6x6 to a 4x4 patch grid" in n for n in notes)
    assert torch.equal(model.head.weight, source.head.weight)

    # a bare state_dict file carries no architecture: the run's preset is kept as it is
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    plain = InitialWeights(tmp_path / "plain.pt")
    base = preset_config("nano")
    assert plain.config is None and plain.model_config(base, {"image_size": 16}) is base
    save_file({"weight": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="not a ViT state_dict"):
        InitialWeights(tmp_path / "foreign.safetensors")


def to_pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)
