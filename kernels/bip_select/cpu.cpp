// Fused BIP selection on CPU: the T dual rounds of the expert prices and the routing top-K in
// one call, with no sort and no per-op dispatch. Semantics: kernels/bip_select/reference.py.
//
// Shape legend: N tokens, E experts, K experts per token, cap the per-expert capacity.
// One round is two passes. Rows (tokens, parallel): p_i = max(0, (K+1)-th largest of s_i - q)
// from a small insertion buffer, and s_ij - p_i written to column j of a scratch [E, N] (the
// transpose comes with the rows in cache, 16 rows at a time). Columns (experts, parallel):
// q_j = max(0, (cap+1)-th largest) by a sampled threshold and std::nth_element on what passes it. Every value is an fp32
// element of s - q or s - p, computed as the reference computes it, so q is bit-exact.
// The routing top-K reproduces torch.topk's CPU order (ATen/native/TopKImpl.h): a buffer of the
// K+1 best gives it directly when those values are distinct; a row with a tie or a NaN runs
// torch's own nth_element / partial_sort calls, so exact ties come out in torch's order too.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

namespace {

constexpr int64_t SMALL = 16;  // selections of up to this rank use an insertion buffer

// max(0, v) as torch.clamp_min(v, 0) computes it: -0 and NaN pass through.
inline float max0(float v) { return v < 0.f ? 0.f : v; }

// The k-th largest (1-based, with multiplicity) of d[0, e); scratch holds e floats.
inline float kth_largest(const float* d, int64_t e, int64_t k, float* scratch) {
  if (k <= SMALL) {
    float top[SMALL];
    int64_t filled = 0;
    for (int64_t j = 0; j < e; ++j) {
      const float v = d[j];
      int64_t t;
      if (filled < k) {
        t = filled++;
      } else if (v > top[k - 1]) {
        t = k - 1;
      } else {
        continue;
      }
      for (; t > 0 && top[t - 1] < v; --t) top[t] = top[t - 1];
      top[t] = v;
    }
    return top[k - 1];
  }
  std::copy(d, d + e, scratch);
  std::nth_element(scratch, scratch + k - 1, scratch + e, std::greater<float>());
  return scratch[k - 1];
}

// The (r+1)-th largest of c[0, n) (c is scratch, reordered); buf holds n floats. The rank is a
// small share of n (cap ~ K N / E), so a strided sample gives a threshold just below it, one
// branchless pass keeps the values at or above it, and nth_element runs on those few; exact
// whenever at least r+1 values are kept (all values >= the threshold are), else a full nth_element.
inline float select_desc(float* c, int64_t n, int64_t r, float* buf) {
  constexpr int64_t SAMPLES = 256;
  const double expect = double(r + 1) * SAMPLES / double(n);  // sampled values above the answer
  if (n >= 4 * SAMPLES && expect < SAMPLES / 2) {
    float smp[SAMPLES];
    const int64_t stride = n / SAMPLES;
    for (int64_t t = 0; t < SAMPLES; ++t) smp[t] = c[t * stride];
    const int64_t rank = std::min<int64_t>(SAMPLES - 1, int64_t(expect + 3.0 * std::sqrt(expect) + 4.0));
    std::nth_element(smp, smp + rank, smp + SAMPLES, std::greater<float>());
    const float th = smp[rank];
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      buf[m] = c[i];
      m += c[i] >= th;
    }
    if (m > r) {
      std::nth_element(buf, buf + r, buf + m, std::greater<float>());
      return buf[r];
    }
  }
  std::nth_element(c, c + r, c + n, std::greater<float>());
  return c[r];
}

using Elem = std::pair<float, int64_t>;

// torch.topk(largest=True, sorted=True) on one row, call for call as TopKImpl.h makes it.
void topk_as_torch(const float* d, int64_t e, int64_t kk, std::vector<Elem>& queue, int64_t* idx, float* val) {
  for (int64_t j = 0; j < e; ++j) queue[j] = {d[j], j};
  auto before = [](const Elem& x, const Elem& y) -> bool {
    return (std::isnan(x.first) && !std::isnan(y.first)) || (x.first > y.first);
  };
  if (kk * 64 <= e) {
    std::partial_sort(queue.begin(), queue.begin() + kk, queue.end(), before);
  } else {
    std::nth_element(queue.begin(), queue.begin() + kk - 1, queue.end(), before);
    std::sort(queue.begin(), queue.begin() + kk - 1, before);
  }
  for (int64_t t = 0; t < kk; ++t) {
    idx[t] = queue[t].second;
    val[t] = queue[t].first;
  }
}

// Top-kk of d[0, e) (descending) into idx/val [kk]; queue is torch's fallback scratch.
inline void topk_row(const float* d, int64_t e, int64_t kk, std::vector<Elem>& queue, int64_t* idx, float* val) {
  const int64_t keep = std::min(kk + 1, e);  // the (kk+1)-th decides whether the set is tied
  if (kk <= SMALL) {
    float tv[SMALL + 1];
    int64_t ti[SMALL + 1];
    int64_t filled = 0;
    bool nan = false;
    for (int64_t j = 0; j < e; ++j) {
      const float v = d[j];
      nan |= std::isnan(v);
      int64_t t;
      if (filled < keep) {
        t = filled++;
      } else if (v > tv[keep - 1]) {
        t = keep - 1;
      } else {
        continue;
      }
      for (; t > 0 && tv[t - 1] < v; --t) {
        tv[t] = tv[t - 1];
        ti[t] = ti[t - 1];
      }
      tv[t] = v;
      ti[t] = j;
    }
    bool distinct = !nan;
    for (int64_t t = 0; distinct && t + 1 < keep; ++t) distinct = tv[t] != tv[t + 1];
    if (distinct) {  // one order only: torch's
      for (int64_t t = 0; t < kk; ++t) {
        idx[t] = ti[t];
        val[t] = tv[t];
      }
      return;
    }
  }
  topk_as_torch(d, e, kk, queue, idx, val);
}

