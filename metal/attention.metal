// Attention with sinks for gpt-oss: decode over the cache buffers in place (sdpa_decode, split over
// long contexts and merged by sdpa_decode_merge), and banded prefill on sliding layers
// (sdpa_banded). Sections are cut by gptoss_mlx/kernels/sources.py: the header goes to `header=` of
// mx.fast.metal_kernel, each kernel section to `source=`. Thread mappings: metal/README.md.
//
// Softmax with a sink: out = sum_j exp(s_j - M) v_j / (sum_j exp(s_j - M) + exp(sink - M)),
// s_j = scale * q.k_j; the sink logit is not scaled and has no value vector.

// ===== header =====
inline float neg_inf() {
  return -metal::numeric_limits<float>::infinity();
}

// Online-softmax state after a tile of scores s[0..n): rescale by exp(m_old - m_new) once per tile.
inline float tile_max(thread const float* s, uint n, float m) {
  for (uint j = 0; j < n; ++j) m = max(m, s[j]);
  return m;
}

// ===== kernel: sdpa_decode =====
// inputs:  q [B, Hq, 1, D], k, v [B, Hkv, S, D] (the whole cache buffer: ring or full),
//          sinks [Hq], offset int32 [1] (the new token's position: slots 0 .. min(offset, S-1) hold
//          keys; a ring holds its last S positions in some slot order, which a softmax ignores),
//          params float32 [1] = (scale)
// outputs: FINAL:  o [B, Hq, 1, D] of type OT (normalised, sink included); ml unused ([1])
//          !FINAL: o [B, Hq, NS, D] float32 unnormalised partial sums, ml [B, Hq, NS, 2] = (max, sum)
// template: OT, D (head dim, multiple of 32), TK (keys per tile), SPLIT (keys per split), FINAL
// grid (32 * G, B * Hkv, NS), threadgroup (32 * G, 1, 1): one threadgroup per (batch row, KV head,
// split); simdgroup g serves query head kvh * G + g; lane owns dims [lane * D/32, (lane+1) * D/32).
// The threadgroup stages each tile of TK keys and values in threadgroup memory once for its G heads.
constexpr uint DPL = D / 32;
const uint lane = thread_index_in_simdgroup;
const uint g = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const uint nthreads = threads_per_threadgroup.x;
const uint Hq = q_shape[1];
const uint Hkv = k_shape[1];
const uint S = k_shape[2];
const uint G = Hq / Hkv;
const uint b = threadgroup_position_in_grid.y / Hkv;
const uint kvh = threadgroup_position_in_grid.y % Hkv;
const uint split = threadgroup_position_in_grid.z;
const uint NS = threadgroups_per_grid.z;
const uint h = kvh * G + g;
const uint n_valid = uint(min(offset[0] + 1, int(S)));
const uint begin = min(split * uint(SPLIT), n_valid);
const uint end = min(begin + uint(SPLIT), n_valid);
const float scale = params[0];

float qv[DPL];
float acc[DPL];
for (uint i = 0; i < DPL; ++i) {
  qv[i] = float(q[(size_t(b) * Hq + h) * D + lane * DPL + i]) * scale;
  acc[i] = 0.0f;
}
float m = neg_inf();
float l = 0.0f;
threadgroup float kt[TK * D];
threadgroup float vt[TK * D];
const size_t base = (size_t(b) * Hkv + kvh) * S * D;
for (uint t0 = begin; t0 < end; t0 += TK) {
  const uint cnt = min(uint(TK), end - t0);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint idx = tid; idx < cnt * D; idx += nthreads) {
    kt[idx] = float(k[base + size_t(t0) * D + idx]);
    vt[idx] = float(v[base + size_t(t0) * D + idx]);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float s[TK];
  for (uint j = 0; j < cnt; ++j) {
    float part = 0.0f;
    for (uint i = 0; i < DPL; ++i) part += qv[i] * kt[j * D + lane * DPL + i];
    s[j] = simd_sum(part);
  }
  const float m_new = tile_max(s, cnt, m);
  const float c = metal::exp(m - m_new);
  l *= c;
  for (uint i = 0; i < DPL; ++i) acc[i] *= c;
  for (uint j = 0; j < cnt; ++j) {
    const float p = metal::exp(s[j] - m_new);
    l += p;
    for (uint i = 0; i < DPL; ++i) acc[i] += p * vt[j * D + lane * DPL + i];
  }
  m = m_new;
}
if (FINAL) {
  const float sink = float(sinks[h]);
  const float M = max(m, sink);
  const float c = metal::exp(m - M);
  const float inv = 1.0f / (l * c + metal::exp(sink - M));
  for (uint i = 0; i < DPL; ++i) {
    o[(size_t(b) * Hq + h) * D + lane * DPL + i] = static_cast<OT>(acc[i] * c * inv);
  }
} else {
  const size_t row = (size_t(b) * Hq + h) * NS + split;
  for (uint i = 0; i < DPL; ++i) o[row * D + lane * DPL + i] = static_cast<OT>(acc[i]);
  if (lane == 0) {
    ml[row * 2] = m;
    ml[row * 2 + 1] = l;
  }
}

