"""The CBQ method on the block-wise pipeline: windows of K consecutive blocks with overlap O are
reconstructed jointly, so that a block is tuned with the blocks after it (cross-block
dependency). Preparing a block (CFP or AWQ scales, GPTQ's starting codes, fresh or resumed
quantizers), routing its linears through their fake quantizers, hardening it when it leaves its
last window, and the state carried in checkpoints."""

from __future__ import annotations

import logging
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import get_module, set_weight, weight_of
from slimkit.llm.pipeline import BlockwiseMethod, BlockwisePipeline, Window
from slimkit.quant import activations as acts
from slimkit.quant.cfp import truncated_weight
from slimkit.quant.methods.awq import AWQ, AWQConfig
from slimkit.quant.methods.base import QuantConfig, layer_specs, register_method
from slimkit.quant.methods.cbq.act_clipping import LearnableActQuant
from slimkit.quant.methods.cbq.cfp_preprocessing import CFPSteps
from slimkit.quant.methods.cbq.config import CBQConfig
from slimkit.quant.methods.cbq.lora_rounding import LinearQuantizer
from slimkit.quant.methods.cbq.window_training import WindowTraining
from slimkit.quant.methods.gptq import gptq_quantize
from slimkit.quant.obs import collect_hessians
from slimkit.quant.quantizer import QuantizedWeight

log = logging.getLogger("slimkit")


