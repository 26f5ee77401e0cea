"""The distiller: a student with its training-only branches / connectors and a frozen teacher."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.distill.branches import CNNBranch, Connector, TokenBranch
from slimkit.distill.losses import LOSSES, Batch
from slimkit.vision.models import StageTaps, family, pooled_width, stage_shapes


class Distiller(nn.Module):
    """``forward(x, labels, teacher_logits=None) -> Batch``.

    The teacher (if any) is frozen, kept in eval mode and run under no_grad; OFA branches are
    built when a loss needs them, FitNet connectors when a loss needs stage hints. ``student``
    stays a plain timm model (what is saved)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, losses: dict[str, float],
                 num_classes: int, in_chans: int, img_size: int,
                 align_head: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.student = student
        self.align_head = align_head  # GPT4Image projection: training-only, never saved
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        need_branches = any(LOSSES.meta(n).get("branches") for n in losses)
        self.need_hints = any(LOSSES.meta(n).get("hints") for n in losses)
        self.taps = StageTaps(student) if (need_branches or self.need_hints) else None
        self.teacher_taps = (
            StageTaps(teacher) if (self.need_hints and teacher is not None) else None
        )
        self.branches = nn.ModuleList()
        self.connectors = nn.ModuleList()
        if need_branches:
            shapes = stage_shapes(student, in_chans, img_size)
            d_s = pooled_width(student)
            d_t = pooled_width(teacher) if teacher is not None else d_s
            final_grid = shapes[-1][0][-1]
            for k, (sp, prefix) in enumerate(shapes, start=1):
                if family(student) == "cnn":
                    self.branches.append(CNNBranch(sp[0], sp[-1], k, max(d_s, d_t), num_classes))
                else:
                    self.branches.append(
                        TokenBranch(
                            sp[0], sp[-1], final_grid, k, d_s, num_classes, prefix is not None
                        )
                    )
        if self.need_hints and teacher is not None:
            s_shapes = stage_shapes(student, in_chans, img_size)
            t_shapes = stage_shapes(teacher, in_chans, img_size)
            for (ss, _), (ts, _) in zip(s_shapes, t_shapes):
                self.connectors.append(Connector(ss[0], ts[0]))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x).float()

    def forward(self, x: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                text: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> Batch:  # fmt: skip
        t_feats = None
        if self.teacher is not None and (teacher_logits is None or self.teacher_taps is not None):
            with torch.no_grad():
                if self.teacher_taps is not None:
                    t_out, t_feats = self.teacher_taps(x)
                else:
                    t_out = self.teacher(x)
            teacher_logits = t_out.float() if teacher_logits is None else teacher_logits
        pooled: list[torch.Tensor] = []
        hook = None
        if self.align_head is not None:  # the classifier's input is the pooled feature h
            hook = self.student.get_classifier().register_forward_pre_hook(
                lambda m, inp: pooled.append(inp[0])
            )
        try:
            if self.taps is not None:
                logits, feats = self.taps(x)
            else:
                logits, feats = self.student(x), []
        finally:
            if hook is not None:
                hook.remove()
        b = Batch(labels=labels, student_logits=logits, teacher_logits=teacher_logits)
        if self.align_head is not None:
            b.align_image = self.align_head(pooled[-1])
            b.align_text, b.align_keys = text, keys
        if len(self.branches):
            b.branch_logits = [br(f) for br, f in zip(self.branches, feats)]
        if len(self.connectors) and t_feats is not None:
            b.hint_pairs = [
                c(f.spatial, tf.spatial) for c, f, tf in zip(self.connectors, feats, t_feats)
            ]
        return b
