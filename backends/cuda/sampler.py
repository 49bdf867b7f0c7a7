"""Batched next-token sampling in torch, on the logits' device.

Why here: sampling on the device means full-vocabulary logits never cross to the host; only the
chosen ids (and, when asked, a few logprobs) come back, in one transfer per step.

gateway/engine/sampling.py (NumPy, one row at a time) is the reference: its module docstring gives
the exact order of operations, and this sampler draws the same token ids from the same float32
logits and uniforms. The steps that decide a token are computed the same way in both: bias and
penalties in float32, top_k and top_p as thresholds on the processed logits x, z = (x - max) / T in
float32 (IEEE, bit-identical everywhere), min_p as z >= float32(log(min_p)), probabilities exp(z)
and their cumulative sums in float64, and the draw over kept tokens in ascending token-id order.

Every operation works along a row, so a row's draw depends only on its logits, its parameters and
its uniform (drawn from the request's seed and the token's index): not on the rows beside it, which
is what lets a seed repeat alone or batched (tests/test_determinism.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from backends.base import SampleSpec
from backends.sampling_params import SampledToken, SamplingParams

_TINY = float(np.finfo(np.float32).tiny)   # temperatures below this would make (x - m) / T nan


def _temperature32(temperature: float) -> float:
    return max(float(np.float32(temperature)), _TINY)


def _top_k(p: SamplingParams, vocab_size: int) -> int:
    """The request's top_k when it filters anything, else 0."""
    return p.top_k if 0 < p.top_k < vocab_size else 0


def _penalized(p: SamplingParams) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty)