@register_method(
    "cbq", CBQConfig, help="CBQ: cross-block reconstruction, LoRA-Rounding, CFP (W and W+A)"
)
class CBQ(CFPSteps, WindowTraining, BlockwiseMethod):
    """Cross-block reconstruction over windows of K blocks with overlap O (see the package
    docstring); the CFP steps and the training loop are in their own files."""

    needs_fp = True

    def __init__(self, config: CBQConfig):
        self.config = config
        self.wspec = config.weight_spec()
        self.aspec = config.act_spec()
        self.wq: dict[int, dict[str, LinearQuantizer]] = {}
        self.aq: dict[int, dict[str, LearnableActQuant]] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self.mig: dict[int, dict[str, nn.Parameter]] = {}  # block -> norm -> log scale
        self._norm_hooks: dict[int, list] = {}

    # ------------------------------------------------------------------------------ events
    def on_start(self, pipe: BlockwisePipeline) -> None:
        if dist.world_size() > 1:
            raise SlimkitError(
                "cbq trains quantizer parameters and does not run under torchrun yet; "
                "run it as a single process (use --device to pick the accelerator)"
            )
        specs = layer_specs(pipe.model, self.config, pipe.bmap, pipe.blocks)
        self.specs = {
            name: specs.get(name, self.wspec)
            for b in range(len(pipe.blocks))
            for name in pipe.named_linears(b)
        }
        for b in range(len(pipe.blocks)):
            for name, m in pipe.named_linears(b).items():
                self.specs[name].check_width(weight_of(m, pipe.bmap.transposed).shape[1], name)
        bm = pipe.bmap
        self.cfp_on = self.config.cfp and bool(bm.smooth) and bm.smooth_ok(pipe.model.config)
        if self.config.cfp and not self.cfp_on:
            log.warning("%s blocks have no foldable norm -> linear pairs; CFP skipped", bm.family)
        self.awq = None
        if self.config.awq_init:
            shared = {f.name: getattr(self.config, f.name) for f in fields(QuantConfig)}
            self.awq = AWQ(AWQConfig(**shared, search_tokens=self.config.awq_search_tokens))
            self.awq.on_start(pipe)
            self.cfp_on = False  # AWQ's scales take CFP's place
            if self.config.learn_smooth:
                log.warning("--learn-smooth starts from CFP's scales; with --awq-init it is off")
            if self.config.cfp_linear:
                log.warning("--cfp-linear is a CFP option; with --awq-init AWQ's pairs are used")
        self.mig_on = self.cfp_on and self.config.learn_smooth and self.aspec is not None

    def on_window(self, win: Window) -> None:
        for pos, b in enumerate(win.block_ids):
            if b not in self.wq:
                self._prepare_block(win, pos, b)
            self._install(win.pipe, b)
        self._train(win)

    def on_finalize(self, win: Window, index: int, block: nn.Module) -> None:
        pipe = win.pipe
        soft, mismatch = [], []
        self._fold_migration(pipe, index, block)
        for name, m in pipe.named_linears(index).items():
            quant = self.wq[index][name]
            w = weight_of(m, pipe.bmap.transposed).float()
            soft.append(quant.soft_fraction())
            mismatch.append(getattr(quant, "start_mismatch", 0.0))
            qw = quant.harden(w)
            if not torch.isfinite(qw.scale).all():
                raise SlimkitError(f"{name}: CBQ produced non-finite scales")
            _uninstall(m)
            w_hat = qw.dequantize()
            err = float(((w_hat - w.cpu()).norm() / w.norm().clamp(min=1e-30)) ** 2)
            pipe.log.append({"window": win.index, "layer": name, "weight_rel_err": err})
            set_weight(
                m, qw.dequantize().to(m.weight.dtype).to(m.weight.device), pipe.bmap.transposed
            )
            pipe.records[name] = qw
            if index in self.aq:
                a = self.aq[index][name]
                acts.attach(
                    m,
                    a.spec,
                    None if a.absmax is None else a.absmax.detach().cpu(),
                    None if a.clip is None else a.clip.detach().cpu(),
                )
        pipe.log.append(
            {
                "window": win.index,
                "block": index,
                "undecided_rounding": sum(soft) / max(1, len(soft)),
                "gptq_codes_outside_floor_ceil": sum(mismatch) / max(1, len(mismatch)),
            }
        )
        del self.wq[index]
        self.aq.pop(index, None)
        self.mig.pop(index, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for b, qs in self.wq.items():
            for name, q in qs.items():
                out.update(
                    {f"w|{b}|{name}|{k}": v.detach().cpu() for k, v in q.state_dict().items()}
                )
        for b, scales in self.mig.items():
            out.update({f"s|{b}|{n}": p.detach().cpu() for n, p in scales.items()})
        for b, qs in self.aq.items():
            for name, a in qs.items():
                out[f"a|{b}|{name}|logit"] = a.logit.detach().cpu().reshape(1)
                if a.absmax is not None:
                    out[f"a|{b}|{name}|absmax"] = a.absmax.detach().cpu().reshape(1)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._pending = dict(state)

    # ------------------------------------------------------------------------------ steps
    def _prepare_block(self, win: Window, pos: int, b: int) -> None:
        """CFP folding, then fresh quantizers (or the ones of a resumed checkpoint)."""
        pipe = win.pipe
        block, fp_block = win.blocks[pos], win.fp_blocks[pos]
        resumed = any(k.startswith(f"w|{b}|") for k in self._pending)
        clipped: dict[str, torch.Tensor] = {}
        if self.cfp_on and not resumed:
            fp_in = (
                win.inputs_fp if pos == 0 else pipe.run_blocks(win.fp_blocks[:pos], win.inputs_fp)
            )
            self._cfp_fold(pipe, block, fp_block, fp_in, b)
        if self.awq is not None and not resumed:  # a resumed block carries its scales
            H, leader, rel = self.awq.scale_block(win, b, mirrors=(fp_block,))
            if self.awq.config.auto_clip:
                prefix = f"{pipe.bmap.blocks}.{b}."
                clipped = {
                    prefix + r: w for r, w in self.awq.clipped_weights(win, H, leader, rel).items()
                }
        dev = pipe.device
        self.wq[b] = {}
        starts = {} if resumed else self._gptq_start(win, b, clipped)
        for i, (name, m) in enumerate(pipe.named_linears(b).items()):
            w = weight_of(m, pipe.bmap.transposed).float().to(dev)
            # the LoRA factors' random start depends on train_seed, block and linear only, so
            # two runs of one command give the same model whatever the global RNG holds
            gen = torch.Generator().manual_seed(self.config.train_seed * 100003 + b * 1000 + i)
            if self.awq is not None:  # AWQ's clipped copy (q / k are not clipped, as in AWQ)
                rng = clipped[name].to(dev) if name in clipped else w
            elif self.config.cfp and name not in starts:
                rng = truncated_weight(w, self.config.cfp_params())
            else:
                rng = None
            q = LinearQuantizer(
                w,
                self.specs[name],
                self.config.rounding,
                self.config.rank,
                self.config.lora_init,
                range_w=rng,
                init=not resumed,
                soft=self.config.soft_rounding,
                start=starts.get(name),
                generator=gen,
                exact_range=self.awq is not None,
            ).to(dev)
            if resumed:
                q.load_state_dict(
                    {
                        k.split("|", 3)[3]: v
                        for k, v in self._pending.items()
                        if k.startswith(f"w|{b}|{name}|")
                    }
                )
            self.wq[b][name] = q
        if self.aspec is not None:
            self._prepare_acts(win, pos, b, resumed)
        if self.mig_on:
            self.mig[b] = {}
            for norm_name, consumers in pipe.bmap.smooth:
                norm = get_module(block, norm_name)
                if norm is None or get_module(block, consumers[0]) is None:
                    continue
                key = f"s|{b}|{norm_name}"
                init = (
                    self._pending[key] if key in self._pending else torch.zeros(norm.weight.numel())
                )
                self.mig[b][norm_name] = nn.Parameter(init.float().clone().to(dev))
        if resumed:
            self._pending = {k: v for k, v in self._pending.items() if f"|{b}|" not in k}

    def _gptq_start(
        self, win: Window, b: int, clipped: dict[str, torch.Tensor]
    ) -> dict[str, QuantizedWeight]:
        """GPTQ codes of the block's linears (Hessians of the quantized-stream inputs, all
        linears at once, act-order with static groups so groups stay contiguous), used as the
        starting point of the learned rounding; a linear in ``clipped`` is quantized from that
        clamped copy of its weight."""
        cfg = self.config
        if cfg.rounding_init != "gptq" or cfg.rounding == "nearest":
            return {}
        if self.wspec.group_size == 0:
            log.warning("rounding_init=gptq needs per-channel or grouped weights; using nearest")
            return {}
        pipe = win.pipe
        block = pipe.blocks[b]
        prefix = f"{pipe.bmap.blocks}.{b}."
        linears = pipe.named_linears(b)
        shared = [
            {prefix + rel: get_module(block, rel) for rel in group if prefix + rel in linears}
            for group in pipe.bmap.sequential
        ]
        hessians = collect_hessians(pipe, block, win.inputs_of(b), shared)
        return {
            # on a GGUF grid the quantizer fits its grid on the weight itself, and so does GPTQ
            n: gptq_quantize(
                clipped[n]
                if n in clipped and not self.specs[n].grid
                else weight_of(m, pipe.bmap.transposed).detach().float(),
                hessians[n],
                self.specs[n],
                act_order=True,
                static_groups=True,
            )
            for n, m in linears.items()
        }

    def _prepare_acts(self, win: Window, pos: int, b: int, resumed: bool) -> None:
        pipe = win.pipe
        linears = pipe.named_linears(b)
        self.aq[b] = {}
        absmax: dict[str, torch.Tensor] = {}
        if self.aspec.granularity == "per-tensor" and not resumed:

            def observe(name: str, x: torch.Tensor) -> None:
                m = x.detach().abs().amax().float()
                absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

            for m in linears.values():
                acts.detach(m)
            src = win.inputs_of(b)
            pipe.collect([pipe.blocks[b]], src, linears, observe)
        for name in linears:
            a = LearnableActQuant(
                self.aspec, absmax.get(name), self.config.learn_act_clip, pipe.device
            )
            if resumed:
                a.logit.data.copy_(self._pending[f"a|{b}|{name}|logit"].reshape(()))
                if f"a|{b}|{name}|absmax" in self._pending:
                    a.absmax = self._pending[f"a|{b}|{name}|absmax"].reshape(()).to(pipe.device)
            self.aq[b][name] = a

    def _install(self, pipe: BlockwisePipeline, b: int) -> None:
        """Route the block's linears through their fake quantizers (soft or hard), and, with
        migration scales, divide each norm's output by s and scale its consumers' columns by s."""
        block = pipe.blocks[b]
        cols: dict[str, nn.Parameter] = {}
        for norm_name, log_s in self.mig.get(b, {}).items():
            for c in dict(pipe.bmap.smooth)[norm_name]:
                cols[f"{pipe.bmap.blocks}.{b}.{c}"] = log_s
            if b not in self._norm_hooks:
                self._norm_hooks[b] = []
            if len(self._norm_hooks[b]) < len(self.mig[b]):
                norm = get_module(block, norm_name)
                self._norm_hooks[b].append(
                    norm.register_forward_hook(
                        lambda mod, args, out, _p=log_s: out / torch.exp(_p).to(out.dtype)
                    )
                )
        for name, m in pipe.named_linears(b).items():
            m.requires_grad_(False)
            _override(m, self.wq[b][name], pipe.bmap.transposed, cols.get(name))
            if b in self.aq:
                acts.attach(m, self.aq[b][name].spec, hook=self.aq[b][name])


def _override(
    m: nn.Module, quant: LinearQuantizer, transposed: bool, log_s: nn.Parameter | None = None
) -> None:
    """Make ``m`` compute with its fake-quantized weight (an instance-level forward, so the
    module keeps its class and state_dict keys); ``log_s``: input-column migration scales."""

    def forward(x, *args, **kwargs):
        w = weight_of(m, transposed)
        if log_s is not None:  # the same product fold_scales writes at finalization
            w = w * torch.exp(log_s.detach() if not torch.is_grad_enabled() else log_s).to(
                w
            ).unsqueeze(0)
        w_hat = quant.weight(w, hard=not torch.is_grad_enabled())
        return F.linear(x, w_hat.to(x.dtype), m.bias)

    m.forward = forward


def _uninstall(m: nn.Module) -> None:
    if "forward" in m.__dict__:
        del m.forward
    acts.detach(m)
