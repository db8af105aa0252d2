"""The architecture: exact parameter counts, optional groups, shared blocks, and what the bigram hash
and the smear gate may look at."""

import pytest
import torch

from train_gpt import BOS_ID, GPT, Hyperparameters, parameter_groups

from conftest import log_lines, run_script


def build(**env: str) -> GPT:
    args = Hyperparameters(env)
    args.validate(1)
    torch.manual_seed(0)
    return GPT(args)


def total(model: GPT) -> int:
    return sum(p.numel() for p in model.parameters())


def test_seed_configuration_counts():
    model = build(USE_UNIVERSAL="1", UNIVERSAL_UNIQUE_BLOCKS="3", UNIVERSAL_ITERATIONS="4")
    assert total(model) == 8_115_775
    assert parameter_groups(model)["blocks"] == 7_084_056


def test_plain_eleven_layer_count():
    assert total(build(USE_UNIVERSAL="0", NUM_LAYERS="11")) == 26_993_788


def test_groups_add_up_to_the_total():
    model = build()
    assert sum(parameter_groups(model).values()) == total(model)


# Each optional group, the flag that removes it, and its size in the seed configuration (SPEC table).
OPTIONAL_GROUPS = [
    ("bigram_hash", {"BIGRAM_BUCKETS": "0"}, 2048 * 128 + 128 * 512 + 1),
    ("value_embedding", {"VE_DIM": "0"}, 1024 * 128 + 128 * 256 + 1 + 2),
    ("smear_gate", {"SMEAR_GATE": "0"}, 512),
    ("unet_skips", {"UNET_SKIPS": "0"}, 6 * 512),
    ("iter_embed", {"ITER_EMBED": "0"}, 12 * 512),
    ("iter_scale", {"ITER_SCALE": "0"}, 12 * 512),
    ("value_residual", {"VALUE_RESIDUAL": "0"}, 11),
    ("scaled_highway", {"SCALED_HIGHWAY": "0"}, 2 * 12),
]


@pytest.mark.parametrize("group, flags, size", OPTIONAL_GROUPS)
def test_removing_a_group_lowers_the_count_by_its_size(group, flags, size):
    full = build()
    reduced = build(**flags)
    assert parameter_groups(full)[group] == size
    assert group not in parameter_groups(reduced)
    assert total(full) - total(reduced) == size


def test_untied_head_adds_one_matrix():
    assert total(build(TIE_EMBEDDINGS="0")) - total(build()) == 1024 * 512


def test_iteration_groups_only_in_universal_mode():
    groups = parameter_groups(build(USE_UNIVERSAL="0", NUM_LAYERS="12"))
    assert "iter_embed" not in groups
    assert "iter_scale" not in groups


def test_effective_layer_reuses_the_same_block():
    model = build(MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", BIGRAM_DIM="8", VE_DIM="8")
    assert len(model.blocks) == 3
    for i in range(9):
        assert model.block_for_layer(i) is model.block_for_layer(i + 3)
    called = []
    hooks = [block.register_forward_hook(lambda module, inputs, output: called.append(module)) for block in model.blocks]
    model.hidden(torch.randint(0, 1024, (1, 16)))
    for hook in hooks:
        hook.remove()
    assert len(called) == 12
    for i in range(9):
        assert called[i] is called[i + 3]
    assert called[0] is not called[1]


def test_every_parameter_gets_a_gradient():
    model = build(MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", BIGRAM_DIM="8", VE_DIM="8", TIE_EMBEDDINGS="0")
    with torch.no_grad():  # output projections start at zero; open them so gradients reach every group
        for block in model.blocks:
            block.attn.proj.weight.normal_(0, 0.02)
            block.mlp.proj.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
        model.bigram.embed.weight.normal_(0, 0.02)  # zero at init, so its projection and gain start without gradient
    ids = torch.randint(2, 1024, (2, 16))
    ids[:, 0] = BOS_ID
    model(ids, torch.randint(0, 1024, (2, 16))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def two_documents(prev_token: int) -> torch.Tensor:
    """BOS a b c | BOS d e, with `prev_token` as the last token of the first document."""
    return torch.tensor([[BOS_ID, 10, 11, prev_token, BOS_ID, 20, 21]])


def test_bigram_at_bos_ignores_previous_token():
    model = build()
    with torch.no_grad():
        model.bigram.embed.weight.normal_()
        first, second = model.bigram(two_documents(12)), model.bigram(two_documents(700))
    assert torch.equal(first[0, 4], second[0, 4])  # BOS of the second document
    assert not torch.equal(first[0, 3], second[0, 3])  # the changed token itself
    assert torch.equal(first[0, 5:], second[0, 5:])  # later positions see only themselves and their predecessor


def test_bigram_looks_only_at_current_and_previous():
    model = build()
    with torch.no_grad():
        model.bigram.embed.weight.normal_()
    base = torch.tensor([[BOS_ID, 5, 6, 7, 8, 9]])
    changed = base.clone()
    changed[0, 2] = 600
    a, b = model.bigram(base), model.bigram(changed)
    assert torch.equal(a[0, :2], b[0, :2])
    assert not torch.equal(a[0, 2], b[0, 2])
    assert not torch.equal(a[0, 3], b[0, 3])
    assert torch.equal(a[0, 4:], b[0, 4:])


def test_smear_at_bos_ignores_previous_token():
    model = build()
    embed = torch.randn(1, 7, 512)
    changed = embed.clone()
    changed[0, 3] += 1.0  # the embedding of the token just before the second BOS
    ids = two_documents(12)
    a, b = model.smear(embed, ids), model.smear(changed, ids)
    assert torch.equal(a[0, 4], b[0, 4])
    assert torch.allclose(a[0, 4], embed[0, 4])  # BOS gets nothing from the token before it
    assert not torch.equal(a[0, 3], b[0, 3])
    assert torch.equal(a[0, 5:], b[0, 5:])


def test_smear_mixes_previous_position():
    model = build()
    embed = torch.randn(1, 3, 512)
    ids = torch.tensor([[BOS_ID, 50, 51]])
    gate = torch.sigmoid(model.smear.gate)
    expected = embed[0, 2] + gate * (embed[0, 1] - embed[0, 2])
    assert torch.allclose(model.smear(embed, ids)[0, 2], expected, atol=1e-6)


def test_dry_run_prints_counts(tmp_path):
    result = run_script(tmp_path, {"DRY_RUN": "1", "USE_UNIVERSAL": "1", "UNIVERSAL_UNIQUE_BLOCKS": "3",
                                   "UNIVERSAL_ITERATIONS": "4"})
    assert result.returncode == 0, result.stderr
    assert log_lines(result, "model_params:") == ["model_params:8115775"]
    assert log_lines(result, "unique_block_params:") == ["unique_block_params:7084056"]
    assert log_lines(result, "config:USE_UNIVERSAL=") == ["config:USE_UNIVERSAL=1"]
    assert len(log_lines(result, "artifact_estimate")) == 1
    assert not (tmp_path / "logs").exists()  # a dry run touches nothing


def test_dry_run_plain_model(tmp_path):
    result = run_script(tmp_path, {"DRY_RUN": "1", "USE_UNIVERSAL": "0", "NUM_LAYERS": "11"})
    assert result.returncode == 0, result.stderr
    assert log_lines(result, "model_params:") == ["model_params:26993788"]
