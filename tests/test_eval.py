"""Evaluation: every target scored once, sliding windows against a per-target reference, byte
accounting by hand, and the n-gram and kNN caches (proper distributions, causal, exact at weight 0)."""

import contextlib
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt
from train_gpt import (BOS_ID, GPT, Evaluation, Hyperparameters, KnnCache, NgramCache, build_byte_tables, count_bytes,
                       evaluate_sliding, evaluate_standard, mix_log_prob, model_functions, window_plan)

from conftest import SHAKESPEARE, TOKENIZER, read_shard

SMALL = {"MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "BIGRAM_DIM": "8", "VE_DIM": "8",
         "TRAIN_SEQ_LEN": "32", "EVAL_SEQ_LEN": "32", "EVAL_STRIDE": "8", "VAL_BATCH_SIZE": "1024", "NGRAM_BUCKETS": "4096"}


@pytest.fixture(scope="module")
def tables():
    return build_byte_tables(str(TOKENIZER), 1024)


@pytest.fixture(scope="module")
def val_tokens():
    return torch.from_numpy(read_shard(SHAKESPEARE / "fineweb_val_000000.bin").astype(np.int64))


def small_model(**env: str) -> tuple[GPT, Hyperparameters]:
    args = Hyperparameters(dict(SMALL, **env))
    args.validate(1)
    torch.manual_seed(3)
    model = GPT(args)
    with torch.no_grad():  # zero-initialized projections would make every layer a no-op
        for block in model.blocks:
            block.attn.proj.weight.normal_(0, 0.05)
            block.mlp.proj.weight.normal_(0, 0.05)
        model.bigram.embed.weight.normal_(0, 0.05)
    return model.eval(), args


def evaluation(args, tokens, tables, log=print) -> Evaluation:
    return Evaluation(args, tokens, tables, 0, 1, torch.device("cpu"), contextlib.nullcontext, log)


@pytest.mark.parametrize("total", [1, 2, 5, 31, 32, 33, 63, 64, 65, 100, 257, 1000])
@pytest.mark.parametrize("seq, stride", [(32, 32), (32, 8), (32, 1), (32, 7), (16, 16), (64, 5)])
def test_every_target_scored_once(total, seq, stride):
    starts, first_scored = window_plan(total, seq, stride)
    length = min(seq, total)
    counts = np.zeros(total + 1, dtype=int)
    for start, first in zip(starts, first_scored):
        assert start >= 0
        assert start + length <= total  # inputs end before the last token
        assert 0 <= first < length
        counts[start + 1 + first : start + 1 + length] += 1
    assert counts[0] == 0
    assert (counts[1:] == 1).all()
    # After the first window, a scored target has at least seq - stride tokens of context.
    for start, first in zip(starts[1:], first_scored[1:]):
        assert first >= length - stride


def test_first_window_scores_everything():
    starts, first_scored = window_plan(100, 32, 8)
    assert (starts[0], first_scored[0]) == (0, 0)
    assert (starts[1], first_scored[1]) == (8, 24)
    assert (starts[-1], first_scored[-1]) == (68, 28)  # the tail window ends at the last target


def reference_losses(model: GPT, tokens: torch.Tensor, seq: int, stride: int) -> torch.Tensor:
    """Each target's loss from its own window, computed one window at a time."""
    total = tokens.numel() - 1
    losses = torch.full((total,), float("nan"))
    starts, first_scored = window_plan(total, seq, stride)
    length = min(seq, total)
    for start, first in zip(starts, first_scored):
        x = tokens[start : start + length][None]
        y = tokens[start + 1 : start + length + 1][None]
        with torch.no_grad():
            window = model(x, y, reduction="none")[0]
        losses[start + first : start + length] = window[first:]
    return losses


@pytest.mark.parametrize("length, stride", [(700, 8), (700, 32), (20, 8), (33, 32)])
def test_sliding_matches_per_window_reference(val_tokens, tables, length, stride):
    model, args = small_model()
    tokens = val_tokens[:length]
    out = torch.full((length - 1,), float("nan"), dtype=torch.float64)
    ev = evaluation(args, tokens, tables)
    loss, bpb = evaluate_sliding(model_functions(model, False), model, ev, stride, token_loss_out=out)
    expected = reference_losses(model, tokens, args.eval_seq_len, stride).double()
    assert not out.isnan().any()
    assert torch.allclose(out, expected, atol=1e-5)
    assert loss == pytest.approx(expected.mean().item(), abs=1e-6)
    nbytes = count_bytes(tokens[:-1], tokens[1:], tables).sum().item()
    assert bpb == pytest.approx(expected.sum().item() / math.log(2) / nbytes, abs=1e-6)


