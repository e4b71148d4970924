"""An optional compiled θ filter for convolutions: the whole per-neuron work (products, the cut, the kept signs)
in C++, compiled on first use with torch.utils.cpp_extension.

Same rule as theta.py, same exactness argument. Per output position the input window is gathered once and shared
by every active output channel there. Per neuron, one contiguous pass computes |p| = |w·Δx| rounded to float32
(8 AVX2 lanes) with a monotone bin key (exponent and top 5 mantissa bits: 32 bins per octave, over 12 octaves); a
histogram of the mass per bin and sign bounds the running sum inside every bin whatever the order, so a walk over
the bins brackets the cut between two bins; only the inputs of those bins (a few percent of the window, packed
with AVX2) get exact float64 products and are sorted by (|p|, input index), bin by bin, where the running sum may
cross θ·|y|. Rounding is monotone, so the bins keep the exact order; every comparison carries a rigorous margin for
the float32 rounding and the float64 sums. A neuron the margin cannot decide is re-run with exact float64 products
throughout, and one that even that cannot decide is reported back: the caller decides it with exact integer
arithmetic (theta.exact_keep). The kernel runs its own threads (torch's intra-op count): at::parallel_for would
compile to a serial loop in an extension built without OpenMP.

Measured on the ResNet-10 θ = 0.3 bench sample (2-core AMD EPYC, 2 threads): the previous per-neuron kernel
(float64 products into a 32-byte record per input, a counting sort of every input, one thread) took 2.9 s per
sample (2.87 s in the kernel) at the start of the work; this one 0.24-0.28 s, measured later the same day (the
machine's speed drifts; the old kernel's bench figure on a quieter day was 1.6 s). Same-process A/B of the bin
width, kernel alone, one thread: 16 bins per octave 0.40 s, 32 per octave 0.34 s, 64 per octave 0.48 s, 8 per
octave 0.59 s. Clearing and walking only the bins the neuron's inputs occupy, with 4-bin sub-blocks summed in
independent add chains: 0.350 -> 0.323 s and 0.427 -> 0.392 s in two same-process A/Bs (-8 %), same results.

`available()` compiles it once per process (about 30 s the first time; torch caches the build in its extensions
directory). No compiler, a failed build, or GRADAUTH_SLICING_KERNEL=0: it returns False and the torch path runs.
"""
from __future__ import annotations

import os
import platform

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {
constexpr int SUB = 5;     // 2^SUB bins per octave of |p|
constexpr int NB = 384;    // bins below the bound on |p| (12 octaves); everything smaller shares bin 0
constexpr int BLK = 32;    // bins per block of the walk towards the cut
constexpr int SBLK = 4;    // bins per sub-block
constexpr double EPS = 0x1p-52;

// Monotone bin keys of a >= 0: the exponent and top SUB mantissa bits.
inline int32_t key_of(float a) { int32_t b; std::memcpy(&b, &a, 4); return b >> (23 - SUB); }
inline int32_t key_of(double a) { int64_t b; std::memcpy(&b, &a, 8); return (int32_t)(b >> (52 - SUB)); }

inline float sgn(float w) { return (float)((w > 0.f) - (w < 0.f)); }

struct Cand { double a; double p; int32_t k; };  // exact |p|, p, position in the window

inline bool before(const Cand& u, const Cand& v) { return u.a < v.a || (u.a == v.a && u.k < v.k); }

#ifdef __AVX2__
// LEFT.idx[m]: the lanes set in the 8-bit mask m, packed to the front (AVX2 has no compress instruction)
struct LeftPack {
  alignas(32) int32_t idx[256][8];
  LeftPack() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l) if (m >> l & 1) idx[m][n++] = l;
      while (n < 8) idx[m][n++] = 0;
    }
  }
};
const LeftPack LEFT;
#endif