constexpr int64_t ROW_GRAIN = 256;
constexpr int64_t BLOCK = 16;  // rows per transposed block: one 64-byte line per column

// route: 0 = prices only; 1 = `pre` (rounds, then top-K of s - q); 2 = causal (top-(K+1) of
// s - q0 routes with its first K and gives round 1's p, then the rounds).
// s [N, E] fp32, q0 [E] fp32, p0 [N] fp32 or undefined (round 1's p) -> (q [E], idx [N, K] or [N, 0]).
std::tuple<at::Tensor, at::Tensor> bip_select(const at::Tensor& s_in, const at::Tensor& q0, int64_t k, int64_t cap,
                                              int64_t iters, int64_t route, const c10::optional<at::Tensor>& p0) {
  TORCH_CHECK(s_in.dim() == 2 && s_in.scalar_type() == at::kFloat, "bip_select: scores must be fp32 [N, E]");
  TORCH_CHECK(route >= 0 && route <= 2, "bip_select: route must be 0, 1 or 2");
  const at::Tensor s_t = s_in.contiguous();
  const int64_t n = s_t.size(0), e = s_t.size(1);
  TORCH_CHECK(0 < k && k < e, "bip_select: needs 0 < k < E");
  TORCH_CHECK(q0.numel() == e && q0.scalar_type() == at::kFloat, "bip_select: q0 must be fp32 [E]");
  at::Tensor q = q0.contiguous().clone();
  at::Tensor idx = at::empty({n, route ? k : 0}, s_t.options().dtype(at::kLong));
  at::Tensor p = at::empty({n}, s_t.options());
  const float* s = s_t.data_ptr<float>();
  float* qd = q.data_ptr<float>();
  float* pd = p.data_ptr<float>();
  int64_t* id = idx.data_ptr<int64_t>();
  bool have_p = false;

  auto route_rows = [&](int64_t kk, bool keep_p) {
    at::parallel_for(0, n, ROW_GRAIN, [&](int64_t b, int64_t end) {
      std::vector<float> d(e), val(kk);
      std::vector<int64_t> ix(kk);
      std::vector<Elem> queue(e);
      for (int64_t i = b; i < end; ++i) {
        const float* row = s + i * e;
        for (int64_t j = 0; j < e; ++j) d[j] = row[j] - qd[j];
        topk_row(d.data(), e, kk, queue, ix.data(), val.data());
        std::copy(ix.begin(), ix.begin() + k, id + i * k);
        if (keep_p) pd[i] = max0(val[k]);
      }
    });
  };

  if (route == 2) {
    route_rows(k + 1, true);
    have_p = true;
  } else if (p0.has_value() && p0->defined()) {
    TORCH_CHECK(p0->numel() == n && p0->scalar_type() == at::kFloat, "bip_select: p0 must be fp32 [N]");
    p.copy_(*p0);
    have_p = true;
  }
  if (iters > 0 && cap >= n) {  // the expert constraints cannot bind: every price is 0
    q.zero_();
  } else if (iters > 0) {
    TORCH_CHECK(cap >= 0, "bip_select: cap must be >= 0");
    at::Tensor col_t = at::empty({e, n}, s_t.options());  // [E, N]: s_ij - p_i by expert
    float* col = col_t.data_ptr<float>();
    for (int64_t r = 0; r < iters; ++r) {
      const bool given = have_p;
      at::parallel_for(0, n, ROW_GRAIN, [&](int64_t b, int64_t end) {
        std::vector<float> d(e), scratch(e);
        float pb[BLOCK];
        for (int64_t i0 = b; i0 < end; i0 += BLOCK) {
          const int64_t rows = std::min(BLOCK, end - i0);
          for (int64_t t = 0; t < rows; ++t) {
            const float* row = s + (i0 + t) * e;
            if (given) {
              pb[t] = pd[i0 + t];
            } else {
              for (int64_t j = 0; j < e; ++j) d[j] = row[j] - qd[j];
              pb[t] = max0(kth_largest(d.data(), e, k + 1, scratch.data()));
            }
          }
          // a block of rows at a time, so each column gets whole cache lines
          for (int64_t j = 0; j < e; ++j) {
            float* c = col + j * n + i0;
            for (int64_t t = 0; t < rows; ++t) c[t] = s[(i0 + t) * e + j] - pb[t];
          }
        }
      });
      have_p = false;
      at::parallel_for(0, e, 1, [&](int64_t b, int64_t end) {
        std::vector<float> buf(n);
        for (int64_t j = b; j < end; ++j) qd[j] = max0(select_desc(col + j * n, n, cap, buf.data()));
      });
    }
  }
  if (route == 1) route_rows(k, false);
  return {q, idx};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bip_select", &bip_select, "BIP prices (T rounds) and routing top-K, fused (CPU)");
}
