// Fused dequantize-attend decode over a packed KV cache (kernels.kv_quant layout), CPU.
//
// One job per (batch row, query t, kv head): the slots are walked in blocks of BLK; each visible
// packed row is unpacked and dequantized into a Dh-float scratch row (never the whole cache), its
// scores for the G query heads of the kv head computed, then an online softmax (running max and sum)
// folds the block's values into G accumulators. The full-precision window is the same walk without
// the dequantize. Semantics: kernels/decode_attention/reference.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Codes of one (token, head) row -> fp32 codes [Dh] (unscaled).
template <int BITS>
inline void unpack_row(const int32_t* w, int dh, float* out) {
  constexpr int PER = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  const int full = dh / PER;
  for (int i = 0; i < full; ++i) {
    const uint32_t word = static_cast<uint32_t>(w[i]);
#pragma GCC unroll 16
    for (int j = 0; j < PER; ++j) out[i * PER + j] = static_cast<float>((word >> (BITS * j)) & MASK);
  }
  for (int d = full * PER; d < dh; ++d) {
    const uint32_t word = static_cast<uint32_t>(w[d / PER]);
    out[d] = static_cast<float>((word >> (BITS * (d % PER))) & MASK);
  }
}

using Unpack = void (*)(const int32_t*, int, float*);

Unpack unpacker(int64_t bits) {
  switch (bits) {
    case 2: return unpack_row<2>;
    case 4: return unpack_row<4>;
    case 8: return unpack_row<8>;
  }
  TORCH_CHECK(false, "packed_decode: bits must be 2, 4 or 8, got ", bits);
}

// codes [Dh] -> x_hat [Dh] in place: code * scale + min of the element's group (rc channels per group).
inline void affine_row(float* x, const float* sc, const float* zr, int dh, int rc) {
  if (rc == 1) {
    for (int d = 0; d < dh; ++d) x[d] = x[d] * sc[d] + zr[d];
    return;
  }
  for (int g0 = 0, gi = 0; g0 < dh; g0 += rc, ++gi) {
    const float s = sc[gi], z = zr[gi];
    const int g1 = std::min(dh, g0 + rc);
    for (int d = g0; d < g1; ++d) x[d] = x[d] * s + z;
  }
}

struct Side {  // one of K or V: packed part + window
  const int32_t* codes; const float* scale; const float* zero;
  int64_t words, rt, rc, groups;  // words per row, tokens/channels per group, groups per row
  Unpack unpack;
  const float* win;
};

}  // namespace