// ===== kernel: sdpa_decode_merge =====
// inputs:  o [B, Hq, NS, D] float32 partial sums, ml [B, Hq, NS, 2] (max, sum), sinks [Hq]
// output:  out [B, Hq, 1, D] of type T
// template: T, D
// grid (32, B * Hq, 1), threadgroup (32, 1, 1): one simdgroup per (batch row, query head); lane owns
// dims [lane * D/32, (lane+1) * D/32).
constexpr uint DPL = D / 32;
const uint lane = thread_index_in_simdgroup;
const uint Hq = o_shape[1];
const uint NS = o_shape[2];
const uint bh = threadgroup_position_in_grid.y;
const float sink = float(sinks[bh % Hq]);
float M = sink;
for (uint s = 0; s < NS; ++s) M = max(M, ml[(size_t(bh) * NS + s) * 2]);
float L = metal::exp(sink - M);
float acc[DPL];
for (uint i = 0; i < DPL; ++i) acc[i] = 0.0f;
for (uint s = 0; s < NS; ++s) {
  const size_t row = size_t(bh) * NS + s;
  const float c = metal::exp(ml[row * 2] - M);
  L += c * ml[row * 2 + 1];
  for (uint i = 0; i < DPL; ++i) acc[i] += c * o[row * D + lane * DPL + i];
}
for (uint i = 0; i < DPL; ++i) out[size_t(bh) * D + lane * DPL + i] = static_cast<T>(acc[i] / L);

// ===== kernel: sdpa_banded =====
// inputs:  q [B, Hq, T, D] (the last T of the S positions in k, v), k, v [B, Hkv, S, D], sinks [Hq],
//          params float32 [1] = (scale)
// outputs: o [B, Hq, T, D] of type OT; with GPTOSS_COUNT_VISITED defined also
//          visited int32 [B, Hq, T]: keys this query's threadgroup staged and scanned (the work done)
// template: OT, D, TK (keys per tile), W (window: query at p sees keys p-W+1 .. p)
// grid (32 * G, B * Hkv, ceil(T / 32)), threadgroup (32 * G, 1, 1): one threadgroup per (batch row,
// KV head, block of 32 queries); simdgroup g serves query head kvh * G + g, lane = one query of the
// block (holding its q and output row in registers). The threadgroup walks only the band of keys its
// 32 queries can see -- at most W + 31 keys, whatever T -- in tiles of TK staged in threadgroup memory.
const uint lane = thread_index_in_simdgroup;
const uint g = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const uint nthreads = threads_per_threadgroup.x;
const uint Hq = q_shape[1];
const uint T = q_shape[2];
const uint Hkv = k_shape[1];
const uint S = k_shape[2];
const uint P = S - T;
const uint G = Hq / Hkv;
const uint b = threadgroup_position_in_grid.y / Hkv;
const uint kvh = threadgroup_position_in_grid.y % Hkv;
const uint h = kvh * G + g;
const uint q_first = threadgroup_position_in_grid.z * 32;
const uint q_last = min(q_first + 31, T - 1);
const uint tq = q_first + lane;
const bool live = tq < T;
const uint qpos = P + tq;  // this query's index among the keys
const uint lo = (P + q_first + 1 > uint(W)) ? P + q_first + 1 - uint(W) : 0u;
const uint hi = P + q_last + 1;
const float scale = params[0];

float qv[D];
float acc[D];
const size_t qrow = ((size_t(b) * Hq + h) * T + min(tq, T - 1)) * D;
for (uint d = 0; d < D; ++d) {
  qv[d] = float(q[qrow + d]) * scale;
  acc[d] = 0.0f;
}
float m = neg_inf();
float l = 0.0f;
uint visited = 0;
threadgroup float kt[TK * D];
threadgroup float vt[TK * D];
const size_t base = (size_t(b) * Hkv + kvh) * S * D;
for (uint t0 = lo; t0 < hi; t0 += TK) {
  const uint cnt = min(uint(TK), hi - t0);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint idx = tid; idx < cnt * D; idx += nthreads) {
    kt[idx] = float(k[base + size_t(t0) * D + idx]);
    vt[idx] = float(v[base + size_t(t0) * D + idx]);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  visited += cnt;
  float s[TK];
  float m_new = m;
  for (uint j = 0; j < cnt; ++j) {
    const uint key = t0 + j;
    if (live && key <= qpos && key + uint(W) > qpos) {
      float dot = 0.0f;
      for (uint d = 0; d < D; ++d) dot += qv[d] * kt[j * D + d];
      s[j] = dot;
      m_new = max(m_new, dot);
    } else {
      s[j] = neg_inf();
    }
  }
  if (m_new == neg_inf()) continue;  // nothing visible in this tile for this query
  const float c = metal::exp(m - m_new);
  l *= c;
  for (uint d = 0; d < D; ++d) acc[d] *= c;
  for (uint j = 0; j < cnt; ++j) {
    const float p = metal::exp(s[j] - m_new);  // 0 for the masked keys
    l += p;
    if (p > 0.0f) {
      for (uint d = 0; d < D; ++d) acc[d] += p * vt[j * D + d];
    }
  }
  m = m_new;
}
if (live) {
  const float sink = float(sinks[h]);
  const float M = max(m, sink);
  const float c = metal::exp(m - M);
  const float inv = 1.0f / (l * c + metal::exp(sink - M));
  const size_t orow = ((size_t(b) * Hq + h) * T + tq) * D;
  for (uint d = 0; d < D; ++d) o[orow + d] = static_cast<OT>(acc[d] * c * inv);
#ifdef GPTOSS_COUNT_VISITED
  visited_keys[(size_t(b) * Hq + h) * T + tq] = int(visited);
#endif
}