// ord[0..n) = the k with blo <= bin[k] <= blo + span, ascending; returns n (ord has K + 8 slots)
int32_t compact(const int32_t* __restrict bin, int64_t K, int32_t blo, int32_t span, int32_t* __restrict ord) {
  int32_t n = 0;
  int64_t k = 0;
#ifdef __AVX2__
  const __m256i lo = _mm256_set1_epi32(blo), flip = _mm256_set1_epi32(INT32_MIN);
  const __m256i top = _mm256_xor_si256(_mm256_set1_epi32(span), flip), eight = _mm256_set1_epi32(8);
  __m256i ks = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; k + 8 <= K; k += 8, ks = _mm256_add_epi32(ks, eight)) {
    // unsigned bin - blo <= span, as a signed compare with both sides' sign bits flipped
    const __m256i d = _mm256_xor_si256(_mm256_sub_epi32(_mm256_loadu_si256((const __m256i*)(bin + k)), lo), flip);
    const int m = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(d, top))) & 0xff;
    _mm256_storeu_si256((__m256i*)(ord + n),
                        _mm256_permutevar8x32_epi32(ks, _mm256_load_si256((const __m256i*)LEFT.idx[m])));
    n += __builtin_popcount(m);
  }
#endif
  for (; k < K; ++k) { ord[n] = (int32_t)k; n += (uint32_t)(bin[k] - blo) <= (uint32_t)span; }
  return n;
}

// Scratch of one thread, reused by every neuron it handles.
struct Scratch {
  std::vector<float> acc, xp, accp, a32, sx;
  std::vector<double> a64, ws, wc;  // synapse mode: per weight, Σ g·sign(w)·sign(Δx)·keep and its |·|
  std::vector<int64_t> pidx, amb;
  std::vector<int32_t> bin, ord;
  std::vector<Cand> cand;
  double h[2 * NB], h1[2 * NB];  // mass of |p| per bin and sign ([2b]: p > 0, [2b + 1]: p < 0), two halves
  int32_t cs[NB + 2], cfill[NB + 1];
  void init(int64_t K, int64_t acc_size, int64_t weights = 0) {
    acc.assign((size_t)acc_size, 0.f);
    ws.assign((size_t)weights, 0.0); wc.assign((size_t)weights, 0.0); sx.resize(K);
    xp.resize(K); accp.resize(K); a32.resize(K); a64.resize(K); pidx.resize(K); bin.resize(K); ord.resize(K + 8);
  }
};

enum Outcome { DROPPED, CUT, AMBIGUOUS };

// Synapse mode's sink for one neuron: its weight row's two sums and sign(Δx) of the window (0 outside the map).
struct Syn { double* ws; double* wc; const float* sx; };

// One kept input k of a neuron with weights wr, in synapse mode: sign(CONTRIB·Δy)·sign(w)·sign(Δx) into the weight.
inline void syn_add(const Syn& o, const float* wr, float gv, int64_t k, float keep) {
  const float v = gv * sgn(wr[k]) * o.sx[k] * keep;
  o.ws[k] += (double)v;
  o.wc[k] += (double)std::fabs(v);
}