class TorchSampler:
    """Draws the next token of many sequences at once on logits' device."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._bit = torch.arange(32, dtype=torch.int32, device=self.device)   # bit positions in a mask word

    # -- host-built parameter tensors -------------------------------------------------------

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _rows(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """x restricted to these rows (x itself when they are all of them, in order)."""
        if len(rows) == x.shape[0]:
            return x
        return x.index_select(0, self._tensor(rows, torch.int64))

    def _check(self, logits: torch.Tensor, specs: Sequence[SampleSpec]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(specs) or logits.shape[1] != self.vocab_size:
            raise ValueError(f"expected logits of shape ({len(specs)}, {self.vocab_size}), "
                             f"got {tuple(logits.shape)}")
        bad = sorted({t for s in specs for t in s.params.logit_bias if t >= self.vocab_size})
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary "
                             f"(size {self.vocab_size})")

    # -- processing: logit_bias, penalties -------------------------------------------------

    def _process(self, logits: torch.Tensor, specs: Sequence[SampleSpec]) -> torch.Tensor:
        """Logits after bias, penalties and grammar bitmasks: a copy when anything changes them."""
        V = self.vocab_size
        bias_flat: list[int] = []
        bias_vals: list[float] = []
        for i, s in enumerate(specs):
            for t, b in s.params.logit_bias.items():
                bias_flat.append(i * V + t)
                bias_vals.append(b)
        pen = [i for i, s in enumerate(specs) if _penalized(s.params)]
        masked = [i for i, s in enumerate(specs) if s.allowed is not None]
        if not bias_flat and not pen and not masked:
            return logits
        x = logits.clone(memory_format=torch.contiguous_format)   # the caller's logits stay untouched
        if bias_flat:                               # one add per (row, id): keys are unique per row
            x.view(-1).index_put_((self._tensor(bias_flat, torch.int64),),
                                  self._tensor(bias_vals, torch.float32), accumulate=True)
        if pen:
            gens = [np.asarray(specs[i].generated, dtype=np.int64).reshape(-1) for i in pen]
            flat = np.concatenate([r * V + g for r, g in enumerate(gens)])
            if flat.size:
                tokens = np.concatenate(gens)
                if tokens.min() < 0 or tokens.max() >= V:
                    raise ValueError(f"generated token ids outside the vocabulary (size {V})")
                counts = torch.zeros(len(pen), V, dtype=torch.float32, device=self.device)
                flat_t = self._tensor(flat, torch.int64)
                counts.view(-1).scatter_add_(0, flat_t, torch.ones(flat.size, dtype=torch.float32,
                                                                   device=self.device))
                freq = self._tensor([[specs[i].params.frequency_penalty] for i in pen], torch.float32)
                pres = self._tensor([[specs[i].params.presence_penalty] for i in pen], torch.float32)
                penalty = counts * freq + (counts > 0) * pres      # float32, as the reference
                if len(pen) == len(specs):
                    x -= penalty
                else:
                    rows = self._tensor(pen, torch.int64)
                    x.index_copy_(0, rows, x.index_select(0, rows) - penalty)
        if masked:
            self._apply_bitmasks(x, masked, [specs[i].allowed for i in masked])
        return x

    def _apply_bitmasks(self, x: torch.Tensor, rows: list[int], bitmasks: list[np.ndarray]) -> None:
        """Set the logits of tokens a row's grammar does not allow to -inf, in place. The bitmasks
        (a few KB per row) cross to the device once; the bits are unpacked there."""
        words = self._tensor(np.stack(bitmasks), torch.int32)                   # [M, ceil(V / 32)]
        bits = (words.unsqueeze(-1) >> self._bit) & 1                        # [M, W, 32]
        allowed = bits.reshape(len(rows), -1)[:, :self.vocab_size].bool()
        if len(rows) == x.shape[0]:
            x.masked_fill_(~allowed, -math.inf)
        else:
            index = self._tensor(rows, torch.int64)
            x.index_copy_(0, index, x.index_select(0, index).masked_fill_(~allowed, -math.inf))

    # -- the draw ----------------------------------------------------------------------------

    def _draw(self, x: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
        """Token ids [S] drawn from rows x [S, V] (processed logits) of non-greedy requests."""
        S, V = x.shape
        dev = self.device
        m = x.amax(dim=1, keepdim=True)                       # nan propagates: a degenerate row
        temp = self._tensor([[_temperature32(p.temperature)] for p in params], torch.float32)

        # top_k and top_p both keep x >= a per-row threshold (-inf: off).
        thr = None
        k_rows = [i for i, p in enumerate(params) if _top_k(p, V)]
        if k_rows:
            ks = [_top_k(params[i], V) for i in k_rows]
            xk = self._rows(x, k_rows)
            kth = torch.topk(xk, max(ks), dim=1).values.gather(1, self._tensor([[k - 1] for k in ks], torch.int64))
            if len(k_rows) == S:
                thr = kth
            else:
                thr = torch.full((S, 1), -math.inf, dtype=torch.float32, device=dev)
                thr.index_copy_(0, self._tensor(k_rows, torch.int64), kth)
        p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if p_rows:
            xp = self._rows(x, p_rows)
            if thr is not None:
                xp = torch.where(xp >= self._rows(thr, p_rows), xp, -math.inf)
            desc = torch.sort(xp, dim=1, descending=True).values
            z = (desc - self._rows(m, p_rows)) / self._rows(temp, p_rows)
            cdf = torch.cumsum(torch.exp(z.double()), dim=1)
            top_p = self._tensor([[params[i].top_p] for i in p_rows], torch.float64)
            cut = torch.searchsorted(cdf, top_p * cdf[:, -1:], side="left").clamp_(max=V - 1)
            cut_x = desc.gather(1, cut)
            if thr is None and len(p_rows) == S:
                thr = cut_x
            else:
                if thr is None:
                    thr = torch.full((S, 1), -math.inf, dtype=torch.float32, device=dev)
                rows = self._tensor(p_rows, torch.int64)
                thr.index_copy_(0, rows, torch.maximum(thr.index_select(0, rows), cut_x))

        z = (x - m) / temp                                     # float32, as the reference
        keep = None if thr is None else x >= thr
        if any(p.min_p > 0.0 for p in params):
            floor = self._tensor([[float(np.float32(math.log(p.min_p))) if p.min_p > 0.0 else -math.inf]
                                  for p in params], torch.float32)
            keep = z >= floor if keep is None else keep & (z >= floor)

        probs = torch.exp(z.double())
        if keep is not None:
            probs = torch.where(keep, probs, 0.0)
        cdf = torch.cumsum(probs, dim=1)
        u = self._tensor([[u] for u in uniforms], torch.float64)
        idx = torch.searchsorted(cdf, u * cdf[:, -1:], side="right")
        if keep is None:
            last = torch.full_like(idx, V - 1)
        else:
            pos = torch.arange(V, device=dev)
            last = torch.where(keep, pos, -1).amax(dim=1, keepdim=True)
        idx = torch.minimum(idx, last).squeeze(1)
        # a row whose max is not finite (all -inf, +inf or nan): argmax, as the reference
        return torch.where(torch.isfinite(m.squeeze(1)), idx, x.argmax(dim=1))

    # -- entry point ---------------------------------------------------------------------------

    def sample(self, logits: torch.Tensor, specs: list[SampleSpec]) -> list[SampledToken]:
        """logits: float32 [B, vocab] on the device, row i for specs[i]. One host<-device transfer of the results."""
        if not specs:
            return []
        drawn = self.draw(logits, specs)
        return drawn.finish(drawn.packed.tolist())

    def draw(self, logits: torch.Tensor, specs: list[SampleSpec]) -> DrawnTokens:
        """sample() without the transfer: the drawn ids stay on the device (the next step may read
        them there); DrawnTokens.finish turns the transferred `packed` values into SampledTokens."""
        self._check(logits, specs)
        if logits.dtype != torch.float32:
            logits = logits.float()
        params = [s.params for s in specs]
        plain = all(not p.logprobs and not p.logit_bias and not _penalized(p) for p in params) \
            and all(s.allowed is None for s in specs)
        if plain and all(p.greedy for p in params):               # the common greedy step
            tokens = logits.argmax(dim=1)
            return DrawnTokens(tokens, tokens, _plain_tokens)

        x = self._process(logits, specs)
        draw_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(draw_rows) == len(specs):
            tokens = self._draw(x, params, [s.uniform for s in specs])
        else:
            tokens = x.argmax(dim=1)
            if draw_rows:
                drawn = self._draw(self._rows(x, draw_rows), [params[i] for i in draw_rows],
                                   [specs[i].uniform for i in draw_rows])
                tokens.index_copy_(0, self._tensor(draw_rows, torch.int64), drawn)

        lp_rows = [i for i, p in enumerate(params) if p.logprobs]
        if not lp_rows:
            return DrawnTokens(tokens, tokens, _plain_tokens)

        # logprobs: log_softmax of the processed logits, before temperature and filters
        lp = torch.log_softmax(self._rows(x, lp_rows), dim=1)
        lp_tok = self._rows(tokens.unsqueeze(1), lp_rows)
        parts = [tokens.double(), lp.gather(1, lp_tok).squeeze(1).double()]
        n_top = min(max(params[i].top_logprobs for i in lp_rows), self.vocab_size)
        if n_top:
            top_vals, top_ids = torch.topk(lp, n_top, dim=1)
            parts += [top_ids.double().flatten(), top_vals.double().flatten()]

        def finish(host: list) -> list[SampledToken]:
            B, L = len(specs), len(lp_rows)
            out = [SampledToken(int(t), None) for t in host[:B]]
            ids_at, vals_at = B + L, B + L + L * n_top
            for j, i in enumerate(lp_rows):
                k = min(params[i].top_logprobs, self.vocab_size)
                row = j * n_top
                top = [(int(host[ids_at + row + c]), host[vals_at + row + c]) for c in range(k)]
                out[i] = SampledToken(out[i].token_id, host[B + j], top)
            return out

        return DrawnTokens(tokens, torch.cat(parts), finish)


def _plain_tokens(host: list) -> list[SampledToken]:
    return [SampledToken(int(t), None) for t in host]


@dataclass
class DrawnTokens:
    """A step's draws on the device: `tokens` int64 [B]; `packed` what goes to the host (the
    tokens, then logprobs where asked), which `finish` turns into SampledTokens."""

    tokens: torch.Tensor
    packed: torch.Tensor
    finish: Callable[[list], list[SampledToken]]
