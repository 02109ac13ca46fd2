"""Meta-distillation: lambda = 0 is MAML, the teacher is frozen, lambda = 1 pulls toward it."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO
from metarec import train_recipe
from metarec.cli import MetarecCLI
from metarec_plugins.algorithms.distill import Distill
from metarec_plugins.algorithms.maml import MAML

QUICK = str(REPO / "recipes" / "quickstart.yaml")
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
         "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    return train_recipe(QUICK, path, ["--model.algorithm", "pretrain", "--trainer.max_epochs", "2",
                                      "--model.backbone_args.hidden", "[64, 64]"])


def _student(teacher, weight, *extra):
    args = ["--config", QUICK, *QUIET, "--model.algorithm", "distill",
            "--model.algorithm_args", f"{{teacher_checkpoint: {teacher}, weight: {weight}, "
                                      "inner_steps: 3, inner_lr: 0.05}", *extra]
    return MetarecCLI(args=args, run=False)


def test_weight_zero_is_exactly_maml(teacher, in_tmp):
    cli = _student(teacher, 0.0)
    model, batch = cli.model, next(iter(cli.datamodule.train_dataloader()))
    assert isinstance(model.algorithm, Distill)
    loss, logs = model.algorithm.outer_loss(model.functional, batch)
    grads = torch.autograd.grad(loss, list(model.backbone.parameters()))
    maml = MAML(inner_steps=3, inner_lr=0.05)
    ref = maml.outer_loss(model.functional, batch)[0]
    ref_grads = torch.autograd.grad(ref, list(model.backbone.parameters()))
    assert torch.equal(loss, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    assert logs["distill_loss"] > 0  # the term exists, it is just weighted by zero


def test_teacher_is_frozen_and_bit_identical_after_training(teacher, in_tmp):
    cli = _student(teacher, 0.5, "--trainer.max_steps", "5", "--trainer.max_epochs", "1")
    algo = cli.model.algorithm
    before = {k: v.clone() for k, v in algo.teacher.state_dict().items()}
    assert all(not p.requires_grad for p in algo.teacher.parameters())
    assert not any(k.startswith("algorithm") for k in cli.model.state_dict())  # not in the student
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 5
    assert all(p.grad is None for p in algo.teacher.parameters())
    for k, v in algo.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def _adapted_gap_to_teacher(teacher, weight):
    """Mean squared gap between adapted student and teacher on validation queries, after training."""
    cli = _student(teacher, weight, "--trainer.max_steps", "30", "--trainer.max_epochs", "5",
                   "--model.optimizer", "{class_path: torch.optim.Adam, init_args: {lr: 0.01}}")
    model = cli.model
    cli.trainer.fit(model, datamodule=cli.datamodule)
    batch = next(iter(cli.datamodule.val_dataloader()))
    target = model.algorithm.teacher_scores(batch.query)
    slow = {k: v.detach() for k, v in model.functional.split()[1].items()}
    scores = model.functional.predict_tasks(model.adapt(batch)[-1], slow, batch.query)
    return float(((scores - target) ** 2)[batch.query["mask"]].mean())


def test_weight_one_moves_adapted_student_toward_teacher(teacher, in_tmp):
    """Same seed and steps: distilling (lambda = 1) ends closer to the teacher than lambda = 0."""
    pulled, free = _adapted_gap_to_teacher(teacher, 1.0), _adapted_gap_to_teacher(teacher, 0.0)
    # Measured at this seed: 0.023 with distillation, 0.127 without.
    assert pulled < 0.5 * free, (pulled, free)


def test_missing_teacher_without_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher checkpoint .* not found"):
        Distill(teacher_checkpoint=str(tmp_path / "nope.ckpt"))


def test_a_trained_student_is_served_without_its_teacher(tmp_path, in_tmp):
    """Adapter.from_checkpoint rebuilds for inference: the teacher file may be gone."""
    import shutil

    from metarec import Adapter

    teacher_copy = tmp_path / "t.ckpt"
    teacher_path = train_recipe(QUICK, teacher_copy, ["--model.algorithm", "pretrain",
                                                      "--trainer.max_steps", "2"])
    cli = _student(teacher_path, 0.5, "--trainer.max_steps", "2", "--trainer.max_epochs", "1")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    student = tmp_path / "student.ckpt"
    cli.trainer.save_checkpoint(student)
    shutil.move(teacher_path, tmp_path / "moved.ckpt")
    adapter = Adapter.from_checkpoint(student)
    session = adapter.adapt([(1, 4.0), (2, 2.0), (3, 5.0)], user=0)
    assert len(session.recommend(5).items) == 5
    with pytest.raises(FileNotFoundError, match="teacher checkpoint"):
        _student(teacher_path, 0.5)  # training still needs it
