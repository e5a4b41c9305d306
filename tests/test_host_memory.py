"""On CPU, with models of SD size, the engine trims the C heap at each boundary of a step: as it starts, before the
decoder's forward, before the towers' forward, before backward, and in backward before the decoder's recompute,
before each checkpointed UNet call's recompute and before the encoder's gradients exist (glibc otherwise keeps each
piece's freed activations resident into the next one's peak). The trims are module hooks attached at build
(`attach_host_heap_trims`); with small models a trim's page faults cost more than the memory, so none are attached.
"""
import pytest
import torch

import textcraftor_fast.training.trainer as trainer_module
from textcraftor_fast.memory import host_heap
from textcraftor_fast.memory.host_heap import _malloc_trim
from textcraftor_fast.training.trainer import Trainer
from tests.test_engine import cfg_for


def test_glibc_has_malloc_trim():
    assert _malloc_trim() is not None  # the CI machines run glibc: the trims below are real calls


def test_trims_only_on_the_cpu_and_with_models_of_sd_size():
    with torch.device("meta"):  # sizes without memory
        sd_sized = torch.nn.Linear(32768, 8192)  # 1 GiB of fp32 weights
        small = torch.nn.Linear(1024, 1024)
    assert host_heap.trims_pay_off(torch.device("cpu"), sd_sized, small)
    assert not host_heap.trims_pay_off(torch.device("cpu"), small)
    assert not host_heap.trims_pay_off(torch.device("cuda"), sd_sized)


def _record_trims_and_recomputes(trainer, monkeypatch) -> list[tuple[str, object]]:
    """Events in order: ('trim', encoder tensors holding a gradient) and ('unet' | 'decoder', in backward)."""
    events: list[tuple[str, object]] = []
    monkeypatch.setattr(host_heap, "trim_host_heap",
                        lambda: events.append(("trim", sum(p.grad is not None for p in trainer.params))))
    in_backward = lambda: torch._C._current_graph_task_id() != -1
    for name, module in (("unet", trainer.unet), ("decoder", trainer.vae.decoder)):
        module.register_forward_pre_hook(lambda m, args, name=name: events.append((name, in_backward())))
    return events


@pytest.mark.parametrize("draft_lv", [0, 2])
def test_each_recompute_in_backward_starts_after_a_trim(tmp_path, monkeypatch, draft_lv):
    monkeypatch.setattr(trainer_module, "trims_pay_off", lambda device, *models: True)  # as with SD-size models
    trainer = Trainer(cfg_for(tmp_path, "sampler.checkpoint=step", "sampler.checkpoint_vae=true",
                              f"sampler.draft_lv_samples={draft_lv}"))
    events = _record_trims_and_recomputes(trainer, monkeypatch)
    for _ in range(2):
        events.clear()
        trainer.train_step()
        assert events[0] == ("trim", 0)  # step start: the previous step's gradients were cleared first
        last_sampler_call = max(i for i, event in enumerate(events) if event == ("unet", False))
        calls = draft_lv or trainer.cfg.sampler.grad_steps  # graph-carrying UNet calls, each checkpointed
        assert events[last_sampler_call + 1:] == [
            ("trim", 0), ("decoder", False),  # the sampler is through: before the decoder's forward
            ("trim", 0),  # before the towers' forward
            ("trim", 0),  # before backward
            ("trim", 0), ("decoder", True),  # the rewards are through: before the decode's recompute
            *[("trim", 0), ("unet", True)] * calls,  # after everything downstream of a call, before its recompute
            ("trim", 0),  # the sampler is through, no encoder gradient exists yet
        ]


def test_no_trims_when_they_do_not_pay_off(tmp_path, monkeypatch):
    """A Trainer of tiny models (or on CUDA) trims nothing and hooks nothing on the graph."""
    trainer = Trainer(cfg_for(tmp_path))
    events = _record_trims_and_recomputes(trainer, monkeypatch)
    trainer.train_step()
    assert not [e for e in events if e[0] == "trim"]
