"""SlimFit in the Hugging Face Trainer: each optimizer step freezes exactly
floor(r * units), frozen tensors stay bit-identical, gradient accumulation 2
trains the same weights as a batch twice as large, a resumed run continues the
same freezing decisions, statistics reach the Trainer's logs, and setups
per-step freezing cannot run under are refused."""

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from slimfit import UnsupportedSetupError
from slimfit.callbacks.transformers import STATE_FILE, SlimFitTrainerCallback
from slimfit.experiments.zoo import decoder


class Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences with labels (a causal-LM loss from labels)."""

    def __init__(self, n=32, seq=16, vocab=300):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class Reporter(TrainerCallback):
    """Stands for a ``report_to`` logger: records what each log event carries."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs, step=state.global_step))


class FrozenStay(TrainerCallback):
    """Checks that every tensor frozen in a step is bit-identical after it."""

    def __init__(self, sf):
        self.sf, self.before, self.ok = sf, None, []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        f = self.sf.freezer
        self.before = [(p, p.detach().clone()) for i in f.frozen for p in f.units[i].params]

    def on_optimizer_step(self, args, state, control, **kw):
        self.ok.append(all(torch.equal(p, b) for p, b in self.before))


def _train(tmp_path, sf, *, steps=6, batch=4, accumulate=1, extra=(), before=(), resume=None,
           **kw):
    torch.manual_seed(0)
    model = decoder("llama", layers=2)
    args = TrainingArguments(**{
        "output_dir": str(tmp_path), "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accumulate, "max_steps": steps, "learning_rate": 1e-2,
        "lr_scheduler_type": "constant", "report_to": [], "use_cpu": True, "seed": 0,
        "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, **kw})
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(),
                      callbacks=[*before, sf, *extra])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def test_each_optimizer_step_freezes_exactly_and_frozen_tensors_stay(tmp_path):
    sf = SlimFitTrainerCallback(0.8, seed=0)
    check = FrozenStay(sf)
    _train(tmp_path, sf, extra=[check], accumulate=2, batch=2)
    sets = sf.freezer.history.frozen_sets()
    assert len(sets) == 6 and all(len(s) == math.floor(0.8 * len(sf.freezer.units)) for s in sets)
    assert check.ok == [True] * 6
    # a logger listed before SlimFit still receives its entries: SlimFit moves itself first
    reporter = Reporter()
    _train(tmp_path / "r", SlimFitTrainerCallback(0.8, seed=0), before=[reporter])
    assert sum("slimfit/frozen_fraction" in h for h in reporter.logs) == 6


def test_gradient_accumulation_trains_as_a_batch_twice_as_large(tmp_path):
    """One frozen set per optimizer step, not per micro-batch. SGD: AdamW's
    per-element normalisation turns the last-bit differences of summing two
    micro-batches (instead of one batch) into differences of the learning
    rate on near-zero gradients, with or without SlimFit."""
    a, b = SlimFitTrainerCallback(0.8, seed=0), SlimFitTrainerCallback(0.8, seed=0)
    _, big = _train(tmp_path / "a", a, batch=4, optim="sgd")
    _, acc = _train(tmp_path / "b", b, batch=2, accumulate=2, optim="sgd")
    assert a.freezer.history.frozen_sets() == b.freezer.history.frozen_sets()
    for (n, a), b in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


def test_resume_restores_the_freezing_state(tmp_path):
    full = SlimFitTrainerCallback(0.8, seed=3)
    _train(tmp_path / "full", full, save_strategy="steps", save_steps=3)
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / STATE_FILE).exists()
    resumed = SlimFitTrainerCallback(0.8, seed=3)
    _train(tmp_path / "full", resumed, resume=str(ckpt))
    assert resumed.freezer.history.frozen_sets() == full.freezer.history.frozen_sets()
    assert resumed.freezer.history.steps == list(range(6))


def test_memory_report_and_options_reach_the_logs(tmp_path):
    sf = SlimFitTrainerCallback(0.8, compression=True, chunked_loss=True, memory_every_n_steps=2)
    reporter = Reporter()
    _train(tmp_path, sf, steps=4, extra=[reporter])
    mem = [h for h in reporter.logs if "memory/total" in h]
    assert [h["step"] for h in mem] == [1, 3]  # steps 0 and 2, logged after them
    assert all(h["memory/activations"] > 0 for h in mem) and len(sf.history) == 2
    assert sf.session.config.compression is not None and sf.session.config.chunked_loss


def test_unsupported_setups_are_refused(tmp_path):
    with pytest.raises(UnsupportedSetupError, match="DeepSpeed"):
        class Args:
            deepspeed = "ds.json"
        from slimfit.callbacks.transformers import _check_setup
        _check_setup(Args())


def test_ddp_without_unused_parameter_detection_is_refused_naming_the_cause(monkeypatch):
    """Under DDP the Trainer passes find_unused_parameters=False when asked, or
    when checkpointing is on and the option unset (TRL's SFTConfig default):
    both refused before training, naming which."""
    import types
    from slimfit.callbacks import transformers as glue
    monkeypatch.setattr(glue, "world_size", lambda: 2)
    base = dict(deepspeed=None, fsdp=None, gradient_checkpointing=False, activation_checkpointing=False)
    with pytest.raises(UnsupportedSetupError, match="this run has ddp_find_unused_parameters=False"):
        glue._check_setup(types.SimpleNamespace(**base, ddp_find_unused_parameters=False))
    with pytest.raises(UnsupportedSetupError, match="gradient_checkpointing=True with "
                                                    "ddp_find_unused_parameters unset"):
        glue._check_setup(types.SimpleNamespace(**{**base, "gradient_checkpointing": True},
                                                ddp_find_unused_parameters=None))
    glue._check_setup(types.SimpleNamespace(**{**base, "gradient_checkpointing": True},
                                            ddp_find_unused_parameters=True))
    glue._check_setup(types.SimpleNamespace(**base, ddp_find_unused_parameters=None))


def test_trl_sft_trainer_freezes_exactly_and_frozen_tensors_stay(tmp_path):
    """TRL's SFTTrainer (a transformers.Trainer) with the same callback, on a
    pre-tokenized dataset: each step freezes floor(r * units) and frozen
    tensors are bit-identical across it."""
    import datasets
    import trl  # pinned in the test extras: never skipped
    from transformers import AutoTokenizer
    from slimfit.experiments.zoo import minilm_path
    torch.manual_seed(0)
    model = decoder("llama", layers=2)
    ids = torch.randint(3, 300, (32, 16), generator=torch.Generator().manual_seed(0)).tolist()
    sf = SlimFitTrainerCallback(freeze_rate=0.75)
    stay = FrozenStay(sf)
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                         learning_rate=1e-2, lr_scheduler_type="constant", report_to=[],
                         use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True)
    trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": ids}),
                   processing_class=AutoTokenizer.from_pretrained(minilm_path()),
                   callbacks=[sf, stay]).train()
    k = math.floor(0.75 * len(sf.freezer.units))
    assert [len(s) for s in sf.freezer.history.frozen_sets()] == [k] * 4
    assert stay.ok == [True] * 4
