"""What keeps the GPU step lean and can be checked on CPU: batched Newton-Schulz equals the per-matrix
iteration, Muon matches a plain reference update, and the model traces as one graph."""

import pytest
import torch

import train_gpt
from train_gpt import GPT, Hyperparameters, Muon, newton_schulz


def plain_newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration on one matrix, written out without batching."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(64, 64), (64, 192), (192, 64), (32, 16)])
def test_batched_newton_schulz_matches_plain(shape):
    torch.manual_seed(0)
    stack = torch.randn(5, *shape)
    batched = newton_schulz(stack, steps=5)
    for i in range(5):
        assert torch.allclose(batched[i], plain_newton_schulz(stack[i], 5), atol=1e-3)


def test_newton_schulz_flattens_singular_values():
    torch.manual_seed(1)
    singular = torch.linalg.svdvals(newton_schulz(torch.randn(1, 64, 128), steps=5)[0])
    assert singular.min() > 0.5
    assert singular.max() < 1.5


def test_muon_step_matches_reference_update():
    torch.manual_seed(2)
    weights = [torch.nn.Parameter(torch.randn(16, 48)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(48, 16))]
    grads = [torch.randn_like(w) for w in weights]
    expected = []
    for w, g in zip(weights, grads):
        momentum = g.clone()  # first step: the buffer is the gradient
        update = plain_newton_schulz(g + 0.9 * momentum, 5) * max(1.0, w.size(0) / w.size(1)) ** 0.5
        expected.append(w.detach() * (1 - 0.1 * 0.01) - 0.1 * update)
    for w, g in zip(weights, grads):
        w.grad = g.clone()
    Muon(weights, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.01).step()
    for w, e in zip(weights, expected):
        assert torch.allclose(w.detach(), e, atol=1e-5)


def small_model() -> tuple[GPT, torch.Tensor]:
    args = Hyperparameters({"MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "BIGRAM_DIM": "8", "VE_DIM": "8",
                            "TRAIN_SEQ_LEN": "32", "EVAL_SEQ_LEN": "32", "EVAL_STRIDE": "16"})
    args.validate(1)
    ids = torch.randint(0, 1024, (2, 32))
    ids[:, 0] = train_gpt.BOS_ID
    return GPT(args), ids


def test_training_forward_is_one_graph():
    model, ids = small_model()
    explained = torch._dynamo.explain(model)(ids, ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_evaluation_trunk_is_one_graph():
    model, ids = small_model()
    explained = torch._dynamo.explain(model.hidden)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
