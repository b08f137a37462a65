import torch

from runtime.detokenizer import IncrementalDetokenizer
from runtime.engine.sampler import Sampler
from runtime.engine.sequence import Sequence
from runtime.sampling_params import SamplingParams


def make(params: SamplingParams, tokens=(1, 2, 3), rid="r") -> Sequence:
    return Sequence(rid, list(tokens), params)


def test_greedy_and_logprobs():
    logits = torch.randn(3, 50)
    seqs = [make(SamplingParams(temperature=0, logprobs=2)) for _ in range(3)]
    tokens, lps = Sampler(torch.device("cpu"))(logits, seqs, set())
    assert tokens == logits.argmax(-1).tolist()
    ref = logits.log_softmax(-1)
    for i, lp in enumerate(lps):
        assert lp[0][0] == tokens[i] and abs(lp[0][1] - ref[i, tokens[i]].item()) < 1e-5
        assert [t for t, _ in lp[1:]] == ref[i].topk(2).indices.tolist()


def test_seed_reproducible_regardless_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone, _ = Sampler(torch.device("cpu"), seed=1)(logits[2:3], [make(p)], set())
    others = [make(SamplingParams(temperature=1.0)) for _ in range(3)]
    batched, _ = Sampler(torch.device("cpu"), seed=7)(logits, others[:2] + [make(p)] + others[2:], set())
    assert alone[0] == batched[2]
    draws = {Sampler(torch.device("cpu"), seed=s)(logits[:1], [make(SamplingParams())], set())[0][0] for s in range(20)}
    assert len(draws) > 1  # unseeded sampling really samples


def test_top_k_top_p_min_p_masks():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0]])
    sampler = Sampler(torch.device("cpu"))
    for seed in range(30):
        t, _ = sampler(logits, [make(SamplingParams(top_k=2, seed=seed))], set())
        assert t[0] in (0, 1)
        # probs ~ [.66,.24,.09,...]: top_p=0.7 keeps tokens 0 and 1 only
        t, _ = sampler(logits, [make(SamplingParams(top_p=0.7, seed=seed))], set())
        assert t[0] in (0, 1)
        t, _ = sampler(logits, [make(SamplingParams(min_p=0.3, seed=seed))], set())
        assert t[0] in (0, 1)


def test_penalties_and_min_tokens():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    sampler = Sampler(torch.device("cpu"))
    s = make(SamplingParams(temperature=0, repetition_penalty=2.0), tokens=(0,))
    assert sampler(logits, [s], set())[0] == [1]
    s = make(SamplingParams(temperature=0, frequency_penalty=1.0), tokens=(3,))
    s.token_ids += [0]  # one output token: 0
    assert sampler(logits, [s], set())[0] == [1]
    s = make(SamplingParams(temperature=0, min_tokens=2))
    assert sampler(logits, [s], {0})[0] == [1]  # eos 0 masked before min_tokens


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_cut_and_held_back():
    tok = CharTokenizer()
    d = IncrementalDetokenizer(tok, [ord("x")], SamplingParams(stop=["END"]))
    out = ""
    for ch in "hello EN":
        delta, stopped = d.update([ord(ch)])
        out += delta
        assert not stopped
    assert out == "hello "  # "EN" is held back: it may start the stop string
    delta, stopped = d.update([ord("D")])
    assert stopped and out + delta == "hello " and d.text == "hello " and d.stop_reason == "END"
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["END"]))
    d.update([ord(c) for c in "abE"])
    assert d.finish() == "bE" and d.text == "abE"  # the last len("END") - 1 chars were held


def test_logit_bias_allowed_token_ids_bad_words():
    logits = torch.zeros(3, 20)
    logits[:, 7] = 5.0  # every row would pick 7
    seqs = [
        make(SamplingParams(temperature=0, logit_bias={3: 10.0})),
        make(SamplingParams(temperature=0, allowed_token_ids=[4, 9])),
        # bad word [2, 7]: the output so far ends in 2, so 7 is banned; [11] is banned always
        Sequence("b", [1, 2], SamplingParams(temperature=0, bad_words_token_ids=[[2, 7], [11]])),
    ]
    seqs[2].num_prompt_tokens = 1  # output so far: [2]
    logits[2, 11] = 4.0
    tokens, _ = Sampler(torch.device("cpu"))(logits, seqs, set())
    assert tokens[0] == 3 and tokens[1] in (4, 9) and tokens[2] not in (7, 11)
    assert Sampler(torch.device("cpu"))(logits[:1], [make(SamplingParams(temperature=0))], set())[0] == [7]
