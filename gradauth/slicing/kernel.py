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
import platform

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <thread>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {
constexpr int SUB = 4;                   // 2^SUB bins per octave of |p|
constexpr int NB = 256;                  // bins below the row's largest |p| (16 octaves); smaller ones share bin 0
constexpr int SHIFT = 52 - SUB;
constexpr int BLK = 16;                  // bins per block of the walk to the cut

// A monotone bin key of a >= 0: its float64 exponent and top SUB mantissa bits.
inline int64_t key_of(double a) { uint64_t b; std::memcpy(&b, &a, 8); return (int64_t)(b >> SHIFT); }

struct Cand { double a; double p; int32_t k; };

#ifdef __AVX2__
// LEFT[m]: the lanes set in the 8-bit mask m, packed to the front (AVX2 has no compress instruction)
struct LeftPack {
  alignas(32) int32_t idx[256][8];
  LeftPack() {
    for (int m = 0; m < 256; ++m) { int n = 0; for (int l = 0; l < 8; ++l) if (m >> l & 1) idx[m][n++] = l; while (n < 8) idx[m][n++] = 0; }
  }
};
const LeftPack LEFT;
#endif

// ord[0..n) = the k with blo <= bin[k] <= blo + span, ascending; returns n (ord holds K + 8 slots)
int32_t compact(const int32_t* __restrict bin, int64_t K, int32_t blo, int32_t span, int32_t* __restrict ord) {
  int32_t n = 0;
  int64_t k = 0;
#ifdef __AVX2__
  const __m256i lo = _mm256_set1_epi32(blo), top = _mm256_set1_epi32(span), flip = _mm256_set1_epi32(INT32_MIN);
  __m256i ks = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  for (; k + 8 <= K; k += 8, ks = _mm256_add_epi32(ks, eight)) {
    // unsigned d = bin - blo <= span, as a signed compare of both sides with the sign bit flipped
    const __m256i d = _mm256_xor_si256(_mm256_sub_epi32(_mm256_loadu_si256((const __m256i*)(bin + k)), lo), flip);
    const __m256i out = _mm256_cmpgt_epi32(d, _mm256_xor_si256(top, flip));
    const int m = ~_mm256_movemask_ps(_mm256_castsi256_ps(out)) & 0xff;
    const __m256i packed = _mm256_permutevar8x32_epi32(ks, _mm256_load_si256((const __m256i*)LEFT.idx[m]));
    _mm256_storeu_si256((__m256i*)(ord + n), packed);
    n += __builtin_popcount(m);
  }
#endif
  for (; k < K; ++k) { ord[n] = (int32_t)k; n += (uint32_t)(bin[k] - blo) <= (uint32_t)span; }
  return n;
}

inline bool before(const Cand& u, const Cand& v) { return u.a < v.a || (u.a == v.a && u.k < v.k); }

// Scratch of one thread, reused by every neuron it handles.
struct Scratch {
  std::vector<float> acc, xp, accp;
  std::vector<int64_t> pidx, amb;
  std::vector<double> p, a;
  std::vector<int32_t> bin, ord;
  std::vector<Cand> cand;
  double h1[2 * NB];
  int32_t cstart[NB + 1], cfill[NB];
  double h[2 * NB];  // mass of |p| per bin and sign: [2b] of the positive p, [2b + 1] of the negative ones
};
}  // namespace

