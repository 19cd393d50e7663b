"""The shared expert beside the routed experts, in one autograd node, on a multi-threaded CPU.

Apart, the shared expert (a dense SwiGLU every token goes through) runs after the routed experts,
its GEMMs on MKL's own threads, which scale poorly at these sizes (1.3-1.7x on 2 threads for a
2048 x 256 -> 256 SwiGLU fwd+bwd), and its elementwise work adds to the serial part.
:class:`ExpertsWithShared` is the C-kernel routed node (:mod:`tinyseek.kernels.moe_train`) with
the shared expert's work handed to the first worker thread, whose share of routed experts is cut by
as much (:func:`kernel_runs_with_shared`): every worker runs one-thread GEMMs side by side. The maths
is that of the two apart (tested bit for bit on the output and the weight gradients).

Used by ``MoE`` (``grouped``, training) on CPU fp32 with more than one torch thread, when the shared
expert is a plain bias-free SwiGLU without module hooks and the work is big enough to share out
(``MoE._grouped_with_shared`` checks the modules; this module sees tensors only); otherwise the
shared expert runs apart. Measured: ``benchmarks/README.md`` (moe section).
"""
from __future__ import annotations

import torch

from tinyseek.kernels import moe_train
from tinyseek.kernels.moe_grouped import bag_sum


class ExpertsWithShared(torch.autograd.Function):
    """The C-kernel routed node (``moe_grouped.RoutedExperts``'s kernel path) and the shared expert
    (nn.Linear weight layouts ``W_gate (S, D)``, ``W_up (S, D)``, ``W_down (D, S)``) as one node,
    returning their sum; ``runs`` from :func:`kernel_runs_with_shared`, ``kern`` from
    :func:`tinyseek.kernels.moe_train.usable`."""

    @staticmethod
    def forward(ctx, x_ND, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E, w_sg, w_su, w_sd,
                kern, runs):
        x_ND, w_sg, w_su, w_sd = x_ND.contiguous(), w_sg.contiguous(), w_su.contiguous(), w_sd.contiguous()
        buf = _shared_buffers_fwd(x_ND, w_sg, w_sd)
        y_RD, x_RD, h_RF2, act_RF = moe_train.forward(kern, x_ND, w_gate_up, w_down, w_R, tok_R, offs_E, runs,
                                                 lambda: _shared_forward(x_ND, w_sg, w_su, w_sd, *buf))
        ctx.kern, ctx.runs = kern, runs
        ctx.save_for_backward(x_ND, x_RD, act_RF, h_RF2, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E,
                              w_sg, w_su, w_sd, *buf[1:])
        return bag_sum(bag_rows, bag_starts, y_RD).add_(buf[0])

    @staticmethod
    def backward(ctx, dout_ND):
        (x_ND, x_RD, act_RF, h_RF2, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E,
         w_sg, w_su, w_sd, g_NS, u_NS, s_NS, a_NS) = ctx.saved_tensors
        need = ctx.needs_input_grad
        dout_ND = dout_ND.contiguous()
        buf = _shared_buffers_bwd(x_ND, w_sg, w_sd, need[0], need[8], need[9], need[10])
        dx_RD, d_wgu, d_wd, d_w = moe_train.backward(
            ctx.kern, dout_ND, w_gate_up, w_down, w_R, tok_R, offs_E, x_RD, h_RF2, act_RF, ctx.runs, need[1],
            need[2], need[3], need[0],
            lambda: _shared_backward(dout_ND, x_ND, w_sg, w_su, w_sd, g_NS, u_NS, s_NS, a_NS, *buf))
        dx_s, d_wsg, d_wsu, d_wsd = buf[:4]
        d_x = bag_sum(bag_rows, bag_starts, dx_RD).add_(dx_s) if need[0] else None
        return d_x, d_wgu, d_wd, d_w, None, None, None, None, d_wsg, d_wsu, d_wsd, None, None


# The shared expert's work below runs on a pool worker: every tensor it writes is allocated by the
# caller (main thread) and passed in. Allocated on the worker, they came from glibc's per-thread
# arena, which hands freed memory back to the kernel: the worker faulted its 4 MB activations in
# afresh every step (2048 x 256 -> 512 SwiGLU forward: 44-56 ms on the worker, 20-30 ms of it system
# time, against 19 ms on the main thread).
def _shared_buffers_fwd(x_ND, w_sg, w_sd):
    N, S, D = x_ND.shape[0], w_sg.shape[0], w_sd.shape[0]
    return x_ND.new_empty(N, D), *(x_ND.new_empty(N, S) for _ in range(4))


@torch.no_grad()  # grad mode is per thread (on by default on a worker)
def _shared_forward(x_ND, w_sg, w_su, w_sd, y, g, u, s, a) -> None:
    """SwiGLU ``y = down(silu(gate(x)) * up(x))`` into the given buffers (g, u, s = silu(g), a = s*u)."""
    torch.mm(x_ND, w_sg.t(), out=g)
    torch.mm(x_ND, w_su.t(), out=u)
    torch.ops.aten.silu.out(g, out=s)
    torch.mul(s, u, out=a)
    torch.mm(a, w_sd.t(), out=y)


def _shared_buffers_bwd(x_ND, w_sg, w_sd, need_x, need_sg, need_su, need_sd):
    N, S, D = x_ND.shape[0], w_sg.shape[0], w_sd.shape[0]
    e = x_ND.new_empty
    return (e(N, D) if need_x else None, e(S, D) if need_sg else None, e(S, D) if need_su else None,
            e(D, S) if need_sd else None, e(N, S), e(N, S), e(N, S))


@torch.no_grad()
def _shared_backward(dy, x_ND, w_sg, w_su, w_sd, g, u, s, a, dx, d_wsg, d_wsu, d_wsd, da, du, dg) -> None:
    """Gradients of :func:`_shared_forward` into the given buffers (None: not needed)."""
    if d_wsd is not None:
        torch.mm(dy.t(), a, out=d_wsd)
    torch.mm(dy, w_sd, out=da)
    torch.mul(da, s, out=du)
    torch.ops.aten.silu_backward.grad_input(da.mul_(u), g, grad_input=dg)
    if d_wsg is not None:
        torch.mm(dg.t(), x_ND, out=d_wsg)
    if d_wsu is not None:
        torch.mm(du.t(), x_ND, out=d_wsu)
    if dx is not None:
        torch.mm(dg, w_sg, out=dx)
        dx.addmm_(du, w_su)


def kernel_runs_with_shared(offs_E: torch.Tensor, n_tokens: int, d_model: int, shared_width: int,
                            expert_width: int):
    """Expert ranges for :class:`ExpertsWithShared` (the first worker also runs the shared expert,
    which costs as much as ``n_tokens * S / F`` routed rows), or None where it does not pay (one
    thread, or less work than ``moe_train.PAR_MIN_MACS``)."""
    head = n_tokens * shared_width // max(expert_width, 1)
    rows = int(offs_E[-1]) if offs_E.numel() else 0
    return moe_train.kernel_runs(offs_E, (rows + head) * d_model * 3 * expert_width, head)
