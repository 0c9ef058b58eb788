"""Run-directory safety: reruns with other settings are refused, nothing is deleted that the
user did not ask to delete, one trainer per directory, and a failed or truncated checkpoint
never costs the previous one."""
import csv
import errno

import pytest

from lors.engine import checkpoint as checkpoint_module
from lors.experiments.detection import train as train_module
from lors.engine.checkpoint import CheckpointWriteError, find_checkpoint
from lors.engine.rundir import PREVIOUS, RunDirBusyError, RunLock
from lors.engine.schedule import Schedule
from lors.experiments.detection.train import EpochSampler, train
from test_train import losses, tiny_config


def ckpts(run):
    return sorted(p.name for p in run.glob("ckpt_*"))


def test_a_rerun_with_other_settings_is_refused_and_names_the_keys(tmp_path):
    cfg = tiny_config(tmp_path, "tiny")
    run = tmp_path / "run"
    train(cfg, run, progress=False, evaluate_at_end=False)
    before = (run / "config.yaml").read_text()
    other = tiny_config(tmp_path, "tiny", "train.lr=1e-3", "train.seed=5")
    with pytest.raises(ValueError, match=r"train\.lr .*train\.seed .*--no-resume"):
        train(other, run, progress=False, evaluate_at_end=False)
    assert (run / "config.yaml").read_text() == before  # still describes the checkpoint
    # another model's config: named keys, not a dump of missing tensors
    with pytest.raises(ValueError, match=r"decoder\.num_stages"):
        train(tiny_config(tmp_path, "tiny", "decoder.num_stages=3"), run, progress=False,
              evaluate_at_end=False)
    # settings that do not touch the weights may change
    train(tiny_config(tmp_path, "tiny", "train.log_every=3", "data.num_workers=0"), run, progress=False,
          evaluate_at_end=False)



def test_a_run_saved_before_a_key_existed_resumes_at_its_default_only(tmp_path):
    """A config key added after a run was saved (the run's stored config lacks it) compares as
    its default: the run resumes with the default and is refused with any other value."""
    import json
    cfg = tiny_config(tmp_path, "tiny_lors")
    run = tmp_path / "run"
    assert train(cfg, run, progress=False, evaluate_at_end=False)["steps"] == 6
    for ckpt in run.glob("ckpt_*"):  # as written before train.private_lr_scale existed
        state = json.loads((ckpt / "state.json").read_text())
        del state["config"]["train"]["private_lr_scale"]
        (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"train\.private_lr_scale 1\.0 -> 2\.0"):
        train(tiny_config(tmp_path, "tiny_lors", "train.epochs=5", "train.private_lr_scale=2.0"), run, progress=False,
              evaluate_at_end=False, extend=True)
    assert train(tiny_config(tmp_path, "tiny_lors", "train.epochs=4"), run, progress=False, evaluate_at_end=False,
                 extend=True)["steps"] == 8  # resumed: the default is what the old run did


def test_a_longer_schedule_extends_a_run_only_when_asked(tmp_path):
    cfg = tiny_config(tmp_path, "tiny")
    run = tmp_path / "run"
    assert train(cfg, run, progress=False, evaluate_at_end=False)["steps"] == 6
    longer = tiny_config(tmp_path, "tiny", "train.epochs=4")
    with pytest.raises(ValueError, match="--extend"):
        train(longer, run, progress=False, evaluate_at_end=False)
    with pytest.raises(ValueError, match="cannot be shortened"):
        train(tiny_config(tmp_path, "tiny", "train.epochs=2"), run, progress=False, evaluate_at_end=False)
    assert train(longer, run, progress=False, evaluate_at_end=False, extend=True)["steps"] == 8
    assert [s for s, _ in losses(run)] == list(range(1, 9))