// For every active output neuron o (g[o] != 0) of a conv at θ > 0: acc[n, ci, h, w] += g·sign(w)·keep.
// Returns {acc, flat indices of the neurons whose cut the float64 margins could not decide (left out of acc)}.
//
// Per output position its input window is gathered once and shared by every active output channel there. Per
// neuron: exact products (float64, contiguous), a histogram of their mass by bin of |p| (one scatter per input),
// a walk over the bins that brackets the cut between bins lo and hi, the inputs of those bins (a few percent)
// compacted and sorted by (|p|, input index) bin by bin only where the running sum may cross θ·|y|, and the kept
// inputs (every later bin, the cut bin's tail) added to the window's contributions; the window is scattered into
// the input map once per position.
std::vector<torch::Tensor> conv_theta(torch::Tensor dx, torch::Tensor wt, torch::Tensor y, torch::Tensor g,
                                      int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                                      int64_t groups, double theta) {
  dx = dx.contiguous(); wt = wt.contiguous(); y = y.contiguous(); g = g.contiguous();
  const int64_t N = dx.size(0), Cin = dx.size(1), H = dx.size(2), W = dx.size(3);
  const int64_t Cout = wt.size(0), Cg = wt.size(1), KH = wt.size(2), KW = wt.size(3);
  const int64_t Ho = g.size(2), Wo = g.size(3), per_out = Cout / groups, K = Cg * KH * KW;
  const float* X = dx.data_ptr<float>(); const float* Wp = wt.data_ptr<float>();
  const float* Y = y.data_ptr<float>(); const float* G = g.data_ptr<float>();
  const int64_t plane = Cin * H * W, HWo = Ho * Wo;
  std::vector<float> SW(Cout * K);
  std::vector<float> wmax(Cout, 0.f);  // largest |w| of each output channel
  for (int64_t k = 0; k < Cout * K; ++k) {
    SW[k] = (float)((Wp[k] > 0) - (Wp[k] < 0));
    wmax[k / K] = std::max(wmax[k / K], std::fabs(Wp[k]));
  }
  // Threads of our own: at::parallel_for's OpenMP pragma compiles to a serial loop in an extension built without
  // -fopenmp, and linking a second OpenMP runtime next to torch's is asking for trouble.
  const int64_t total = N * groups * HWo;
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  std::vector<Scratch> scr(nt);
  // Every float64 sum below is of at most K + 2·NB terms, in whatever order: its error is below MK·Σ|p|, and
  // t = θ·|y| is one rounded product (EPS·t).
  const double EPS = std::ldexp(1.0, -52), MK = (double)(2 * K + 64) * EPS;
  auto run = [&](Scratch& S, int64_t begin, int64_t end) {
    if (S.acc.empty()) {
      S.acc.assign((size_t)(N * plane), 0.f);
      S.xp.resize(K); S.accp.resize(K); S.pidx.resize(K); S.p.resize(K); S.a.resize(K); S.bin.resize(K);
      S.ord.resize(K + 8);
    }
    float* xp = S.xp.data(); float* accp = S.accp.data(); int64_t* pidx = S.pidx.data();
    double* P = S.p.data(); double* Aa = S.a.data(); int32_t* bin = S.bin.data(); int32_t* ord = S.ord.data();
    double* hh = S.h;
    for (int64_t q0 = begin; q0 < end; ++q0) {
      const int64_t pos_ = q0 % HWo, j = pos_ % Wo, i = pos_ / Wo, gr = (q0 / HWo) % groups, n = q0 / (HWo * groups);
      const int64_t co0 = gr * per_out, ci0 = gr * Cg;
      const float* Gn = G + n * Cout * HWo + pos_;
      bool any = false;
      for (int64_t co = co0; co < co0 + per_out && !any; ++co) any = Gn[co * HWo] != 0.f;
      if (!any) continue;
      // the window: Δx and the input's flat index, 0 / -1 outside the map (padding is no input)
      const float* xs = X + n * plane;
      for (int64_t c = 0, k = 0; c < Cg; ++c)
        for (int64_t a = 0; a < KH; ++a) {
          const int64_t r = i * sh - ph + a * dh;
          for (int64_t b = 0; b < KW; ++b, ++k) {
            const int64_t q = j * sw - pw + b * dw;
            if (r < 0 || r >= H || q < 0 || q >= W) { xp[k] = 0.f; pidx[k] = -1; continue; }
            pidx[k] = ((ci0 + c) * H + r) * W + q;
            xp[k] = xs[pidx[k]];
          }
        }
      float xmax = 0.f;
      for (int64_t k = 0; k < K; ++k) xmax = std::max(xmax, std::fabs(xp[k]));
      std::fill(accp, accp + K, 0.f);
      bool touched = false;
      for (int64_t co = co0; co < co0 + per_out; ++co) {
        const float gv = Gn[co * HWo];
        if (gv == 0.f) continue;
        const int64_t o = (n * Cout + co) * HWo + pos_;
        const float* wr = Wp + co * K;
        const float* sr = SW.data() + co * K;
        const double t = theta * std::fabs((double)Y[o]);
        if (t == 0) {  // y = 0: nothing is below 0, every input is kept
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) accp[k] += gv * sr[k];
          touched = true;
          continue;
        }
        // One pass: products (exact in float64), Σ|p|, and bin[k] = 2·(bin of |p|) + (p < 0), bins counted down
        // from a bound on every |p| of this neuron (its largest |w| times the window's largest |Δx|).
        const double bound = (double)wmax[co] * (double)xmax;
        const int64_t kbase = key_of(bound) - (NB - 1);
        double A = 0;
        int32_t bmin = 2 * NB;
#pragma omp simd reduction(+:A) reduction(min:bmin)
        for (int64_t k = 0; k < K; ++k) {
          const double pk = (double)wr[k] * (double)xp[k];
          const double ak = std::fabs(pk);
          P[k] = pk; Aa[k] = ak; A += ak;
          const int64_t b = key_of(ak) - kbase;
          const int32_t bk = (int32_t)(2 * (b < 0 ? 0 : b) + (pk < 0));
          bin[k] = bk;
          bmin = std::min(bmin, bk);
        }
        const double M = MK * A + EPS * t;
        if (A < t - M) continue;  // every running sum stays below t: every input is dropped
        bmin >>= 1;
        // two histograms over alternate inputs (consecutive adds to one bin need not wait for each other)
        double* h1 = S.h1;
        std::memset(hh + 2 * bmin, 0, sizeof(double) * 2 * (NB - bmin));
        std::memset(h1 + 2 * bmin, 0, sizeof(double) * 2 * (NB - bmin));
        int64_t k2 = 0;
        for (; k2 + 1 < K; k2 += 2) { hh[bin[k2]] += Aa[k2]; h1[bin[k2 + 1]] += Aa[k2 + 1]; }
        if (k2 < K) hh[bin[k2]] += Aa[k2];
#pragma omp simd
        for (int b = 2 * bmin; b < 2 * NB; ++b) hh[b] += h1[b];
        // The cut lies between the first bin whose running sums may reach t (lo) and the first bin by whose end
        // the running sum surely has (hi): inside bins b..c the running sum stays within [e - neg, e + pos] (their
        // masses), so whole blocks of BLK bins are skipped with one test while no sum can reach t.
        double e = 0, s_lo = 0;
        int lo = -1, hi = NB - 1;
        for (int b = bmin; b < NB; ++b) {
          if (lo < 0 && b % BLK == 0) {
            double pB = 0, nB = 0;
            for (int c = b; c < b + BLK; ++c) { pB += hh[2 * c]; nB += hh[2 * c + 1]; }
            if (std::max(std::fabs(e + pB), std::fabs(e - nB)) < t - M) { e += pB - nB; b += BLK - 1; continue; }
          }
          const double pb = hh[2 * b], nb = hh[2 * b + 1];
          if (lo < 0) {
            if (std::max(std::fabs(e + pb), std::fabs(e - nb)) < t - M) { e += pb - nb; continue; }
            lo = b; s_lo = e;
          }
          e += pb - nb;
          if (std::fabs(e) >= t + M) { hi = b; break; }
        }
        if (lo < 0) continue;  // every running sum stays below t: every input is dropped
        // the inputs of bins lo..hi (a few percent), grouped by bin (counting sort; input order inside a bin)
        const int32_t blo = 2 * lo, span = 2 * (hi - lo) + 1, nbin = hi - lo + 1;
        const int32_t nc = compact(bin, K, blo, span, ord);
        int32_t* cs = S.cstart;
        std::fill(cs, cs + nbin + 1, 0);
        for (int32_t r = 0; r < nc; ++r) cs[(bin[ord[r]] >> 1) - lo + 1]++;
        for (int32_t c = 0; c < nbin; ++c) cs[c + 1] += cs[c];
        std::copy(cs, cs + nbin, S.cfill);
        S.cand.resize(nc);
        Cand* cand = S.cand.data();
        for (int32_t r = 0; r < nc; ++r) {
          const int32_t k = ord[r];
          cand[S.cfill[(bin[k] >> 1) - lo]++] = {Aa[k], P[k], k};
        }
        // walk bins lo..hi in ascending |p|, sorting (by |p|, then input index) only a bin the cut may lie in
        double s0 = s_lo;
        int cut_b = NB;        // bin of the cut; NB: no cut
        int32_t cut_at = 0;    // position of the cut in cand
        bool ambiguous = false;
        for (int b = lo; b <= hi && cut_b == NB && !ambiguous; ++b) {
          const double pb = hh[2 * b], nb = hh[2 * b + 1];
          if (std::max(std::fabs(s0 + pb), std::fabs(s0 - nb)) < t - M) { s0 += pb - nb; continue; }
          const int32_t r0 = cs[b - lo], r1 = cs[b - lo + 1];
          std::sort(cand + r0, cand + r1, before);
          double s = s0;
          for (int32_t r = r0; r < r1; ++r) {
            s += cand[r].p;
            const double as = std::fabs(s);
            if (as >= t + M) { cut_b = b; cut_at = r; break; }
            if (as > t - M) { ambiguous = true; break; }
          }
          s0 = s;  // (used only when the bin held no cut: then s is the bin's full sum)
        }
        // a bin end surely past t with no cut found before it cannot happen in exact arithmetic
        ambiguous |= cut_b == NB && hi < NB - 1;
        if (ambiguous) { S.amb.push_back(o); continue; }
        if (cut_b == NB) continue;  // no prefix reached t: every input is dropped
        // kept: every input after the cut in (|p|, index) order: all of the later bins, the cut bin's tail
        const int32_t cb = 2 * cut_b + 1;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) accp[k] += gv * sr[k] * (float)(bin[k] > cb);
        for (int32_t r = cut_at, r1 = cs[cut_b - lo + 1]; r < r1; ++r) accp[cand[r].k] += gv * sr[cand[r].k];
        touched = true;
      }
      if (!touched) continue;
      float* ac = S.acc.data() + n * plane;
      for (int64_t k = 0; k < K; ++k) if (pidx[k] >= 0) ac[pidx[k]] += accp[k];
    }
  };
  std::atomic<int64_t> next{0};
  const int64_t chunk = std::max<int64_t>(1, total / (16 * nt));  // dynamic: positions differ in active channels
  auto worker = [&](int tid) {
    for (int64_t b; (b = next.fetch_add(chunk)) < total;) run(scr[tid], b, std::min(b + chunk, total));
  };
  std::vector<std::thread> pool;
  for (int tid = 1; tid < nt; ++tid) pool.emplace_back(worker, tid);
  if (nt == 1) run(scr[0], 0, total); else worker(0);
  for (auto& th : pool) th.join();
  auto out = torch::zeros({N, Cin, H, W}, dx.options());
  float* O = out.data_ptr<float>();
  std::vector<int64_t> all;
  for (auto& s : scr) {
    if (!s.acc.empty()) for (int64_t k = 0; k < N * plane; ++k) O[k] += s.acc[k];
    all.insert(all.end(), s.amb.begin(), s.amb.end());
  }
  std::sort(all.begin(), all.end());
  return {out, torch::tensor(all, torch::kInt64)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("conv_theta", &conv_theta); }
