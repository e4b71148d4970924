"""An optional compiled θ filter for convolutions: the whole per-neuron loop (gather the window, exact products,
find the cut, scatter the kept signs) in C++, compiled on first use with torch.utils.cpp_extension.

Same rule as theta.py, same exactness argument: products of two float32 values are exact in float64; the cut is
found by binning |p| on the exponent bits of its float64 value (monotone), walking bins in ascending order with
a running sum, and sorting (by |p|, then input index) only the elements of the bins where the cut can lie. Every
comparison of a float64 running sum with θ·|y| is made with a rigorous margin; a neuron that any comparison
cannot decide is reported back instead of sliced, and the caller decides it with exact integer arithmetic
(theta.exact_keep). Products that are 0 are skipped: they add nothing to any sum and their contribution
(sign(w)·sign(Δx)) is 0 whether kept or not.

`available()` compiles it once per process (about 25 s the first time; torch caches the build in its extensions
directory). No compiler, a failed build, or GRADAUTH_SLICING_KERNEL=0: it returns False and the torch path runs.
"""
from __future__ import annotations

import os

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {
struct El { double a; double p; int64_t i; float s; };

inline int64_t key_of(double a) { int64_t b; std::memcpy(&b, &a, 8); return b >> 50; }  // 4 bins per octave
}

