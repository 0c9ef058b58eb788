"""Bad input and faults in the newer commands (lm, vit, convert, PEFT): each gives one line that
names the problem and the fix, and nothing is lost."""
import pytest

from lors.cli import main
from lors.models.gpt import load_lm_config


@pytest.mark.parametrize("override, message", [
    ("train.clip_grad=-1", "'train.clip_grad' must be >= 0 \\(0 disables clipping\\)"),
    ("train.weight_decay=-5", "'train.weight_decay' must be >= 0"),
])
def test_negative_clipping_and_weight_decay_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_lm_config("gpt_small", [override])


def test_a_warm_up_as_long_as_the_run_is_warned_about():
    with pytest.warns(UserWarning, match="train.warmup_steps=50 is not below train.steps=20: the learning rate "
                                         "never reaches"):
        load_lm_config("gpt_small", ["train.steps=20"])


@pytest.mark.parametrize("device, message", [
    ("banana", "--device 'banana' is not a device: use cpu, cuda or cuda:N"),
    ("cuda", "torch sees no CUDA GPU here"),
])
def test_a_bad_device_is_one_line(device, message, tmp_path, capsys):
    import torch
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["lm", "train", "--config", "gpt_small", "--device", device, "--run-dir", str(tmp_path / "r"),
                 "train.steps=1", "train.warmup_steps=0"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
