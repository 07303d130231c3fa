"""The evidence analyses: memory retained between tasks, against hand counts."""

import evidence
import train
from data.tasks import build_task_suite


def test_memory_accounting_matches_a_hand_count_on_a_tiny_model(tmp_path):
    config = train.parse_args(["--n_layer=1", "--n_head=2", "--block_size=32", "--sae_expansion=4", "--sae_k=4",
                               "--tasks=add,reverse", "--n_train=40", "--n_val=4", "--n_test=4",
                               "--ewc_fisher_examples=4", "--mas_examples=4", "--sae_guided_mask_examples=8",
                               "--sae_guided_mask_knn=3", "--sae_fd_anchors=4", "--lora_rank=2",
                               "--replay_fraction=0.1"])
    full, lora = evidence.memory_by_width(config, widths=(32,))
    # one block of width 32: embeddings (96 tokens, 32 positions), two LayerNorms, qkv, attention out, MLP in and
    # out, the final LayerNorm; the tied head counted once
    n_params = (96 * 32 + 32 * 32 + 2 * (2 * 32) + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128)
                + (128 * 32 + 32) + 2 * 32)
    assert full["n_params"] == lora["n_params"] == n_params
    # rank-2 adapters, A (2, in) and B (out, 2), on qkv (32 -> 96), attention out, MLP in (32 -> 128), MLP out
    adapter = (2 * 32 + 96 * 2) + (2 * 32 + 32 * 2) + (2 * 32 + 128 * 2) + (2 * 128 + 32 * 2)
    length = build_task_suite(["add", "reverse"], 40, 4, 4)["add"]["train"].x.size(1)  # the padded length
    for row, trained in ((full, n_params), (lora, adapter)):
        assert row["seqft"] == row["lwf"] == 0
        assert row["ewc"] == 2 * 2 * trained * 4  # (F, theta*) per task, float32
        assert row["si"] == row["mas"] == 2 * trained * 4  # one (w, theta*)
        assert row["sae_guided"] == 2 * 128 * 4  # a mask of d_sae = 4 * 32 floats per task at the one SAE point
        assert row["replay"] == 2 * 4 * 2 * length * 8  # 10% of 40 examples per task, tokens x and y, int64
        # 4 anchors per task: tokens (int64) and content mask (float32), and k = 4 code values (float32) and
        # indices (int64) at every position
        assert row["sae_fd"] == 2 * 4 * length * (8 + 4 + 4 * (4 + 8))
        assert row["o_lora"] == adapter * 4  # the first task's adapters, frozen
    evidence.plot_memory([full, lora], tmp_path / "memory.png")
    assert (tmp_path / "memory.png").stat().st_size > 0
    table = evidence.memory_table([full, lora])
    assert table.count("\n") == 3 and f"{full['ewc']:,}" in table  # header, rule, one row per regime