@pytest.mark.parametrize("length", [640, 655, 700, 20])
def test_stride_equal_to_window_matches_standard(val_tokens, tables, length):
    model, args = small_model()
    ev = evaluation(args, val_tokens[:length], tables)
    functions = model_functions(model, False)
    standard = evaluate_standard(functions, ev)
    sliding = evaluate_sliding(functions, model, ev, args.eval_seq_len)
    assert sliding[0] == pytest.approx(standard[0], abs=1e-6)
    assert sliding[1] == pytest.approx(standard[1], abs=1e-6)


def test_progress_lines(val_tokens, tables, monkeypatch):
    monkeypatch.setattr(train_gpt, "EVAL_PROGRESS_SECONDS", 0.0)
    model, args = small_model(VAL_BATCH_SIZE="2048")
    lines = []
    evaluate_sliding(model_functions(model, False), model, evaluation(args, val_tokens[:600], tables, lines.append), 32)
    assert lines
    assert all(line.startswith("eval_progress:sliding windows:") and " elapsed:" in line for line in lines)
    assert lines[-1].startswith(f"eval_progress:sliding windows:{len(window_plan(599, 32, 32)[0])}/")


# Byte accounting. In the challenge tokenizer, id 4 is '▁t' (one letter after the space) and 5 is '▁a';
# ids 0-2 are control pieces (pad, BOS, EOS) and 3 is the unknown piece.
def test_leading_space_counts_after_normal_token(tables):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    assert (sp.id_to_piece(4), sp.id_to_piece(5)) == ("\u2581t", "\u2581a")
    prev = torch.tensor([BOS_ID, 4, 5, 4, 2, 3])
    target = torch.tensor([4, 5, 4, 2, 3, 5])
    # '▁t' after BOS: 1 byte; '▁a' after '▁t': 2; '▁t' after '▁a': 2; EOS: 0; unknown: 0; '▁a' after unknown: 1.
    assert count_bytes(prev, target, tables).tolist() == [1, 2, 2, 0, 0, 1]


def test_multibyte_piece_counts_utf8_bytes(tables):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    for i in range(4, 1024):
        piece = sp.id_to_piece(i)
        if any(ord(c) > 127 for c in piece.lstrip("\u2581")):
            base = len(piece.lstrip("\u2581").encode("utf-8"))
            space = int(piece.startswith("\u2581"))
            assert count_bytes(torch.tensor([4]), torch.tensor([i]), tables).item() == base + space
            assert count_bytes(torch.tensor([BOS_ID]), torch.tensor([i]), tables).item() == base


def test_real_document_bytes_match_decoded_text(val_tokens, tables):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    bos = torch.nonzero(val_tokens == BOS_ID).flatten().tolist()
    for start, end in [(bos[0], bos[1]), (bos[5], bos[6])]:
        doc = val_tokens[start:end]  # BOS followed by the document's tokens
        counted = count_bytes(doc[:-1], doc[1:], tables).sum().item()
        assert counted == len(sp.decode(doc[1:].tolist()).encode("utf-8"))
        assert counted > 1000


def dense_mixture(logp, caches):
    p = logp.exp().double()
    for weight, rows, found in caches:
        p = torch.where(found[:, None], (1 - weight) * p + weight * rows.double(), p)
    return p


def cache_for(kind: str, args, tokens, targets, hidden):
    if kind == "ngram":
        return NgramCache(args, 1024, torch.device("cpu")).score(tokens, targets)
    return KnnCache(args, 1024, args.model_dim, torch.device("cpu")).score(hidden, targets, tokens[targets])