def test_a_missing_last_json_resumes_from_the_newest_checkpoint_and_deletes_nothing(tmp_path):
    cfg = tiny_config(tmp_path, "tiny_lors", "train.lr=1e-3")
    whole = train(cfg, tmp_path / "whole", progress=False, evaluate_at_end=False)
    run = tmp_path / "run"
    train(cfg, run, stop_after=4, progress=False, evaluate_at_end=False)
    (run / "last.json").unlink()
    assert find_checkpoint(run).name == "ckpt_00000004"
    assert train(cfg, run, progress=False, evaluate_at_end=False)["steps"] == whole["steps"]
    assert losses(run) == losses(tmp_path / "whole")


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "tiny_lors", "train.lr=1e-3")
    train(cfg, tmp_path / "whole", progress=False, evaluate_at_end=False)
    run = tmp_path / "run"
    train(cfg, run, stop_after=4, progress=False, evaluate_at_end=False)
    model_file = run / "ckpt_00000004" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    train(cfg, run, progress=False, evaluate_at_end=False)
    assert "ckpt_00000004 is unreadable" in capsys.readouterr().out
    assert losses(run) == losses(tmp_path / "whole")  # resumed exactly from step 2


def test_a_second_trainer_is_refused_while_the_directory_is_locked(tmp_path):
    cfg = tiny_config(tmp_path, "tiny")
    run = tmp_path / "run"
    train(cfg, run, progress=False, evaluate_at_end=False)
    before = ckpts(run)
    with RunLock(run):  # a live run holds the directory
        with pytest.raises(RunDirBusyError, match=r"in use by pid \d+"):
            train(cfg, run, resume=False, progress=False, evaluate_at_end=False)
    assert ckpts(run) == before and (run / "last.json").exists()
    train(cfg, run, resume=False, progress=False, evaluate_at_end=False)  # released: trains


def test_no_resume_keeps_the_old_run_until_the_new_one_saves_a_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "tiny")
    run = tmp_path / "run"
    train(cfg, run, progress=False, evaluate_at_end=False)
    old = ckpts(run)
    (run / "notes.txt").write_text("mine")  # not the run's: never moved or deleted
    real = train_module.build_criterion

    def crash_at_step_1(cfg):
        criterion = real(cfg)

        def boom(*args):
            raise RuntimeError("simulated crash")
        criterion.forward = boom
        return criterion

    monkeypatch.setattr(train_module, "build_criterion", crash_at_step_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, run, resume=False, progress=False, evaluate_at_end=False)
    assert ckpts(run / PREVIOUS) == old and (run / PREVIOUS / "last.json").exists()
    assert find_checkpoint(run) is None  # a later resume does not silently continue the old run
    monkeypatch.setattr(train_module, "build_criterion", real)
    train(cfg, run, resume=False, progress=False, evaluate_at_end=False)
    assert not (run / PREVIOUS).exists() and ckpts(run) == old  # replaced once the new run had saved
    assert (run / "notes.txt").read_text() == "mine"
    rows = list(csv.reader((run / "log.csv").open()))
    assert [r[0] for r in rows][:2] == ["step", "1"] and len(rows) == 7  # one run's log, not two


def test_a_failed_checkpoint_write_leaves_no_partial_folder_and_keeps_the_previous(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "tiny")
    run = tmp_path / "run"
    real, calls = checkpoint_module.save_file, []

    def full_disk(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*ckpt_00000002 is intact"):
        train(cfg, run, progress=False, evaluate_at_end=False)
    assert ckpts(run) == ["ckpt_00000002"] and not list(run.glob(".ckpt_*"))
    assert find_checkpoint(run).name == "ckpt_00000002"


def test_ctrl_c_leaves_a_resumable_run_and_releases_the_lock(tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, "tiny")
    run = tmp_path / "run"
    real = Schedule.scale_groups

    def interrupt_at_3(self, optimizer, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, optimizer, step)

    monkeypatch.setattr(Schedule, "scale_groups", interrupt_at_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False, evaluate_at_end=False)
    assert "ckpt_00000002 is intact, rerun the same command to resume" in capsys.readouterr().err
    monkeypatch.setattr(Schedule, "scale_groups", real)
    assert train(cfg, run, progress=False, evaluate_at_end=False)["steps"] == 6


def test_an_unwritable_run_directory_is_named(tmp_path):
    cfg = tiny_config(tmp_path, "tiny")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable.*--run-dir"):
        train(cfg, blocker / "run", progress=False, evaluate_at_end=False)


def test_an_empty_training_set_is_named_as_such():
    with pytest.raises(ValueError, match="no images.*data.train_annotations"):
        EpochSampler(0, 2, seed=0)
    with pytest.raises(ValueError, match="lower train.batch_size"):
        EpochSampler(3, 4, seed=0)
