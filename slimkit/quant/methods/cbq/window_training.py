"""CBQ's reconstruction training of one window: the homologous reconstruction loss (FP and
quantized streams through the FP and quantized blocks), the AdaRound regulariser with its beta
schedule, and the rollback to the last good state on a non-finite loss or parameter."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from slimkit.core.logs import progress
from slimkit.llm.pipeline import Window
from slimkit.train.rollback import RollbackBudget, all_finite

log = logging.getLogger("slimkit")


def distance(ref: torch.Tensor, out: torch.Tensor, kl: bool) -> torch.Tensor:
    """Per-token relative squared L2 ||ref - out||^2 / ||ref||^2 plus
    KL(softmax(ref) || softmax(out)) over the hidden dimension, both averaged over tokens.

    The KL term is off by default (ours): on SmolLM2-135M with RTN W3 g64 it is dominated by a
    handful of tokens with massive activations (block 25: mean 2.6 nats, max 192, median 0) and
    destabilises the late windows.

    Normalising each token by its own energy (ours; the paper's L2 is unnormalised) keeps the
    few tokens with massive activations (|h| ~ 1e4 in SmolLM2's middle blocks, against ~1e2
    elsewhere) from owning the loss, and makes the scale comparable across depth."""
    ref, out = ref.float(), out.float()
    loss = ((ref - out).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp(min=1e-12)).mean()
    if kl:
        lr, lo = F.log_softmax(ref, -1), F.log_softmax(out, -1)
        loss = loss + (lr.exp() * (lr - lo)).sum(-1).mean()
    return loss


class WindowTraining:
    """The training loop of :class:`~slimkit.quant.methods.cbq.CBQ` (a mixin: it reads the
    method's config, quantizers and migration scales)."""

    def _params(self, win: Window) -> list[dict]:
        rnd, clip, mig = [], [], []
        for b in win.block_ids:
            mig += list(self.mig.get(b, {}).values())
            for q in self.wq[b].values():
                clip += [q.up, q.low]
                rnd += [p for n, p in q.named_parameters() if n in ("a1", "a2", "v")]
            for a in self.aq.get(b, {}).values():
                if a.logit.requires_grad:
                    clip.append(a.logit)
        groups = [{"params": clip, "lr": self.config.lr_clip}]
        if mig:
            groups.append({"params": mig, "lr": self.config.lr_smooth})
        if rnd:
            groups.append({"params": rnd, "lr": self.config.lr_round})
        return groups

    def _train(self, win: Window) -> None:
        cfg, pipe = self.config, win.pipe
        for blk in win.blocks:
            blk.requires_grad_(False)
        n = pipe.calib.shape[0]
        targets = [pipe.run_blocks(win.fp_blocks, win.inputs_fp)]
        if cfg.homologous:
            targets.append(pipe.run_blocks(win.fp_blocks, win.inputs_q))
        groups = self._params(win)
        per_epoch = math.ceil(n / cfg.train_batch_size)
        total = cfg.epochs * per_epoch
        quants = [q for b in win.block_ids for q in self.wq[b].values()]
        if total == 0 or not any(p.requires_grad for g in groups for p in g["params"]):
            return
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.train_seed * 100003 + win.index)
        snapshot = _snapshot(groups)
        budget, step, first, last = RollbackBudget(max_rollbacks=3), 0, None, None
        trace: list[float] = []
        bar = progress(total=total, desc=f"window {win.index + 1}", unit="step", leave=False)
        for _epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen).tolist()
            ep_losses = []
            for i0 in range(0, n, cfg.train_batch_size):
                idx = order[i0 : i0 + cfg.train_batch_size]
                x = _gather(win.inputs_q, idx).to(pipe.device)
                with torch.enable_grad():
                    out = x
                    for blk in win.blocks:
                        out = pipe.call_block(blk, out)
                    rec = sum(
                        distance(_gather(t, idx).to(pipe.device), out, cfg.kl) for t in targets
                    )
                    beta, lam = self._beta(step, total)
                    loss = rec
                    if lam > 0 and cfg.rounding != "nearest":
                        loss = loss + lam * sum(q.reg(beta) for q in quants) / len(quants)
                if not torch.isfinite(loss):
                    _restore(groups, snapshot)
                    if budget.spend():
                        log.warning(
                            "window %d: loss is not finite; keeping the last good state", win.index
                        )
                        break
                    budget.scale_lr(opt)
                    opt = torch.optim.AdamW(
                        [{"params": g["params"], "lr": g["lr"]} for g in opt.param_groups],
                        weight_decay=0.0,
                    )
                    log.warning("window %d: non-finite loss, rolled back (lr halved)", win.index)
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if not all_finite(p for g in groups for p in g["params"]):
                    _restore(groups, snapshot)
                    log.warning("window %d: non-finite parameters, rolled back", win.index)
                    if budget.spend():
                        break
                    continue
                ep_losses.append(float(rec.detach()))
                trace.append(ep_losses[-1])
                step += 1
                bar.update(1)
            else:
                if ep_losses:
                    ep = sum(ep_losses) / len(ep_losses)
                    first = ep if first is None else first
                    last = ep
                snapshot = _snapshot(groups)
                continue
            break
        bar.close()
        pipe.log.append(
            {
                "window": win.index,
                "blocks": f"{win.block_ids[0]}-{win.block_ids[-1]}",
                "loss_first_epoch": first,
                "loss_last_epoch": last,
                "rec_err": last if last is not None else float("nan"),
                "loss_first_steps": _avg(trace[: max(1, len(trace) // 8)]),
                "loss_last_steps": _avg(trace[-max(1, len(trace) // 8) :]),
                "rollbacks": budget.count,
                "round_params": sum(q.n_round_params() for q in quants),
            }
        )
        log.debug("window %d: loss %s -> %s", win.index, first, last)

    def _beta(self, step: int, total: int) -> tuple[float, float]:
        """(beta, regulariser weight) at ``step``: no regulariser during the warm-up, then beta
        decays linearly from beta_start to beta_end (AdaRound's schedule)."""
        cfg = self.config
        start = cfg.warmup * total
        if step < start:
            return cfg.beta_start, 0.0
        t = (step - start) / max(1.0, total - start)
        return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - t), cfg.lam_round


def _avg(x: list[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def _gather(store, idx: list[int]) -> torch.Tensor:
    return torch.cat([store.get(i, i + 1) for i in idx])


def _snapshot(groups: list[dict]) -> list[torch.Tensor]:
    return [p.detach().clone() for g in groups for p in g["params"]]


def _restore(groups: list[dict], snap: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip((p for g in groups for p in g["params"]), snap):
            p.copy_(s)