// acc[n, ci, h, w] += g·sign(w)·keep for every active output neuron; returns the flat indices of the neurons
// whose cut the margins could not decide (not added to acc).
std::vector<torch::Tensor> conv_theta(torch::Tensor dx, torch::Tensor wt, torch::Tensor y, torch::Tensor g,
                                      int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                                      int64_t groups, double theta) {
  dx = dx.contiguous(); wt = wt.contiguous(); y = y.contiguous(); g = g.contiguous();
  const int64_t N = dx.size(0), Cin = dx.size(1), H = dx.size(2), W = dx.size(3);
  const int64_t Cout = wt.size(0), Cg = wt.size(1), KH = wt.size(2), KW = wt.size(3);
  const int64_t Ho = g.size(2), Wo = g.size(3), per_out = Cout / groups;
  const float* X = dx.data_ptr<float>(); const float* Wp = wt.data_ptr<float>();
  const float* Y = y.data_ptr<float>(); const float* G = g.data_ptr<float>();
  const int64_t total = N * Cout * Ho * Wo, plane = Cin * H * W;
  const int nt = at::get_num_threads();
  std::vector<std::vector<float>> accs(nt);
  std::vector<std::vector<int64_t>> ambs(nt);
  const double EPS = std::ldexp(1.0, -52);
  at::parallel_for(0, total, 256, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    auto& acc = accs[tid];
    if (acc.empty()) acc.assign((size_t)(N * plane), 0.f);
    auto& amb = ambs[tid];
    std::vector<El> el; el.reserve(Cg * KH * KW);
    std::vector<int64_t> bin_of; std::vector<double> pos, neg; std::vector<int> cnt, start, fill;
    std::vector<El> ord;  // scratch, reused by every neuron of the chunk
    for (int64_t o = begin; o < end; ++o) {
      const float gv = G[o];
      if (gv == 0.f) continue;
      const int64_t j = o % Wo, i = (o / Wo) % Ho, co = (o / (Wo * Ho)) % Cout, n = o / (Wo * Ho * Cout);
      const int64_t ci0 = (co / per_out) * Cg;
      const float* wrow = Wp + co * Cg * KH * KW;
      const float* xs = X + n * plane;
      float* ac = acc.data() + n * plane;
      el.clear();
      double A = 0;
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t a = 0; a < KH; ++a) {
          const int64_t r = i * sh - ph + a * dh;
          if (r < 0 || r >= H) continue;
          for (int64_t b = 0; b < KW; ++b) {
            const int64_t q = j * sw - pw + b * dw;
            if (q < 0 || q >= W) continue;
            const float wv = wrow[(c * KH + a) * KW + b];
            const int64_t idx = ((ci0 + c) * H + r) * W + q;
            const double p = (double)wv * (double)xs[idx];
            if (p == 0) continue;
            const double ap = std::fabs(p);
            A += ap;
            el.push_back({ap, p, idx, wv > 0 ? gv : -gv});
          }
        }
      const double t = theta * std::fabs((double)Y[o]);
      const size_t K = el.size();
      if (K == 0) continue;
      if (t == 0) {  // y = 0: nothing is below 0, every input is kept
        for (auto& e : el) ac[e.i] += e.s;
        continue;
      }
      const double M = ((double)(2 * K + 64) * EPS) * A + EPS * t;
      if (A < t - M) continue;  // every running sum stays below t: every input is dropped
      // bins: exponent key relative to the largest, 4 per octave over 16 octaves, all smaller ones in bin 0
      int64_t kmax = 0;
      for (auto& e : el) kmax = std::max(kmax, key_of(e.a));
      const int64_t NB = 64;
      bin_of.resize(K); pos.assign(NB, 0.0); neg.assign(NB, 0.0); cnt.assign(NB, 0);
      for (size_t k = 0; k < K; ++k) {
        int64_t b = key_of(el[k].a) - kmax + NB - 1;
        if (b < 0) b = 0;
        bin_of[k] = b; cnt[b]++;
        if (el[k].p > 0) pos[b] += el[k].p; else neg[b] -= el[k].p;
      }
      // order elements by bin (counting sort), keeping input order inside a bin for the tie rule later
      start.assign(NB + 1, 0);
      for (int64_t b = 0; b < NB; ++b) start[b + 1] = start[b] + cnt[b];
      ord.resize(K);
      fill.assign(start.begin(), start.end() - 1);
      for (size_t k = 0; k < K; ++k) ord[fill[bin_of[k]]++] = el[k];
      double s0 = 0;
      int64_t cut = -1;  // position in ord of the first kept element; -1: none found yet
      bool ambiguous = false;
      for (int64_t b = 0; b < NB && cut < 0 && !ambiguous; ++b) {
        if (!cnt[b]) continue;
        // inside the bin the running sum stays within [s0 - neg, s0 + pos], whatever the order
        if (std::max(std::fabs(s0 + pos[b]), std::fabs(s0 - neg[b])) < t - M) { s0 += pos[b] - neg[b]; continue; }
        auto first = ord.begin() + start[b], last = ord.begin() + start[b + 1];
        std::sort(first, last, [](const El& u, const El& v) { return u.a < v.a || (u.a == v.a && u.i < v.i); });
        double s = s0;
        for (int64_t k = start[b]; k < start[b + 1]; ++k) {
          s += ord[k].p;
          const double as = std::fabs(s);
          if (as >= t + M) { cut = k; break; }
          if (as > t - M) { ambiguous = true; break; }
        }
        s0 = s;  // (only used when the bin had no cut: then s is the bin's full sum)
      }
      if (ambiguous) { amb.push_back(o); continue; }
      if (cut < 0) continue;  // no prefix reached t: every input is dropped
      for (size_t k = (size_t)cut; k < K; ++k) ac[ord[k].i] += ord[k].s;
    }
  });
  auto out = torch::zeros({N, Cin, H, W}, dx.options());
  float* O = out.data_ptr<float>();
  for (auto& acc : accs)
    if (!acc.empty()) for (int64_t k = 0; k < N * plane; ++k) O[k] += acc[k];
  std::vector<int64_t> all;
  for (auto& a : ambs) all.insert(all.end(), a.begin(), a.end());
  std::sort(all.begin(), all.end());
  return {out, torch::tensor(all, torch::kInt64)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("conv_theta", &conv_theta); }
"""

_MODULE = None
_TRIED = False


def enabled() -> bool:
    return os.environ.get("GRADAUTH_SLICING_KERNEL", "1") != "0"


def available() -> bool:
    """Compile (once per process) and report whether the kernel can be used."""
    global _MODULE, _TRIED
    if not enabled():
        return False
    if not _TRIED:
        _TRIED = True
        try:
            from torch.utils.cpp_extension import load_inline
            _MODULE = load_inline("gradauth_slicing_theta", cpp_sources=[_SOURCE], extra_cflags=["-O3"],
                                  with_cuda=False, verbose=False)
        except Exception:  # no compiler, no headers, a failed build: the torch path is exact too, only slower
            _MODULE = None
    return _MODULE is not None


def conv_theta(m, g: torch.Tensor, dx: torch.Tensor, y: torch.Tensor, theta: float):
    """(acc, ambiguous flat neuron indices): acc as vectorized._conv_theta computes it, minus those neurons."""
    return _MODULE.conv_theta(dx.float().contiguous(), m.weight.detach().float().contiguous(), y.float().contiguous(),
                              g.float().contiguous(), *m.stride, *m.padding, *m.dilation, m.groups, float(theta))
