import math

import torch
from torch import nn

from slimkit.llm.evaluate import perplexity


class FixedLM(nn.Module):
    """Logits that depend only on the current token: p(next | t) = softmax(table[t])."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_perplexity_matches_hand_computation_on_three_windows():
    torch.manual_seed(0)
    table = torch.randn(5, 5)
    windows = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1], [2, 2, 3, 0]])
    logp = torch.log_softmax(table, dim=-1)
    nll = [-float(logp[w[i], w[i + 1]]) for w in windows.tolist() for i in range(3)]
    expected = math.exp(sum(nll) / len(nll))
    r = perplexity(FixedLM(table), windows, batch_size=2)
    assert r["n_predicted_tokens"] == 9
    assert math.isclose(r["ppl"], expected, rel_tol=1e-6)
