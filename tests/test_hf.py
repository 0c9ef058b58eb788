"""HuggingFace folders (lors.save_pretrained / lors.from_pretrained) and Trainer resume."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lors
import lors.hf
from lors.hf import MARKER_KEY, WEIGHTS_NAME

transformers = pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainerCallback,
                          TrainingArguments)

transformers.logging.set_verbosity_error()


def tiny_llama(seed=0, layers=3, tie=False):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def shared_llama(seed=0, layers=3, tie=False):
    model = tiny_llama(seed, layers, tie)
    lors.share_layers(model.model.layers, rank=4)
    with torch.no_grad():  # non-zero private parts, so each layer's weight is its own
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran to the cat"],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model):
    return model(TOKENS).logits


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_after_share_layers(tmp_path, tie):
    model = shared_llama(tie=tie)
    lors.save_pretrained(model, tmp_path / "m")
    loaded = lors.from_pretrained(tmp_path / "m")
    assert type(loaded) is LlamaForCausalLM
    assert any(isinstance(m, lors.LorsLinear) for m in loaded.modules())
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)


def test_round_trip_after_convert_layers(tmp_path):
    model = tiny_llama()
    lors.convert_layers(model.model.layers, targets=["self_attn.q_proj", "mlp.up_proj"], form="basis",
                        rank=8, groups=2)
    lors.save_pretrained(model, tmp_path / "m")
    loaded = lors.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.model.layers[2].mlp.up_proj, lors.LorsLinear)
    assert isinstance(loaded.model.layers[2].mlp.down_proj, torch.nn.Linear)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)


def test_folder_holds_each_shared_tensor_once(tmp_path):
    model = shared_llama()
    lors.save_pretrained(model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    assert sum(".shared_weight" in k for k in keys) == 7  # one per Linear of a Llama layer
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_tokenizer_and_generation_config_are_kept(tmp_path):
    model, tokenizer = shared_llama(), tiny_tokenizer()
    model.generation_config.max_new_tokens = 7
    lors.save_pretrained(model, tmp_path / "m", tokenizer=tokenizer)
    again = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert again("the cat ran")["input_ids"] == tokenizer("the cat ran")["input_ids"]
    assert lors.from_pretrained(tmp_path / "m").generation_config.max_new_tokens == 7


@pytest.mark.parametrize("cls", [AutoModelForCausalLM, LlamaForCausalLM])
def test_plain_from_pretrained_refuses_naming_lors(tmp_path, cls):
    lors.save_pretrained(shared_llama(), tmp_path / "m")
    assert AutoConfig.from_pretrained(str(tmp_path / "m")).model_type == "llama"
    with pytest.raises(ValueError, match=r"lors\.from_pretrained"):
        cls.from_pretrained(str(tmp_path / "m"))


def test_without_marker_plain_from_pretrained_finds_no_weights(tmp_path):
    """An older transformers ignores the marker; it finds no model.safetensors either."""
    lors.save_pretrained(shared_llama(), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    del config[MARKER_KEY]
    path.write_text(json.dumps(config))
    with pytest.raises(OSError, match="model.safetensors"):
        LlamaForCausalLM.from_pretrained(str(tmp_path / "m"))


def test_marker_stays_in_the_folder(tmp_path):
    model = shared_llama()
    assert model.config.architectures is None
    lors.save_pretrained(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert model.config.architectures is None and not hasattr(model.config, MARKER_KEY)
    assert not hasattr(lors.from_pretrained(tmp_path / "m").config, MARKER_KEY)


def test_save_into_existing_folder_replaces_it(tmp_path):
    lors.save_pretrained(shared_llama(seed=0), tmp_path / "m")
    second = shared_llama(seed=1)
    lors.save_pretrained(second, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left
    torch.testing.assert_close(logits(lors.from_pretrained(tmp_path / "m")), logits(second),
                               rtol=0, atol=1e-6)


def test_save_bad_input_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        lors.save_pretrained(shared_llama(), tmp_path / "file")
    with pytest.raises(lors.serialization.SaveError, match="cannot create"):
        lors.save_pretrained(shared_llama(), tmp_path / "file" / "m")  # its parent is a file
    with pytest.raises(ValueError, match="holds no LORS layers"):
        lors.save_pretrained(tiny_llama(), tmp_path / "plain")
    with pytest.raises(ValueError, match="PreTrainedModel"):
        lors.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear")
    with pytest.raises(ValueError, match="no save_pretrained"):
        lors.save_pretrained(shared_llama(), tmp_path / "tok", tokenizer="gpt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_load_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        lors.from_pretrained(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        lors.from_pretrained(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        lors.from_pretrained(tmp_path / "empty")
    tiny_llama().save_pretrained(tmp_path / "plain")  # a plain transformers folder
    with pytest.raises(ValueError, match="no lors.safetensors: it holds a plain transformers"):
        lors.from_pretrained(tmp_path / "plain")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain" / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="has no LORS layout"):
        lors.from_pretrained(tmp_path / "plain")


def test_load_damaged_config_is_named(tmp_path):
    lors.save_pretrained(shared_llama(), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not a transformers config"):
        lors.from_pretrained(tmp_path / "m")


def test_config_that_does_not_fit_the_tensors_is_named(tmp_path):
    lors.save_pretrained(shared_llama(layers=3), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(path.read_text().replace('"num_hidden_layers": 3', '"num_hidden_layers": 2'))
    with pytest.raises(ValueError, match="shares 3 layers"):
        lors.from_pretrained(tmp_path / "m")


def test_missing_transformers_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[convert\]'"):
        lors.from_pretrained(tmp_path)


# Trainer: a run resumed from checkpoint-3 continues as the uninterrupted run did.

class _Dataset(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Losses(TrainerCallback):
    """The losses this run logged itself (log_history also holds the checkpoint's)."""

    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def _train(out, model, resume=None):
    args = TrainingArguments(str(out), max_steps=6, save_steps=3, logging_steps=1, learning_rate=1e-2,
                             per_device_train_batch_size=4, report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    losses = _Losses()
    trainer = Trainer(model=model, args=args, train_dataset=_Dataset(),
                      callbacks=[losses, lors.hf.checkpoint_callback()])
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return losses.losses, trainer.model


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    whole, whole_model = _train(out / "whole", shared_llama(seed=0, layers=2))
    # another initialisation: the resumed run only matches if the checkpoint's weights were loaded
    resumed, resumed_model = _train(out / "resumed", shared_llama(seed=1, layers=2),
                                    resume=out / "whole" / "checkpoint-3")
    return out, whole, whole_model, resumed, resumed_model


def test_trainer_resume_continues_the_run(trainer_runs):
    _, whole, whole_model, resumed, resumed_model = trainer_runs
    assert sorted(whole) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [whole[s] for s in (4, 5, 6)]
    for key, value in whole_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=0)


def test_trainer_checkpoint_holds_the_shared_tensors_once(trainer_runs):
    out, _, whole_model, _, _ = trainer_runs
    with safe_open(str(out / "whole" / "checkpoint-3" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(whole_model.state_dict())
    assert "model.layers.lors.self_attn.q_proj.0.shared_weight" in keys


def test_trainer_checkpoint_is_not_a_lors_folder(trainer_runs):
    out = trainer_runs[0]
    with pytest.raises(ValueError, match="Trainer checkpoint of a LORS model, resume it"):
        lors.from_pretrained(out / "whole" / "checkpoint-3")


def test_a_marked_trainer_checkpoint_is_refused_by_a_plain_from_pretrained(trainer_runs):
    from transformers import LlamaForCausalLM
    out = trainer_runs[0]
    with pytest.raises(ValueError, match="load it with lors.from_pretrained"):
        LlamaForCausalLM.from_pretrained(out / "whole" / "checkpoint-3")
