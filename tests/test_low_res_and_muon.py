"""Two ingredients of the accuracy-per-minute recipe: a half-size start (--low-res) and Muon
(--optimizer muon). Both must keep exact resume, end a budget run on time, and leave a plain
full-size ViT behind; Muon must match torch.optim.Muon and run in fp32 where bf16 is emulated."""

import copy
import importlib
import json

import pytest
import torch

import vitlab
from vitlab import VisionTransformer
from vitlab import checkpoint as ckpt
from vitlab.budget import fit_total_steps, low_res_end
from vitlab.optim import Muon, MuonWithAdamW, make_optimizer, orthogonalize, set_learning_rate
from tests.image_fixtures import make_image_folder, tiny_config

from .conftest import fake_clock, tiny_vit_kwargs

train_module = importlib.import_module("vitlab.train")


# ---------------------------------------------------------------- Muon
def test_muon_is_torch_optim_muon_when_newton_schulz_runs_in_bf16():
    torch.manual_seed(0)
    # small: bf16 matmuls are emulated, and very slow, on a CPU without native bf16
    ours_w = torch.randn(24, 8, requires_grad=True)
    torch_w = copy.deepcopy(ours_w)
    ours = Muon([ours_w], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    reference = torch.optim.Muon([torch_w], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(2):
        grad = torch.randn(24, 8)
        ours_w.grad, torch_w.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    assert torch.equal(ours_w, torch_w)


@pytest.mark.parametrize("shape", [(32, 8), (8, 32), (16, 16)])
def test_fp32_newton_schulz_orthogonalises_like_the_bf16_one(shape):
    torch.manual_seed(1)
    update = torch.randn(*shape)
    fp32 = orthogonalize(update, dtype=torch.float32)
    bf16 = orthogonalize(update, dtype=torch.bfloat16).float()
    assert fp32.dtype == torch.float32 and fp32.shape == update.shape
    singular = torch.linalg.svdvals(fp32)
    assert singular.min() > 0.5 and singular.max() < 1.3  # Muon's loose orthogonality, not exact
    cosine = (fp32 * bf16).sum() / (fp32.norm() * bf16.norm())
    assert cosine > 0.99


@pytest.mark.parametrize("native", [True, False])
def test_muon_iterates_in_bf16_only_where_the_hardware_has_it(monkeypatch, native):
    """torch.optim.Muon always iterates in bf16: 1.2 s a step for nano on an AVX2 CPU, where bf16
    is emulated. vitlab's picks the format by the same probe as autocast."""
    monkeypatch.setattr(importlib.import_module("vitlab.precision"), "bf16_supported", lambda device: native)
    optimizer = make_optimizer(VisionTransformer(**tiny_vit_kwargs()), "muon", lr=1e-3, weight_decay=0.05)
    assert optimizer.muon.ns_dtype == (torch.bfloat16 if native else torch.float32)


def test_muon_trains_the_blocks_matrices_and_adamw_the_rest():
    model = VisionTransformer(**tiny_vit_kwargs(depth=2))
    optimizer = make_optimizer(model, "muon", lr=1e-3, weight_decay=0.05)
    assert isinstance(optimizer, MuonWithAdamW)
    muon_names = {n for g in optimizer.muon.param_groups for n in g["names"]}
    adamw_names = {n for g in optimizer.adamw.param_groups for n in g["names"]}
    assert muon_names == {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")}
    assert {"head.weight", "patch_embedding.projection.weight", "pos_embedding", "cls_token",
            "blocks.0.norm1.weight", "blocks.0.attention.qkv.bias"} <= adamw_names
    assert muon_names.isdisjoint(adamw_names)
    assert muon_names | adamw_names == {n for n, _ in model.named_parameters()}
    # no weight decay on what AdamW would not decay either, and the schedule reaches both
    assert all(g["weight_decay"] == 0.05 for g in optimizer.muon.param_groups)
    set_learning_rate(optimizer, 0.123)
    assert {g["lr"] for g in optimizer.param_groups} == {0.123}
    # one step moves every matrix; a state dict round-trips; AdamW's alone does not load
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(4, 3, 16, 16)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in muon_names)
    again = make_optimizer(model, "muon", lr=1e-3, weight_decay=0.05)
    again.load_state_dict(optimizer.state_dict())
    for which in ("muon", "adamw"):
        saved, loaded = optimizer.state_dict()[which]["state"], again.state_dict()[which]["state"]
        assert saved.keys() == loaded.keys() and saved
        assert all(torch.equal(saved[k][f], loaded[k][f]) for k in saved for f in saved[k])
    with pytest.raises(ValueError, match="not Muon \\+ AdamW"):
        again.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


# ---------------------------------------------------------------- half-size start
def test_the_model_takes_half_size_images_only_inside_any_image_size():
    model = VisionTransformer(**tiny_vit_kwargs())  # 16x16 images, patch 4
    half = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="expected 16x16 images, got 8x8"):
        model(half)
    with model.any_image_size():
        assert model(half).shape == (2, model.config.num_classes)
    assert model.config.dynamic_image_size is False  # back to a fixed-size model
    with pytest.raises(RuntimeError), model.any_image_size():
        raise RuntimeError("a failing step")
    assert model.config.dynamic_image_size is False


def test_the_budget_buys_more_steps_with_a_cheaper_half_size_start():
    args = dict(budget_s=600.0, elapsed_s=30.0, steps_done=20, step_s=0.8, steps_per_epoch=351,
                eval_s_per_epoch=10.0)
    plain = fit_total_steps(**args)
    cheap = fit_total_steps(**args, low_res=(0.5, 0.2))
    assert cheap > plain * 1.4
    # and spends the budget: half-size steps at 0.2 s, the rest at 0.8 s
    first_full = low_res_end(cheap, 0.5)
    spent = 30 + (first_full - 20) * 0.2 + (cheap - first_full) * 0.8 + -(-cheap // 351) * 10
    assert 600 * 0.95 < spent <= 600


@pytest.fixture
def images(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return make_image_folder(tmp_path / "images")


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_half_size_start_trains_first_and_saves_a_full_size_model(images, tmp_path):
    result = vitlab.train(tiny_config(images, tmp_path / "run", precision="fp32", low_res=0.5, epochs=4))
    rows = _rows(result.run_dir)
    total = 4 * 3  # 90 images, batch 30: 3 steps an epoch
    assert [r["half_size_steps"] for r in rows] == [3, 3, 0, 0]  # round(0.5 * 12) = 6 steps, first
    model = vitlab.load(result.run_dir).model
    assert model.config.image_size == 16 and model.config.dynamic_image_size is False
    state = ckpt.load_training_state(result.run_dir / ckpt.STATE_FILE)
    assert state["low_res_end"] == low_res_end(total, 0.5) == 6
    assert (result.run_dir / "metrics.csv").read_text().splitlines()[0].count("half_size_steps") == 1


def test_half_size_and_muon_runs_resume_bit_identical(images, tmp_path):
    options = dict(precision="fp32", low_res=0.5, optimizer="muon", epochs=3)
    straight = vitlab.train(tiny_config(images, tmp_path / "straight", **options))
    # 9 steps, the first round(4.5) = 4 at half size: stopped mid-epoch after the switch, so the
    # resumed run must read the boundary back from the state file
    broken = vitlab.train(tiny_config(images, tmp_path / "run", max_steps=5, **options))
    assert ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)["low_res_end"] == 4
    assert broken.status == "stopped"
    resumed = vitlab.train(resume=str(tmp_path / "run"))
    assert resumed.status == "completed"
    a = ckpt.load_training_state(straight.run_dir / ckpt.STATE_FILE)
    b = ckpt.load_training_state(resumed.run_dir / ckpt.STATE_FILE)
    assert a["global_step"] == b["global_step"] == 9 and a["low_res_end"] == b["low_res_end"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for which in ("muon", "adamw"):
        for key, entry in a["optimizer"][which]["state"].items():
            for field, value in entry.items():
                assert torch.equal(value, b["optimizer"][which]["state"][key][field]), (which, key, field)
    assert [r["val_loss"] for r in _rows(straight.run_dir)] == [r["val_loss"] for r in _rows(resumed.run_dir)]


def _budget_run(images, out, budget: float, **overrides) -> tuple[dict, list[dict]]:
    """A completed tiny fp32 --time-budget run without EMA: (config.json's "resolved", metrics rows)."""
    result = vitlab.train(tiny_config(images, out, precision="fp32", time_budget=budget, ema_decay=None, **overrides))
    assert result.status == "completed"
    return json.loads((result.run_dir / "config.json").read_text())["resolved"], _rows(result.run_dir)


def test_a_budget_run_with_a_half_size_start_ends_within_its_budget(images, tmp_path, monkeypatch):
    clock = fake_clock(monkeypatch, 0.01)
    budget = 6.0
    resolved, rows = _budget_run(images, tmp_path / "run", budget, low_res=0.6, batch_size=10, warmup_epochs=0.5)
    half = sum(r["half_size_steps"] for r in rows)
    assert half == resolved["low_res_end"] > 0
    assert resolved["total_steps"] > half  # it ends at full size
    # the fake clock also ticks for each epoch's bookkeeping outside any timed window: 37 short
    # epochs here, which end the same run without --low-res at 6.16 s
    assert clock["t"] <= budget * 1.03


def test_a_boundary_that_passes_while_the_budget_is_timed_keeps_the_run_its_length(images, tmp_path, monkeypatch):
    """Timing ends on an epoch's last step (25 of 5 x 5) after the boundary of a small --low-res
    (a tenth of ~300 steps): every step so far ran at half size, and must be counted so. Counted
    from round(0.1 * total) instead, the epoch's pace looked like a full step's, a half-size step
    came out at a negative cost, and the run stopped one step later, at a quarter of its budget."""
    clock = fake_clock(monkeypatch, 0.01)
    pacing = importlib.import_module("vitlab.pacing")
    monkeypatch.setattr(pacing, "_low_res_saving", lambda job, images: 0.03)  # full size costs 3 ticks more
    budget = 8.0
    resolved, rows = _budget_run(images, tmp_path / "run", budget, low_res=0.1, batch_size=18, warmup_epochs=5)
    assert sum(r["half_size_steps"] for r in rows) == resolved["low_res_end"] == 25  # frozen where timing ended
    assert resolved["total_steps"] > 100  # not 26
    assert clock["t"] <= budget * 1.05


def test_a_model_whose_half_size_is_not_whole_patches_is_a_one_line_error(images, tmp_path):
    config = tiny_config(images, tmp_path / "run", low_res=0.5,
                         model_overrides=dict(dim=32, depth=1, heads=4, mlp_dim=64, image_size=16, patch_size=16))
    with pytest.raises(ValueError, match="--low-res needs half-size images made of whole patches.*--low-res 0"):
        vitlab.train(config)


@pytest.mark.parametrize("field, value, phrase", [("low_res", 1.0, "must be in \\[0, 1\\)"),
                                                  ("low_res", -0.1, "must be in \\[0, 1\\)"),
                                                  ("optimizer", "sgd", "optimizer must be 'adamw' or 'muon'")])
def test_bad_settings_are_named(field, value, phrase):
    from vitlab.config import TrainConfig

    with pytest.raises(ValueError, match=phrase):
        TrainConfig(**{field: value})
