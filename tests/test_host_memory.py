"""On CPU the engine trims the C heap at the start of each step and once backward has left the sampler, decoder and
rewards, before the encoder's gradients exist (docs/performance.md: the freed activations otherwise stay in RSS)."""
import textcraftor_fast.engine as engine
from textcraftor_fast.engine import Trainer
from textcraftor_fast.host_memory import _malloc_trim
from tests.test_engine import cfg_for


def test_glibc_has_malloc_trim():
    assert _malloc_trim() is not None  # the CI machines run glibc: the trims below are real calls


def test_each_step_trims_at_its_start_and_before_the_encoder_backward(tmp_path, monkeypatch):
    trainer = Trainer(cfg_for(tmp_path))
    calls = []
    monkeypatch.setattr(engine, "trim_host_heap",
                        lambda: calls.append(sum(p.grad is not None for p in trainer.params)))
    for _ in range(2):
        trainer.train_step()
    assert calls[::2] == [0, 0]  # step start: the previous step's gradients were cleared first
    assert calls[1::2] == [0, 0]  # in backward, before any encoder gradient
    assert len(calls) == 4
