"""The official Hyena N-D operator's forward (Itamarzimm/HyenaND @e8b875e,
``pytorch-image-models/timm/models/layers/hyena2d.py``: ``HyenaOperator2d.forward``,
``HyenaFilter2d.filter2d``, ``ExponentialModulation.forward``, ``fftconv2d``, ``augment``), transcribed
without einops onto the weights of a vitkit :class:`~vitkit.models.hyena.HyenaOperator2d`. Kept as
the code has it, including its FFT scale (the convolution divided by 2L) and its ``irfft`` line whose
result is overwritten."""

from __future__ import annotations

import torch


def official_fftconv2d(u, k, D):
    dtype_out = u.dtype
    seqlen = u.shape[-2]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft2(k.float(), s=(fft_size, fft_size)) / fft_size
    u_f = torch.fft.rfft2(u.float(), s=(fft_size, fft_size))
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]  # overwritten, as in the code
    y = torch.fft.irfft2(u_f * k_f, s=(fft_size, fft_size))[..., :seqlen, :seqlen]
    out = y + u * D.unsqueeze(1).unsqueeze(2)
    return out.to(dtype=dtype_out)


def official_filter2d(f, L):
    """``HyenaFilter2d.filter2d`` on vitkit's ImplicitFilter2d weights: (1, L, L, C)."""
    z, t = f.z[:, :L], torch.linspace(0, 1, L)[None, :, None]
    deltas = f.deltas
    if f.kind == "product":
        hx = f.mlp_rows(z) * (torch.exp(-t * deltas.abs()) + 0.0)
        hy = f.mlp_cols(z) * (torch.exp(-t * deltas.abs()) + 0.0)
        return torch.einsum("ijk,imk->ijmk", hx, hy)
    z = z.repeat(1, L, 1, 1)
    z = torch.cat((z.transpose(-2, -3), z), dim=-1)
    h = f.mlp(z)
    xdecay = torch.exp(-t * deltas.abs())
    ydecay = torch.exp(-t * deltas.abs())
    decay = torch.einsum("ijk,imk->ijmk", xdecay, ydecay)
    return h * (decay + 0.0)


def augment(v):
    return torch.cat((v, v.flip(-1, -2), v.flip(-1), v.flip(-2)), dim=0)


def official_operator(op, u, scale_fix: bool):
    """``HyenaOperator2d.forward`` on (B, L*L, D) tokens; ``scale_fix`` multiplies the filters by 2L,
    undoing the code's FFT scale so that it can be compared with the true convolution."""
    B, n, d_model = u.shape
    L = int(n**0.5)
    u = u.reshape(B, L, L, d_model)
    u = op.in_proj(u).permute(0, 3, 1, 2)
    uc = op.short_filter(u)[..., :L, :L]
    *x, v = uc.split(d_model, dim=1)
    k = official_filter2d(op.filter_fn, L)[0]  # (L, L, (o d))
    k = k.reshape(L, L, op.order - 1, d_model).permute(2, 3, 0, 1)  # 'l1 l2 (o d) -> o d l1 l2'
    if scale_fix:
        k = k * 2 * L
    bias = op.filter_fn.bias.reshape(op.order - 1, d_model)
    four = op.direction == "4dir"
    if four:
        v = augment(v)
    for o, x_i in enumerate(reversed(x[1:])):
        if four:
            x_i = augment(x_i)
        v = v * x_i
        if op.direction == "seq" and op.order > 1 and o == 0:
            v = v.flip(-1, -2)
        v = official_fftconv2d(v, k[o], bias[o])
        if op.direction == "seq" and op.order > 1 and o == 0:
            v = v.flip(-1, -2)
    if four:
        x[0] = augment(x[0])
    y = (v * x[0]).permute(0, 2, 3, 1)
    if four:
        y1, y2, y3, y4 = y[:B], y[B : 2 * B].flip(-2, -3), y[2 * B : 3 * B].flip(-2), y[3 * B :].flip(-3)
        y = op.mix(torch.stack([y1, y2, y3, y4], dim=-1)).squeeze(-1)
    return op.out_proj(y).reshape(B, n, d_model)