// The θ filter of one neuron with weights wr over the window xp (K inputs), t = θ·|y| > 0: on CUT, adds
// gv·sign(w) of every kept input to accp (SYN: gv·sign(w)·sign(Δx) of every kept input to its weight's sums). T is the precision of the pass that bins |p|: float (8 lanes; the
// products are rounded, which the margin covers) or double (products exact). Either way the cut itself is found
// among candidates compared by their exact float64 products; a comparison that the margin cannot decide makes
// the neuron AMBIGUOUS.
template <class T, bool SYN = false>
Outcome neuron(Scratch& S, const float* wr, const float* xp, float gv, double t, T bound,
               int64_t K, float* accp, Syn so = {nullptr, nullptr, nullptr}) {
  T* a = nullptr;
  if constexpr (std::is_same<T, float>::value) a = S.a32.data(); else a = S.a64.data();
  int32_t* bin = S.bin.data();
  // One pass: |p| (a), Σ|p| and bin[k] = 2·(bin of a) + (p < 0), bins counted down from the bound on every |p|.
  // Rounding is monotone, so a smaller exact |p| never lands in a higher bin: bins keep the exact order.
  const int32_t kbase = key_of(bound) - (NB - 1);
  T As = 0;
  int32_t bmin = 2 * NB, bmax = 0;
#pragma omp simd reduction(+:As) reduction(min:bmin) reduction(max:bmax)
  for (int64_t k = 0; k < K; ++k) {
    const T pk = (T)wr[k] * (T)xp[k];
    const T ak = std::fabs(pk);
    a[k] = ak; As += ak;
    const int32_t b = key_of(ak) - kbase;
    const int32_t bk = 2 * (b < 0 ? 0 : b) + (pk < 0);
    bin[k] = bk;
    bmin = std::min(bmin, bk);
    bmax = std::max(bmax, bk);
  }
  // Σ|p| from above and the margin of every comparison with t: float64 sums of at most 2K + 64 terms in any order
  // ((2K + 64)·EPS·A); for float, also its sum of K terms and each rounded (or underflowed) product; and the
  // rounded t.
  double A = (double)As, M = (double)(2 * K + 64) * EPS * A + EPS * t;
  if constexpr (std::is_same<T, float>::value) {
    A = A * (1.0 + (double)(K + 2) * 0x1p-23) + (double)K * 0x1p-148;
    M = (double)(2 * K + 64) * EPS * A + 0x1p-23 * A + (double)K * 0x1p-148 + EPS * t;
  }
  if (A < t - M) return DROPPED;  // every running sum stays below t
  bmin >>= 1; bmax >>= 1;  // bins bmin..bmax hold every input; only they are cleared and read
  const int bend = bmax + 1;
  double *hh = S.h, *h1 = S.h1;
  std::memset(hh + 2 * bmin, 0, sizeof(double) * 2 * (bend - bmin));
  std::memset(h1 + 2 * bmin, 0, sizeof(double) * 2 * (bend - bmin));
  int64_t k2 = 0;  // alternate inputs into two histograms: consecutive adds to one bin need not wait on each other
  for (; k2 + 1 < K; k2 += 2) { hh[bin[k2]] += a[k2]; h1[bin[k2 + 1]] += a[k2 + 1]; }
  if (k2 < K) hh[bin[k2]] += a[k2];
#pragma omp simd
  for (int b = 2 * bmin; b < 2 * bend; ++b) hh[b] += h1[b];
  // The cut lies between the first bin whose running sums may reach t (lo) and the first bin by whose end the
  // running sum surely has (hi). Inside bins b..c the running sum stays within [e - neg, e + pos] (their masses),
  // whatever the order, so a whole block of BLK (or SBLK) bins is passed with one test while no sum can reach t.
  double e = 0, s0 = 0;
  int lo = -1, hi = bmax;
  bool reached = false;  // some bin end surely past t
  int bw = bmin;
  while (bw < bend) {
    bool skipped = false;
    for (const int len : {BLK, SBLK}) {
      if (bw % len != 0 || bw + len > bend) continue;
      double q[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums (pos, neg of 4 bins): independent add chains
      for (int c = 2 * bw; c < 2 * (bw + len); c += 8)
        for (int l = 0; l < 8; ++l) q[l] += hh[c + l];
      const double pB = (q[0] + q[2]) + (q[4] + q[6]), nB = (q[1] + q[3]) + (q[5] + q[7]);
      if (std::max(std::fabs(e + pB), std::fabs(e - nB)) < t - M) { e += pB - nB; bw += len; skipped = true; break; }
    }
    if (skipped) continue;
    const double pb = hh[2 * bw], nb = hh[2 * bw + 1];
    if (std::max(std::fabs(e + pb), std::fabs(e - nb)) < t - M) { e += pb - nb; ++bw; continue; }
    lo = bw; s0 = e;
    break;
  }
  for (; lo >= 0 && bw < bend; ++bw) {
    e += hh[2 * bw] - hh[2 * bw + 1];
    if (std::fabs(e) >= t + M) { hi = bw; reached = true; break; }
  }
  if (lo < 0) return DROPPED;  // every running sum stays below t
  // The inputs of bins lo..hi (a few percent of the window), grouped by bin (counting sort; input order inside a
  // bin), with their exact products.
  const int nbin = hi - lo + 1;
  const int32_t nc = compact(bin, K, 2 * lo, 2 * nbin - 1, S.ord.data());
  const int32_t* ord = S.ord.data();
  int32_t* cs = S.cs;
  std::fill(cs, cs + nbin + 1, 0);
  for (int32_t r = 0; r < nc; ++r) cs[(bin[ord[r]] >> 1) - lo + 1]++;
  for (int c = 0; c < nbin; ++c) cs[c + 1] += cs[c];
  std::copy(cs, cs + nbin, S.cfill);
  S.cand.resize(nc);
  Cand* cand = S.cand.data();
  for (int32_t r = 0; r < nc; ++r) {
    const int32_t k = ord[r];
    const double pk = (double)wr[k] * (double)xp[k];  // exact
    cand[S.cfill[(bin[k] >> 1) - lo]++] = {std::fabs(pk), pk, k};
  }
  // Walk bins lo..hi in ascending |p|, sorting (by |p|, then input index) only a bin the cut may lie in.
  for (int b = lo; b <= hi; ++b) {
    const double pb = hh[2 * b], nb = hh[2 * b + 1];
    if (std::max(std::fabs(s0 + pb), std::fabs(s0 - nb)) < t - M) { s0 += pb - nb; continue; }
    const int32_t r0 = cs[b - lo], r1 = cs[b - lo + 1];
    std::sort(cand + r0, cand + r1, before);
    double s = s0;
    for (int32_t r = r0; r < r1; ++r) {
      s += cand[r].p;
      const double as = std::fabs(s);
      if (as > t - M && as < t + M) return AMBIGUOUS;
      if (as >= t + M) {
        // kept: every input after the cut in (|p|, index) order: all later bins, and this bin's tail
        const int32_t cb = 2 * b + 1;
        if constexpr (SYN) {
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) syn_add(so, wr, gv, k, (float)(bin[k] > cb));
          for (; r < r1; ++r) syn_add(so, wr, gv, cand[r].k, 1.f);
          return CUT;
        }
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) accp[k] += gv * sgn(wr[k]) * (float)(bin[k] > cb);
        for (; r < r1; ++r) accp[cand[r].k] += gv * sgn(wr[cand[r].k]);
        return CUT;
      }
    }
    s0 = s;  // the bin held no cut: s is its full sum
  }
  // a bin end surely past t with no cut before it cannot happen in exact arithmetic
  return reached ? AMBIGUOUS : DROPPED;
}
}  // namespace

