"""The memory model against hand-computed bytes."""

import pytest

from unlearn.memory import ModelShape, estimate

SHAPE = ModelShape(n_params=1000, n_layers=2, d_model=8, n_heads=2, vocab=10)


def test_one_process_counts_every_part_in_full():
    est = estimate(SHAPE, rows=4, seq_len=3)
    # activations: 4 rows x 2 blocks x 68*3*8 bytes, plus logits 2 * 4 bytes * 3 * 10 * 4 rows
    assert (est.weights, est.gradients, est.optimizer, est.companions) == (4000, 4000, 8000, 4000)
    assert est.activations == 4 * 2 * 68 * 3 * 8 + 2 * 4 * 3 * 10 * 4
    assert est.total == pytest.approx(20000 + est.activations)


def test_fsdp_shards_weights_gradients_and_state_and_each_process_takes_its_rows():
    est = estimate(SHAPE, rows=4, seq_len=3, world_size=2, parallel="fsdp")
    block = (1000 - 2 * 10 * 8) / 2  # one gathered block besides the shard
    assert est.weights == 4 * (500 + block) and est.gradients == 2000 and est.optimizer == 4000
    assert est.companions == 4000  # replicated unless told otherwise
    assert estimate(SHAPE, rows=4, seq_len=3, world_size=2, parallel="fsdp",
                    shard_companions=True).companions == 2000  # fmt: skip
    assert est.activations == 2 * 2 * 68 * 3 * 8 + 2 * 4 * 3 * 10 * 2
    ddp = estimate(SHAPE, rows=4, seq_len=3, world_size=2, parallel="ddp")
    assert (ddp.weights, ddp.optimizer, ddp.activations) == (4000, 8000, est.activations)


def test_lora_trains_adapters_only_with_no_companion_copy_and_options_scale_as_said():
    est = estimate(SHAPE, rows=4, seq_len=3, lora_params=10, companions=0)
    assert (est.weights, est.gradients, est.optimizer, est.companions) == (4040, 40, 80, 0)
    eager = estimate(SHAPE, rows=4, seq_len=3, eager_attention=True)
    assert eager.activations - estimate(SHAPE, rows=4, seq_len=3).activations == 4 * 2 * 10 * 2 * 9
    assert estimate(SHAPE, rows=4, seq_len=3, optimizer="muon").optimizer == 4000
    bf16 = estimate(SHAPE, rows=4, seq_len=3, precision="bfloat16")
    assert bf16.activations == estimate(SHAPE, rows=4, seq_len=3).activations / 2
