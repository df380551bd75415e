"""``train.distill``: training against the soft targets of the model the run starts from."""

import pytest
import torch
from safetensors.torch import load_file

from lrc.presets import PresetError, apply_override, load_preset
from lrc.layers import FACTORIZED
from lrc.train import build_run, distillation_loss
from tests.conftest import preset_with
from tests.test_compare import SMALL, lrc


def test_distillation_loss_is_the_weighted_kl_and_its_gradient_is_the_softmax_difference():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 7, generator=g, dtype=torch.float64)
    task = torch.tensor(0.8, dtype=torch.float64)
    w, t = 0.6, 3.0
    p, q = torch.softmax(teacher / t, 1), torch.softmax(student / t, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    loss = distillation_loss(student, teacher, task, w, t)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, (1 - w) * task + w * t * t * kl, rtol=0, atol=1e-12)
    loss.backward()
    # d/ds T²·KL(p ‖ softmax(s/T)), averaged over the batch: T·(q − p)/B
    torch.testing.assert_close(student.grad, w * t * (q - p).detach() / 5, rtol=0, atol=1e-12)
    # weight 0 is the task loss; a student equal to its teacher adds nothing
    assert distillation_loss(student, teacher, task, 0.0, t).item() == task.item()
    assert distillation_loss(teacher, teacher, task, 0.5, t).item() == pytest.approx(0.5 * task.item(), abs=1e-15)


@pytest.mark.parametrize("assignments, message", [
    (["train.distill=1.5"], r"train.distill = 1.5 is the weight"),
    (["train.distill=0.5", "train.distill_temperature=0"], "distill_temperature = 0.0 must be > 0"),
])
def test_distill_settings_are_checked(assignments, message):
    with pytest.raises(PresetError, match=message):
        preset_with(*assignments)


def test_the_teacher_is_the_model_as_loaded_frozen_and_the_runs_use_it(tmp_path):
    """build_run's teacher is a frozen copy of the checkpoint taken before the surgery; a run with
    it ends elsewhere than one without; compare passes it to every method; bad uses are one line."""
    source = tmp_path / "dense"
    lrc("train", "--method", "dense", "--out", source, *SMALL)
    start = load_file(str(source / "model.safetensors"))
    cfg = load_preset("digits-mlp")
    for assignment in ("model.args.hidden=[32, 32]", "factorize.rank=4", "train.distill=0.5",
                       f"model.checkpoint={source / 'model.safetensors'}"):
        cfg = apply_override(cfg, assignment)
    run = build_run(cfg, torch.device("cpu"))
    assert not run.teacher.training and not any(p.requires_grad for p in run.teacher.parameters())
    assert run.teacher.state_dict().keys() == start.keys()
    assert all(torch.equal(run.teacher.state_dict()[k], start[k]) for k in start)
    assert any(isinstance(m, FACTORIZED) for m in run.model.modules())
    assert build_run(apply_override(cfg, "train.distill=0"), torch.device("cpu")).teacher is None
    for weight in ("0", "0.5"):
        lrc("train", "--checkpoint", source / "model.safetensors", "--out", tmp_path / f"w{weight}",
            "--set", f"train.distill={weight}", *SMALL)
    plain, taught = (load_file(str(tmp_path / f"w{w}" / "model.safetensors")) for w in ("0", "0.5"))
    assert plain.keys() == taught.keys() and not all(torch.equal(plain[k], taught[k]) for k in plain)
    for args, message in ((["--set", "train.distill=0.5"], "give a trained one"),
                          (["--checkpoint", source / "model.safetensors", "--set", "model.new_head=true", "--set",
                            "train.distill=0.5"], "new head is untrained")):
        bad = lrc("train", "--out", tmp_path / "bad", *args, *SMALL, check=False)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr
    proc = lrc("compare", "--methods", "lowrank-adam,lora", "--seeds", "1", "--from-dense", source,
               "--out", tmp_path / "cmp", "--set", "train.distill=0.5", *SMALL)
    assert "lowrank-adam" in proc.stdout and "lora" in proc.stdout
    assert (tmp_path / "cmp" / "runs" / "lowrank-adam-s0" / "model.safetensors").exists()


def test_distillation_loss_in_bf16_logits_is_computed_in_float32():
    s = torch.randn(3, 4).bfloat16()
    out = distillation_loss(s, s, torch.tensor(1.0), 0.5, 2.0)
    assert out.dtype == torch.float32 and out.item() == 0.5