// q [B,T,H,Dh] f32; k/v codes [B,Sq,Hkv,W] i32; scale/zero [B,Sq/rt,Hkv,Gc] f32; ppos [B,Sq] i64;
// k/v window [B,Wn,Hkv,Dh] f32; wpos [B,Wn] i64; qpos [B,T] i64 -> [B,T,H,Dh] f32.
torch::Tensor packed_decode(
    torch::Tensor q, torch::Tensor kc, torch::Tensor ks, torch::Tensor kz, int64_t kbits, int64_t krt, int64_t krc,
    torch::Tensor vc, torch::Tensor vs, torch::Tensor vz, int64_t vbits, int64_t vrt, int64_t vrc,
    torch::Tensor ppos, torch::Tensor kw, torch::Tensor vw, torch::Tensor wpos, torch::Tensor qpos, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  const int64_t Sq = kc.size(1), Hkv = kc.size(2), Wn = kw.size(1), G = H / Hkv;
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* pp = ppos.data_ptr<int64_t>();
  const int64_t* wp = wpos.data_ptr<int64_t>();
  const int64_t* qq = qpos.data_ptr<int64_t>();
  Side K{kc.data_ptr<int32_t>(), ks.data_ptr<float>(), kz.data_ptr<float>(), kc.size(3), krt, krc, ks.size(3),
         unpacker(kbits), kw.data_ptr<float>()};
  Side V{vc.data_ptr<int32_t>(), vs.data_ptr<float>(), vz.data_ptr<float>(), vc.size(3), vrt, vrc, vs.size(3),
         unpacker(vbits), vw.data_ptr<float>()};
  const float sc = static_cast<float>(scale);
  constexpr int64_t BLK = 32;
  at::parallel_for(0, B * T * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> kbuf(Dh), vbuf(Dh), acc(G * Dh), s(G * BLK), m(G), l(G);
    std::vector<int64_t> vis(BLK);
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t b = job / (T * Hkv), t = (job / Hkv) % T, n = job % Hkv;
      const int64_t qpos_t = qq[b * T + t];
      const float* qg = qp + ((b * T + t) * H + n * G) * Dh;  // [G, Dh]
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t total = Sq + Wn;
      for (int64_t s0 = 0; s0 < total; s0 += BLK) {
        const int64_t s1 = std::min(total, s0 + BLK);
        int64_t nv = 0;
        for (int64_t si = s0; si < s1; ++si) {
          const int64_t pos = si < Sq ? pp[b * Sq + si] : wp[b * Wn + (si - Sq)];
          if (pos >= 0 && pos <= qpos_t) vis[nv++] = si;
        }
        if (nv == 0) continue;
        // scores of the visible slots [G, nv]
        for (int64_t j = 0; j < nv; ++j) {
          const int64_t si = vis[j];
          const float* krow;
          if (si < Sq) {
            K.unpack(K.codes + ((b * Sq + si) * Hkv + n) * K.words, Dh, kbuf.data());
            const int64_t go = ((b * (Sq / K.rt) + si / K.rt) * Hkv + n) * K.groups;
            affine_row(kbuf.data(), K.scale + go, K.zero + go, Dh, K.rc);
            krow = kbuf.data();
          } else {
            krow = K.win + ((b * Wn + (si - Sq)) * Hkv + n) * Dh;
          }
          for (int64_t g = 0; g < G; ++g) {
            const float* qv = qg + g * Dh;
            float dot = 0.f;
            for (int64_t d = 0; d < Dh; ++d) dot += qv[d] * krow[d];
            s[g * BLK + j] = dot * sc;
          }
        }
        // online softmax update
        for (int64_t g = 0; g < G; ++g) {
          float bm = m[g];
          for (int64_t j = 0; j < nv; ++j) bm = std::max(bm, s[g * BLK + j]);
          const float alpha = std::exp(m[g] - bm);  // m = -inf the first time: alpha 0, acc is 0
          float* a = acc.data() + g * Dh;
          if (alpha != 1.f) {
            for (int64_t d = 0; d < Dh; ++d) a[d] *= alpha;
          }
          l[g] *= alpha;
          for (int64_t j = 0; j < nv; ++j) {
            const float p = std::exp(s[g * BLK + j] - bm);
            s[g * BLK + j] = p;
            l[g] += p;
          }
          m[g] = bm;
        }
        for (int64_t j = 0; j < nv; ++j) {
          const int64_t si = vis[j];
          const float* vrow;
          if (si < Sq) {
            V.unpack(V.codes + ((b * Sq + si) * Hkv + n) * V.words, Dh, vbuf.data());
            const int64_t go = ((b * (Sq / V.rt) + si / V.rt) * Hkv + n) * V.groups;
            affine_row(vbuf.data(), V.scale + go, V.zero + go, Dh, V.rc);
            vrow = vbuf.data();
          } else {
            vrow = V.win + ((b * Wn + (si - Sq)) * Hkv + n) * Dh;
          }
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * BLK + j];
            float* a = acc.data() + g * Dh;
            for (int64_t d = 0; d < Dh; ++d) a[d] += p * vrow[d];
          }
        }
      }
      float* o = op + ((b * T + t) * H + n * G) * Dh;
      for (int64_t g = 0; g < G; ++g) {
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < Dh; ++d) o[g * Dh + d] = acc[g * Dh + d] * inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("packed_decode", &packed_decode, "fused dequantize-attend decode"); }