"""

_MODULE = None
_TRIED = False


def enabled() -> bool:
    return os.environ.get("GRADAUTH_SLICING_KERNEL", "1") != "0"


# Exactness does not depend on the flags: products of two float32 values are exact in float64, every sum carries
# a margin valid in any order, and no multiply-add may be fused (-ffp-contract=off).
_FLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-ffp-contract=off"]


def _avx2() -> bool:
    """The CPU has AVX2 (the kernel's passes run 4 float64 / 8 int32 lanes wide and pack candidates with it)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


def available() -> bool:
    """Compile (once per process) and report whether the kernel can be used. On an AVX2 CPU it is built for AVX2
    (under its own name, so a cache shared with other CPUs keeps both builds), else for the baseline ISA."""
    global _MODULE, _TRIED
    if not enabled():
        return False
    if not _TRIED:
        _TRIED = True
        from torch.utils.cpp_extension import load_inline
        builds = ([("gradauth_slicing_theta_avx2", ["-mavx2"])] if _avx2() else []) + [("gradauth_slicing_theta", [])]
        for name, extra in builds:
            try:
                _MODULE = load_inline(name, cpp_sources=[_SOURCE], extra_cflags=_FLAGS + extra, with_cuda=False,
                                      verbose=False)
                break
            except Exception:  # no compiler, no headers, a failed build: the torch path is exact too, only slower
                _MODULE = None
    return _MODULE is not None


def conv_theta(m, g: torch.Tensor, dx: torch.Tensor, y: torch.Tensor, theta: float):
    """(acc, ambiguous flat neuron indices): acc as vectorized._conv_theta computes it, minus those neurons."""
    return _MODULE.conv_theta(dx.float().contiguous(), m.weight.detach().float().contiguous(), y.float().contiguous(),
                              g.float().contiguous(), *m.stride, *m.padding, *m.dilation, m.groups, float(theta))