@pytest.mark.parametrize("kind", ["ngram", "knn"])
def test_cache_mixture_is_a_distribution(val_tokens, kind):
    _, args = small_model(NGRAM_ORDER="3", KNN_K="8", KNN_STORE="300")
    tokens = val_tokens[:1500]
    targets = torch.arange(1, 1500)
    hidden = torch.randn(targets.numel(), args.model_dim)
    logp = torch.log_softmax(torch.randn(targets.numel(), 1024), dim=-1)
    rows, found = cache_for(kind, args, tokens, targets, hidden)
    if kind == "ngram":  # data exists once the previous token has been a context before
        seen = [tokens[t - 1].item() in set(tokens[: t - 1].tolist()) for t in targets.tolist()]
        assert found.tolist() == seen
    else:  # every earlier target is a neighbour candidate
        assert found[1:].all()
    assert not found[0]
    assert torch.allclose(rows[found].sum(dim=1), torch.ones(int(found.sum())), atol=1e-5)
    assert (rows >= 0).all()
    caches = [(0.3, rows, found)]
    mixed = dense_mixture(logp, caches)
    assert torch.allclose(mixed.sum(dim=1), torch.ones(targets.numel(), dtype=torch.float64), atol=1e-9)
    y = tokens[targets]
    assert torch.allclose(mix_log_prob(logp, y, caches), mixed.gather(1, y[:, None]).squeeze(1).log(), atol=1e-9)


def test_ngram_counts_by_hand():
    args = Hyperparameters({"NGRAM_ORDER": "3", "NGRAM_BUCKETS": "64"})
    # Stream: BOS 7 8 7 8 7 9. Target 5 (token 7) follows context (7, 8) seen once before, followed by 7.
    tokens = torch.tensor([BOS_ID, 7, 8, 7, 8, 7, 9])
    rows, found = NgramCache(args, 1024, torch.device("cpu")).score(tokens, torch.arange(1, 7))
    assert found.tolist() == [False, False, False, True, True, True]
    assert rows[3, 8].item() == 1.0  # target 4 (8): context (8, 7) never seen, bigram 7 -> 8 seen once
    assert rows[4, 7].item() == 1.0  # target 5: trigram (7, 8) -> 7 seen once
    assert rows[5, 8].item() == 1.0  # target 6 (9): trigram (8, 7) -> 8 seen once, so the cache predicts 8


@pytest.mark.parametrize("flags", [{"NGRAM_EVAL": "1"}, {"KNN_LAMBDA": "0.3", "KNN_STORE": "200", "KNN_K": "4"},
                                   {"NGRAM_EVAL": "1", "KNN_LAMBDA": "0.2"}])
def test_changed_token_never_changes_earlier_scores(val_tokens, tables, flags):
    model, args = small_model(**flags)
    tokens = val_tokens[:500].clone()
    functions = model_functions(model, False)
    before = torch.zeros(499, dtype=torch.float64)
    evaluate_sliding(functions, model, evaluation(args, tokens, tables), 8, token_loss_out=before)
    changed = tokens.clone()
    changed[300] = (changed[300] + 17) % 1024
    after = torch.zeros(499, dtype=torch.float64)
    evaluate_sliding(functions, model, evaluation(args, changed, tables), 8, token_loss_out=after)
    assert torch.equal(before[:299], after[:299])  # targets 1..299 come before token 300
    assert not torch.equal(before[299:], after[299:])


@pytest.mark.parametrize("flags", [{"NGRAM_EVAL": "1", "NGRAM_WEIGHT": "0"},
                                   {"KNN_LAMBDA": "0.5", "KNN_STORE": "100"}])
def test_weight_zero_gives_plain_score(val_tokens, tables, flags):
    model, args = small_model()
    functions = model_functions(model, False)
    ev = evaluation(args, val_tokens[:400], tables)
    plain = torch.zeros(399, dtype=torch.float64)
    evaluate_sliding(functions, model, ev, 8, token_loss_out=plain)
    _, mixed_args = small_model(**flags)
    if "KNN_LAMBDA" in flags:
        mixed_args.knn_lambda = 0.0  # KNN_LAMBDA=0 turns the cache off; weight it zero with the cache running
        knn = KnnCache(mixed_args, 1024, 32, torch.device("cpu"))
        logp = torch.log_softmax(torch.randn(50, 1024), dim=-1)
        y = torch.randint(0, 1024, (50,))
        rows, found = knn.score(torch.randn(50, 32), torch.arange(1, 51), y)
        assert torch.equal(mix_log_prob(logp, y, [(0.0, rows, found)]), mix_log_prob(logp, y, []))
        return
    cached = torch.zeros(399, dtype=torch.float64)
    evaluate_sliding(functions, model, evaluation(mixed_args, val_tokens[:400], tables), 8, token_loss_out=cached)
    assert torch.equal(plain, cached)