// For every active output neuron o (g[o] != 0) of a conv at θ > 0: acc[n, ci, h, w] += g·sign(w)·keep.
// Returns {acc, flat indices of the neurons whose cut even float64 margins could not decide (left out of acc)}.
//
// Per output position the input window is gathered once and shared by every active output channel there; per
// neuron see `neuron` (a float32 pass first, unless float_pass is false; the rare neuron it cannot decide, again
// with exact float64 products);
// the window's contributions are scattered into the input map once per position.
//
// SYN (conv_theta_synapses): instead of acc, per weight w[co, k] the sums Σ g·sign(w)·sign(Δx)·keep (signed) and
// Σ |g·sign(w)·sign(Δx)|·keep (count) over the neurons that use it: {signed, count (Cout × K, float64), ambiguous}.
template <bool SYN>
std::vector<torch::Tensor> conv_theta_impl(torch::Tensor dx, torch::Tensor wt, torch::Tensor y, torch::Tensor g,
                                      int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                                      int64_t groups, double theta, bool float_pass) {
  dx = dx.contiguous(); wt = wt.contiguous(); y = y.contiguous(); g = g.contiguous();
  const int64_t N = dx.size(0), Cin = dx.size(1), H = dx.size(2), W = dx.size(3);
  const int64_t Cout = wt.size(0), Cg = wt.size(1), KH = wt.size(2), KW = wt.size(3);
  const int64_t Ho = g.size(2), Wo = g.size(3), per_out = Cout / groups, K = Cg * KH * KW;
  const float* X = dx.data_ptr<float>(); const float* Wp = wt.data_ptr<float>();
  const float* Y = y.data_ptr<float>(); const float* G = g.data_ptr<float>();
  const int64_t plane = Cin * H * W, HWo = Ho * Wo, total = N * groups * HWo;
  std::vector<float> wmax(Cout, 0.f);  // the largest |w| of each output channel
  for (int64_t co = 0; co < Cout; ++co) {
    float m = 0.f;
#pragma omp simd reduction(max:m)
    for (int64_t k = 0; k < K; ++k) m = std::max(m, std::fabs(Wp[co * K + k]));
    wmax[co] = m;
  }
  auto run = [&](Scratch& S, int64_t begin, int64_t end) {
    float* xp = S.xp.data(); float* accp = S.accp.data(); int64_t* pidx = S.pidx.data();
    for (int64_t q = begin; q < end; ++q) {
      const int64_t at = q % HWo, j = at % Wo, i = at / Wo, gr = (q / HWo) % groups, n = q / (HWo * groups);
      const int64_t co0 = gr * per_out, ci0 = gr * Cg;
      const float* Gn = G + n * Cout * HWo + at;
      bool any = false;
      for (int64_t co = co0; co < co0 + per_out && !any; ++co) any = Gn[co * HWo] != 0.f;
      if (!any) continue;
      // the window: Δx and the input's flat index, 0 / -1 outside the map (padding is no input)
      const float* xs = X + n * plane;
      float xmax = 0.f;
      for (int64_t c = 0, k = 0; c < Cg; ++c)
        for (int64_t a = 0; a < KH; ++a) {
          const int64_t r = i * sh - ph + a * dh;
          for (int64_t b = 0; b < KW; ++b, ++k) {
            const int64_t s = j * sw - pw + b * dw;
            if (r < 0 || r >= H || s < 0 || s >= W) { xp[k] = 0.f; pidx[k] = -1; continue; }
            pidx[k] = ((ci0 + c) * H + r) * W + s;
            xp[k] = xs[pidx[k]];
            xmax = std::max(xmax, std::fabs(xp[k]));
          }
        }
      std::fill(accp, accp + K, 0.f);
      if constexpr (SYN)
        for (int64_t k = 0; k < K; ++k) S.sx[k] = sgn(xp[k]);
      bool touched = false;
      for (int64_t co = co0; co < co0 + per_out; ++co) {
        const float gv = Gn[co * HWo];
        if (gv == 0.f) continue;
        const int64_t o = (n * Cout + co) * HWo + at;
        const float* wr = Wp + co * K;
        const Syn so = SYN ? Syn{S.ws.data() + co * K, S.wc.data() + co * K, S.sx.data()}
                           : Syn{nullptr, nullptr, nullptr};
        const double t = theta * std::fabs((double)Y[o]);
        if (t == 0) {  // y = 0: nothing is below 0, every input is kept
          if constexpr (SYN) {
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) syn_add(so, wr, gv, k, 1.f);
          } else {
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) accp[k] += gv * sgn(wr[k]);
          }
          touched = true;
          continue;
        }
        // bounds on every |p|: rounding is monotone, so fl(|w|·|x|) <= fl(max|w|·max|x|); exact in float64
        Outcome out = float_pass ? neuron<float, SYN>(S, wr, xp, gv, t, wmax[co] * xmax, K, accp, so) : AMBIGUOUS;
        if (out == AMBIGUOUS)
          out = neuron<double, SYN>(S, wr, xp, gv, t, (double)wmax[co] * (double)xmax, K, accp, so);
        if (out == AMBIGUOUS) S.amb.push_back(o);
        touched |= out == CUT;
      }
      if (SYN || !touched) continue;
      float* ac = S.acc.data() + n * plane;
      for (int64_t k = 0; k < K; ++k) if (pidx[k] >= 0) ac[pidx[k]] += accp[k];
    }
  };
  // Threads of our own: at::parallel_for's OpenMP pragma compiles to a serial loop in an extension built without
  // -fopenmp, and linking a second OpenMP runtime beside torch's is asking for trouble. Positions are handed out
  // in small chunks (they differ in how many channels are active).
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  std::vector<Scratch> scr(nt);
  std::atomic<int64_t> next{0};
  const int64_t chunk = std::max<int64_t>(1, total / (16 * nt));
  auto worker = [&](int tid) {
    scr[tid].init(K, SYN ? 0 : N * plane, SYN ? Cout * K : 0);
    for (int64_t b; (b = next.fetch_add(chunk)) < total;) run(scr[tid], b, std::min(b + chunk, total));
  };
  std::vector<std::thread> pool;
  for (int tid = 1; tid < nt; ++tid) pool.emplace_back(worker, tid);
  worker(0);
  for (auto& th : pool) th.join();
  std::vector<int64_t> all;
  for (auto& s : scr) all.insert(all.end(), s.amb.begin(), s.amb.end());
  std::sort(all.begin(), all.end());
  if constexpr (SYN) {
    auto sig = torch::zeros({Cout, K}, dx.options().dtype(torch::kFloat64));
    auto cnt = torch::zeros({Cout, K}, dx.options().dtype(torch::kFloat64));
    double* Sg = sig.data_ptr<double>(); double* Ct = cnt.data_ptr<double>();
    for (auto& s : scr)
      for (int64_t k = 0; k < Cout * K; ++k) { Sg[k] += s.ws[k]; Ct[k] += s.wc[k]; }
    return {sig, cnt, torch::tensor(all, torch::kInt64)};
  }
  auto out = torch::zeros({N, Cin, H, W}, dx.options());
  float* O = out.data_ptr<float>();
  for (auto& s : scr)
    for (int64_t k = 0; k < N * plane; ++k) O[k] += s.acc[k];
  return {out, torch::tensor(all, torch::kInt64)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_theta", &conv_theta_impl<false>);
  m.def("conv_theta_synapses", &conv_theta_impl<true>);
}
"""

_MODULE = None
_TRIED = False
# The build's name changes with what the module offers (v2: conv_theta_synapses), so a torch extensions cache shared
# with checkouts of an older source keeps both builds instead of rebuilding over each other.
_NAME = "gradauth_slicing_theta_v2"


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
        builds = ([(f"{_NAME}_avx2", ["-mavx2"])] if _avx2() else []) + [(_NAME, [])]
        for name, extra in builds:
            try:
                _MODULE = load_inline(name, cpp_sources=[_SOURCE], extra_cflags=_FLAGS + extra, with_cuda=False,
                                      verbose=False)
                break
            except Exception:  # no compiler, no headers, a failed build: the torch path is exact too, only slower
                _MODULE = None
    return _MODULE is not None


def conv_theta(m, g: torch.Tensor, dx: torch.Tensor, y: torch.Tensor, theta: float, float_pass: bool = True):
    """(acc, ambiguous flat neuron indices): acc as vectorized._conv_theta computes it, minus those neurons.
    float_pass=False skips the float32 pass (every neuron decided with float64 products: slower, same result)."""
    return _MODULE.conv_theta(*_args(m, g, dx, y, theta, float_pass))


def conv_theta_synapses(m, g: torch.Tensor, dx: torch.Tensor, y: torch.Tensor, theta: float,
                        float_pass: bool = True):
    """(signed, count, ambiguous flat neuron indices): per weight (float64, Cout × the weight's other dims
    flattened) Σ g·sign(w)·sign(Δx)·keep and Σ |·| over the active output neurons, as synapse._conv_theta computes
    them, minus the ambiguous neurons (the caller decides those exactly). Same filter as conv_theta, same cut."""
    return _MODULE.conv_theta_synapses(*_args(m, g, dx, y, theta, float_pass))


def _args(m, g, dx, y, theta, float_pass):
    return (dx.float().contiguous(), m.weight.detach().float().contiguous(), y.float().contiguous(),
            g.float().contiguous(), *m.stride, *m.padding, *m.dilation, m.groups, float(theta), bool(float_pass))
