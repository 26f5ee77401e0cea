"""CBQ: cross-block reconstruction PTQ (Ding et al., arXiv 2312.07950v5, ICLR 2025).

Per window of K consecutive blocks (overlap O, run by the shared pipeline):

1. New blocks are prepared once: CFP detects activation-outlier channels of every foldable
   norm -> linear group on the full-precision stream and folds ``1/s`` into the norm and ``s`` into
   the consumers' columns (exactly function-preserving, applied to the FP copy too); with
   ``--cfp-linear`` also of the value -> output and up -> down pairs (``1/s`` into the producer's
   rows, GQA-aware); it also truncates weight-outlier columns in a copy that only initialises
   each linear's range. ``--awq-init`` replaces this step by AWQ's searches (ours): the scales
   of the foldable pairs found by AWQ's output-error search (folded into the block and its FP
   copy, function-preserving), and each linear's AWQ clipping range, which sets the initial
   step size and zero point (the weights themselves are not clamped; GPTQ's starting codes are
   computed on the clamped copy). With it the clipping factors train at 1e-2 unless
   ``--lr-clip`` says otherwise: at 1e-1 a short schedule re-learns AWQ's ranges away and ends
   worse than AWQ (benchmarks/cbq_ladder.py, rows ``cbq-awq`` and ``cbq-awq-lrclip``).
2. Every linear gets learnable quantizer parameters (fp32): OmniQuant-style clipping factors
   ``sigmoid(gamma) * max``, ``sigmoid(beta) * min`` per output channel / group (they set the
   step size and zero point), a rounding parameterisation, and, with ``--abits``, a learnable
   clipping ratio of its input's range.
3. The window is trained on the homologous reconstruction loss
   ``E(T_fp(X_fp), T_q(X_q)) + E(T_fp(X_q), T_q(X_q))`` with
   ``E(a, b) = ||a - b||^2 / ||a||^2`` per token (``--kl`` adds the paper's KL(softmax(a) || softmax(b))
   over the hidden dimension),
   plus the AdaRound rounding regulariser with beta annealed from 20 to 2 after a warm-up.
4. A block is finalized when it leaves its last window: rounding is hardened to integer codes
   (``1[h >= 0.5]``), the step sizes are frozen, and the dequantized weight replaces the FP one.

Rounding (``--rounding``):
- ``lora`` (CBQ's LoRA-Rounding): rounding logits ``V = V0 + A1 A2`` with ``A1`` (out x r) and
  ``A2`` (r x in) learned; ``V0`` (not learned) is the AdaRound initialisation
  ``logit((frac(W/S) - gamma) / (zeta - gamma))`` so that training starts from the FP weight.
  ``--lora-init svd`` instead starts from the best rank-r approximation of V0 (``V = A1 A2``),
  the other reading of the paper; ``zero`` starts from h = 0.5.
- ``full``: AdaRound, one learned logit per weight (the cost baseline).
- ``nearest``: round-to-nearest with a straight-through gradient (learned step sizes only; with
  K = 1 this is the OmniQuant-LWC analogue of the ablation ladder).

Where each idea lives:
- ``cross_block_windows.py``: the method (:class:`CBQ`) and its windows, block preparation,
  hardening and checkpointed state;
- ``lora_rounding.py``: the learnable weight quantizer (:class:`LinearQuantizer`) with
  LoRA-Rounding, AdaRound and nearest rounding;
- ``act_clipping.py``: the learnable activation quantizer;
- ``cfp_preprocessing.py``: CFP applied to a window's block (rules in ``slimkit/quant/cfp.py``);
- ``window_training.py``: the reconstruction loss and the window's training loop;
- ``config.py``: :class:`CBQConfig`.
"""

from slimkit.quant.methods.cbq.act_clipping import LearnableActQuant
from slimkit.quant.methods.cbq.config import LORA_INITS, ROUNDING_INITS, ROUNDINGS, CBQConfig
from slimkit.quant.methods.cbq.cross_block_windows import CBQ
from slimkit.quant.methods.cbq.lora_rounding import (
    GAMMA,
    ZETA,
    LinearQuantizer,
    rectified_sigmoid,
    rounding_logits,
)
from slimkit.quant.methods.cbq.window_training import distance

__all__ = [
    "CBQ",
    "GAMMA",
    "LORA_INITS",
    "ROUNDINGS",
    "ROUNDING_INITS",
    "ZETA",
    "CBQConfig",
    "LearnableActQuant",
    "LinearQuantizer",
    "distance",
    "rectified_sigmoid",
    "rounding_logits",
]
