"""The encoder-decoder's text decoder and batched beam search (groundwork of the encoder-decoder tasks)."""

import pytest
import torch

from mmtx.tasks.decoding import beam_search
from mmtx.tasks.seq2seq import TextDecoder

BOS, EOS, V = 1, 2, 23


def head_and_memory(seed=0):
    torch.manual_seed(seed)
    head = TextDecoder(16, V, {"depth": 2, "num_heads": 2}, max_len=32).eval()
    memory = torch.randn(3, 5, 16)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 2 + [False] * 3])
    return head, memory, mask


def greedy_uncached(head, memory, mask, steps):
    ids = torch.full((memory.shape[0], 1), BOS)
    for _ in range(steps):
        ids = torch.cat([ids, head(ids, memory, mask)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_teacher_forced_shapes_backward_and_tied_output():
    head, memory, mask = head_and_memory()
    head.train()
    memory.requires_grad_(True)
    logits = head(torch.randint(0, V, (3, 7)), memory, mask)
    assert logits.shape == (3, 7, V)
    logits.sum().backward()
    assert memory.grad is not None and head.head.proj.weight is head.embed.embed.weight


def test_source_padding_mask_is_honoured():
    head, memory, mask = head_and_memory()
    tgt = torch.randint(0, V, (3, 6))
    changed = memory.clone()
    changed[1, 3:] = 50 * torch.randn(2, 16)  # padded positions of source 1
    changed[2, 2:] = 50 * torch.randn(3, 16)
    torch.testing.assert_close(head(tgt, memory, mask), head(tgt, changed, mask))
    changed[1, 0] += 1.0  # a real position
    assert not torch.allclose(head(tgt, memory, mask)[1], head(tgt, changed, mask)[1])


def test_cached_and_uncached_greedy_decoding_agree():
    head, memory, mask = head_and_memory()
    caches = head.new_caches(3, 32)
    ids = torch.full((3, 1), BOS)
    for t in range(10):
        logits = head(ids[:, -1:], memory, mask, caches, t)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ids, greedy_uncached(head, memory, mask, 10))


def search(head, memory, mask, beam, max_len=10, length_penalty=1.0):
    K = beam
    mem, msk = memory.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)

    def step(ids, caches, t):
        return head(ids[:, t:], mem, msk, caches, t)

    return beam_search(step, lambda n: head.new_caches(n, 32), 3, BOS, EOS, beam, max_len, length_penalty)


def test_beam_of_one_is_greedy():
    head, memory, mask = head_and_memory()
    greedy = greedy_uncached(head, memory, mask, 10)[:, 1:].tolist()
    expected = [row[: row.index(EOS)] if EOS in row else row for row in greedy]
    assert search(head, memory, mask, beam=1) == expected


def test_wider_beams_find_likelier_sequences():
    head, memory, mask = head_and_memory(seed=3)
    with torch.no_grad():  # a freshly initialised model is nearly uniform; sharpen it so choices matter
        for p in head.parameters():
            p.mul_(8.0)

    def logprob(b, seq):
        """Log-probability of `seq`, with its EOS when it finished within the 12 steps."""
        ids = torch.tensor([[BOS, *seq, EOS]]) if len(seq) < 12 else torch.tensor([[BOS, *seq]])
        logp = head(ids[:, :-1], memory[b:b + 1], mask[b:b + 1]).log_softmax(-1)
        return float(logp[0].gather(-1, ids[0, 1:, None]).sum())

    greedy = search(head, memory, mask, beam=1, max_len=12, length_penalty=0.0)
    wide = search(head, memory, mask, beam=8, max_len=12, length_penalty=0.0)
    gains = [logprob(b, wide[b]) - logprob(b, greedy[b]) for b in range(3)]
    assert min(gains) >= -1e-4 and max(gains) > 0  # never worse, better somewhere


@pytest.mark.slow  # learns to a threshold
def test_seq2seq_module_learns_to_reverse_and_decodes_with_beams():
    """A tiny encoder-decoder learns to reverse digit strings; greedy and beam decoding recover them."""
    from mmtx.backbone import Backbone
    from mmtx.batch import IGNORE_INDEX, PairBatch, TokenBatch
    import torch.nn.functional as F

    from mmtx.tasks import Seq2Seq
    from mmtx.tokenizers.text import TokenEmbedding

    torch.manual_seed(0)
    vocab, dim = 13, 32  # 0 pad, 1 BOS, 2 EOS, 3..12 digits
    backbone = Backbone(dim, 2, 4)
    model = Seq2Seq(TokenEmbedding(dim, vocab, max_len=16), dim, vocab, bos_id=BOS, eos_id=EOS,
                    decoder={"depth": 2, "num_heads": 4}, max_len=16, label_smoothing=0.0, beam_size=3,
                    max_decode_len=12)
    modules = torch.nn.ModuleList([backbone, model])

    def batch(n):
        lengths = torch.randint(3, 7, (n,))
        src = torch.zeros(n, 6, dtype=torch.long)
        tgt_in = torch.zeros(n, 7, dtype=torch.long)
        tgt_out = torch.full((n, 7), IGNORE_INDEX)
        for i, L in enumerate(lengths.tolist()):
            seq = torch.randint(3, 13, (L,))
            src[i, :L] = seq
            tgt_in[i, 0], tgt_in[i, 1:L + 1] = BOS, seq.flip(0)
            tgt_out[i, :L], tgt_out[i, L] = seq.flip(0), EOS
        return PairBatch(TokenBatch(src, src != 0), TokenBatch(tgt_in, targets=tgt_out))

    optimizer = torch.optim.AdamW(modules.parameters(), lr=3e-3)
    modules.train()
    for _ in range(300):
        b = batch(32)
        loss = F.cross_entropy(model(backbone, b).flatten(0, 1), b.target.targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    modules.eval()
    test = batch(16)
    expected = [[t for t in row.tolist() if t != IGNORE_INDEX][:-1] for row in test.target.targets]
    greedy = model.decode(backbone, test.source, beam_size=1)
    beams = model.decode(backbone, test.source, beam_size=3)
    assert sum(g == e for g, e in zip(greedy, expected)) >= 12
    assert model.decode(backbone, test.source, beam_size=3, use_cache=False) == beams  # the cache changes nothing
    assert sum(b == e for b, e in zip(beams, expected)) >= sum(g == e for g, e in zip(greedy, expected)) - 1
