"""The validated policy: steps and step size chosen per support size on validation users only."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO
from metarec.cli import MetarecCLI

QUICK = str(REPO / "recipes" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
         "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    where = tmp_path_factory.mktemp("validated")
    cli = MetarecCLI(args=["--config", QUICK, "--trainer.max_epochs", "2", *QUIET,
                           "--trainer.default_root_dir", str(where)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = where / "model.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


def _test(ckpt, *extra):
    return MetarecCLI(args=["test", "--config", QUICK, "--ckpt_path", str(ckpt), *QUIET,
                            "--model.policy", "validated", *extra])


def test_calibration_sees_validation_users_only(checkpoint, monkeypatch, capsys):
    from metarec_plugins.policies.validated import Validated

    seen = []
    original = Validated.calibrate

    def spy(self, model, fast, slow, batches):
        def record():
            for batch in batches:
                seen.extend(batch.users.tolist())
                yield batch
        return original(self, model, fast, slow, record())

    monkeypatch.setattr(Validated, "calibrate", spy)
    cli = _test(checkpoint, "--model.policy_args", "{lrs: [0.01, 0.2]}",
                "--data.eval_support", "[1, 3, null]")
    val = set(cli.datamodule.splits["val"].users.tolist())
    test = set(cli.datamodule.splits["test"].users.tolist())
    assert seen and set(seen) == val and not set(seen) & test
    assert len(seen) == 3 * len(val)  # every validation user at every cap
    assert "Validated chose on the validation users" in capsys.readouterr().out
    policy = cli.model.policy
    assert set(policy.choices) == set(policy.edges)
    metrics = cli.trainer.callback_metrics
    assert "test/k1/mae" in metrics and "test/k1/steps_used" in metrics


def test_it_chooses_not_to_adapt_when_adapting_hurts(checkpoint):
    """Only a step size that wrecks every user: step 0 wins in every bucket, and the test
    users' final numbers are exactly their step-0 numbers."""
    cli = _test(checkpoint, "--model.policy_args",
                "{max_steps: 2, lrs: [1000.0], algorithm_rate: false}",
                "--model.divergence", "{factor: null}")
    assert set(cli.model.policy.choices.values()) == {(0, 0)}
    by = {(r["user"], r["step"]): r["mae"] for r in cli.model.user_results}
    assert {step for _, step in by} == {0, 1, 2}
    for (user, _), mae in by.items():
        assert mae == pytest.approx(by[(user, 0)])
    # With the algorithm's own rate available it does adapt (the quick start's maml helps).
    cli = _test(checkpoint)
    assert any(steps > 0 for _, steps in cli.model.policy.choices.values())


def test_trajectory_holds_each_task_at_its_chosen_step():
    from conftest import melu_setup
    from metarec_plugins.algorithms.maml import MAML
    from metarec_plugins.policies.validated import Validated

    algorithm = MAML(inner_steps=3, inner_lr=0.1)
    _, model, batch = melu_setup(algorithm, n_tasks=6)
    policy = Validated(max_steps=3, lrs=[0.05], buckets=[1, 20],
                       choices={1: {"steps": 1, "lr": 0.05}, 20: {"steps": 3}})
    policy.bind(algorithm)
    fast, slow = model.split()
    fast = {k: v.detach() for k, v in fast.items()}
    sizes = batch.support["mask"].sum(1)
    iterates = policy.adapt(model, fast, slow, batch.support)
    assert len(iterates) == 4
    from metarec import SGD

    for t in range(6):
        task = {k: v[t] for k, v in batch.support.items()}
        steps, lr = (3, None) if sizes[t] >= 20 else (1, 0.05)
        optimizer = algorithm.inner_optimizer() if lr is None else SGD(lr)
        ref = algorithm.adapt(model, fast, slow, task, steps=3, optimizer=optimizer,
                              first_order=True, trajectory=True)
        for s in range(4):
            for name in fast:
                torch.testing.assert_close(iterates[s][name][t], ref[min(s, steps)][name])
    assert policy.diagnostics()["steps_used"].tolist() == [
        3.0 if n >= 20 else 1.0 for n in sizes.tolist()]


def test_bad_arguments_are_clear():
    from metarec_plugins.policies.validated import Validated

    with pytest.raises(ValueError, match="buckets"):
        Validated(buckets=[2, 5])
    with pytest.raises(ValueError, match="no candidate"):
        Validated(algorithm_rate=False)
    with pytest.raises(ValueError, match="not among"):
        Validated(buckets=[1, 5], choices={3: {"steps": 1}})
