// Attention with sinks for gpt-oss: decode over the cache buffers in place (sdpa_decode, split over
// threadgroups and merged by sdpa_decode_merge), and banded prefill on sliding layers on SIMD-group
// matrices (sdpa_banded). Sections are cut by gptoss_mlx/kernels/sources.py: the header goes to
// `header=` of mx.fast.metal_kernel, each kernel section to `source=`. Thread mappings, bytes and
// registers: metal/README.md.
//
// Softmax with a sink: out = sum_j exp(s_j - M) v_j / (sum_j exp(s_j - M) + exp(sink - M)),
// s_j = scale * q.k_j; the sink logit is not scaled and has no value vector. The kernels work in
// base 2: queries are pre-scaled by scale * log2(e) and the sink multiplied by log2(e), so every
// exponential is an exp2 of a difference of scores.

// ===== header =====
// Running maxima start at a finite sentinel (MLX's Limits<float>::finite_min): with no infinity in
// play, exp2(sentinel - score) is 0 and exp2(sentinel - sentinel) is 1 in every math mode, which an
// -inf start only guarantees in safe math.
constant constexpr float SENTINEL = -FLT_MAX;

// ===== kernel: sdpa_decode =====
// inputs:  q [B, Hq, 1, D], k, v [B, Hkv, S, D] (the whole cache buffer: ring or full),
//          sinks [Hq], offset int32 [1] (the new token's position: slots 0 .. min(offset, S-1) hold
//          keys; a ring holds its last S positions in some slot order, which a softmax ignores),
//          params float32 [1] = (scale)
// outputs: FINAL:  o [B, Hq, 1, D] of type OT (normalised, sink included); ml unused ([1])
//          !FINAL: o [B, Hq, NS, D] float32 unnormalised partial sums, ml [B, Hq, NS, 2] = (max, sum)
//          of each split, in base 2
// template: OT, D (head dim, multiple of 32), G (query heads per KV head = simdgroups per
//           threadgroup), SPLIT (keys per split), FINAL
// grid (32 * G, B * Hkv, NS), threadgroup (32 * G, 1, 1): one threadgroup per (batch row, KV head,
// split of SPLIT keys). Simdgroup s takes keys begin + s, begin + s + G, ... of the split for all
// G query heads of the KV head: lane l holds dims [l * D/32, (l+1) * D/32) of the G queries and
// accumulators, reads each of its keys' K and V rows once (coalesced across the simdgroup), and
// reduces each head's score with one simd_sum. The simdgroups' states then merge through
// threadgroup memory, simdgroup h merging query head h.
constexpr uint DPL = D / 32;
threadgroup float part_o[G * G * D];
threadgroup float part_ml[G * G * 2];
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint Hq = q_shape[1];
const uint Hkv = k_shape[1];
const uint S = k_shape[2];
const uint b = threadgroup_position_in_grid.y / Hkv;
const uint kvh = threadgroup_position_in_grid.y % Hkv;
const uint split = threadgroup_position_in_grid.z;
const uint NS = threadgroups_per_grid.z;
const uint n_valid = uint(min(offset[0] + 1, int(S)));
const uint begin = min(split * uint(SPLIT), n_valid);
const uint end = min(begin + uint(SPLIT), n_valid);
const float qscale = params[0] * M_LOG2E_F;

float qv[G * DPL];
float acc[G * DPL];
float m[G];
float l[G];
for (uint g = 0; g < G; ++g) {
  for (uint i = 0; i < DPL; ++i) {
    qv[g * DPL + i] = float(q[(size_t(b) * Hq + kvh * G + g) * D + lane * DPL + i]) * qscale;
    acc[g * DPL + i] = 0.0f;
  }
  m[g] = SENTINEL;
  l[g] = 0.0f;
}
const size_t base = (size_t(b) * Hkv + kvh) * S * D + lane * DPL;
for (uint t = begin + sg; t < end; t += G) {
  float kk[DPL];
  float vv[DPL];
  for (uint i = 0; i < DPL; ++i) {
    kk[i] = float(k[base + size_t(t) * D + i]);
    vv[i] = float(v[base + size_t(t) * D + i]);
  }
  for (uint g = 0; g < G; ++g) {
    float part = 0.0f;
    for (uint i = 0; i < DPL; ++i) part += qv[g * DPL + i] * kk[i];
    const float s = simd_sum(part);
    const float m_new = max(m[g], s);
    const float c = exp2(m[g] - m_new);
    const float p = exp2(s - m_new);
    l[g] = l[g] * c + p;
    for (uint i = 0; i < DPL; ++i) acc[g * DPL + i] = acc[g * DPL + i] * c + p * vv[i];
    m[g] = m_new;
  }
}
for (uint g = 0; g < G; ++g) {
  for (uint i = 0; i < DPL; ++i) part_o[(sg * G + g) * D + lane * DPL + i] = acc[g * DPL + i];
  if (lane == 0) {
    part_ml[(sg * G + g) * 2] = m[g];
    part_ml[(sg * G + g) * 2 + 1] = l[g];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const uint h = sg;  // this simdgroup merges query head kvh * G + h over the G simdgroups
float M = SENTINEL;
for (uint s = 0; s < G; ++s) M = max(M, part_ml[(s * G + h) * 2]);
float L = 0.0f;
float merged[DPL];
for (uint i = 0; i < DPL; ++i) merged[i] = 0.0f;
for (uint s = 0; s < G; ++s) {
  const float c = exp2(part_ml[(s * G + h) * 2] - M);
  L += c * part_ml[(s * G + h) * 2 + 1];
  for (uint i = 0; i < DPL; ++i) merged[i] += c * part_o[(s * G + h) * D + lane * DPL + i];
}
const uint hq = kvh * G + h;
if (FINAL) {
  const float sink = float(sinks[hq]) * M_LOG2E_F;
  const float Mx = max(M, sink);
  const float c = exp2(M - Mx);
  const float inv = 1.0f / (L * c + exp2(sink - Mx));
  for (uint i = 0; i < DPL; ++i) {
    o[(size_t(b) * Hq + hq) * D + lane * DPL + i] = static_cast<OT>(merged[i] * c * inv);
  }
} else {
  const size_t row = (size_t(b) * Hq + hq) * NS + split;
  for (uint i = 0; i < DPL; ++i) o[row * D + lane * DPL + i] = static_cast<OT>(merged[i]);
  if (lane == 0) {
    ml[row * 2] = M;
    ml[row * 2 + 1] = L;
  }
}

// ===== kernel: sdpa_decode_merge =====
// inputs:  o [B, Hq, NS, D] float32 partial sums, ml [B, Hq, NS, 2] (max, sum; base 2), sinks [Hq]
// output:  out [B, Hq, 1, D] of type T
// template: T, D
// grid (32, B * Hq, 1), threadgroup (32, 1, 1): one simdgroup per (batch row, query head); lane owns
// dims [lane * D/32, (lane+1) * D/32).
constexpr uint DPL = D / 32;
const uint lane = thread_index_in_simdgroup;
const uint Hq = o_shape[1];
const uint NS = o_shape[2];
const uint bh = threadgroup_position_in_grid.y;
const float sink = float(sinks[bh % Hq]) * M_LOG2E_F;
float M = sink;
for (uint s = 0; s < NS; ++s) M = max(M, ml[(size_t(bh) * NS + s) * 2]);
float L = exp2(sink - M);
float acc[DPL];
for (uint i = 0; i < DPL; ++i) acc[i] = 0.0f;
for (uint s = 0; s < NS; ++s) {
  const size_t row = size_t(bh) * NS + s;
  const float c = exp2(ml[row * 2] - M);
  L += c * ml[row * 2 + 1];
  for (uint i = 0; i < DPL; ++i) acc[i] += c * o[row * D + lane * DPL + i];
}
for (uint i = 0; i < DPL; ++i) out[size_t(bh) * D + lane * DPL + i] = static_cast<T>(acc[i] / L);

// ===== kernel: sdpa_banded =====
// inputs:  q [B, Hq, T, D] (the last T of the S positions in k, v), k, v [B, Hkv, S, D], sinks [Hq],
//          params float32 [1] = (scale)
// outputs: o [B, Hq, T, D] of type OT; with GPTOSS_COUNT_VISITED defined also
//          visited int32 [B, Hq, T]: keys this query's threadgroup staged and scanned (the work done)
// template: OT, D (multiple of 8, at most 64), G (query heads per KV head = simdgroups), W (window:
//           query at p sees keys p-W+1 .. p)
// grid (32 * G, B * Hkv, ceil(T / 8)), threadgroup (32 * G, 1, 1): one threadgroup per (batch row,
// KV head, block of 8 queries); simdgroup g computes query head kvh * G + g for the block's 8
// queries on 8x8 SIMD-group matrices. The threadgroup walks only the band of keys its queries can
// see -- at most W + 7 -- in tiles of 32 keys staged in threadgroup memory as float:
//   S (8 x 32) = Q (8 x D) K^T        -- D/8 x 4 multiply-accumulates
//   softmax of S's rows in threadgroup memory (lane: row lane/4, 8 columns; quad reductions)
//   O = diag(c) O                     -- D/8 multiplies: rescale by exp2(m_old - m_new) per row
//   O += P (8 x 32) V (32 x D)        -- 4 x D/8 multiply-accumulates
// Q and O stay in SIMD-group matrices (registers) for the whole band.
constexpr uint DC = D / 8;      // 8-wide column blocks of the head dim
constexpr uint TK = 32;         // keys per tile
constexpr uint QB = 8;          // queries per threadgroup
threadgroup float kv_tile[2 * TK * D];   // K tile, then V tile; first the block's queries
threadgroup float scores[G * QB * TK];   // per simdgroup: its 8 x 32 scores, then probabilities
threadgroup float diag[G * QB * QB];     // per simdgroup: the 8 x 8 row-rescaling matrix
const uint lane = thread_index_in_simdgroup;
const uint g = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const uint nthreads = threads_per_threadgroup.x;
const uint Hq = q_shape[1];
const uint T = q_shape[2];
const uint Hkv = k_shape[1];
const uint S = k_shape[2];
const uint P = S - T;
const uint b = threadgroup_position_in_grid.y / Hkv;
const uint kvh = threadgroup_position_in_grid.y % Hkv;
const uint h = kvh * G + g;
const uint q0 = threadgroup_position_in_grid.z * QB;
const uint q_last = min(q0 + QB - 1, T - 1);
const uint lo = (P + q0 + 1 > uint(W)) ? P + q0 + 1 - uint(W) : 0u;
const uint hi = P + q_last + 1;
const float qscale = params[0] * M_LOG2E_F;
const uint row = lane / 4;             // this lane's row of the 8 x 32 score tile
const uint col0 = (lane % 4) * (TK / 4);  // and its 8 columns
const uint qpos = P + q0 + row;        // the row's query position among the keys
const bool row_live = q0 + row < T;

// Stage the block's queries (pre-scaled; rows past T are zeros) and load them as D/8 matrices.
for (uint idx = tid; idx < G * QB * D; idx += nthreads) {
  const uint hh = idx / (QB * D), r = (idx / D) % QB, d = idx % D;
  const uint tq = q0 + r;
  kv_tile[idx] = tq < T ? float(q[((size_t(b) * Hq + kvh * G + hh) * T + tq) * D + d]) * qscale : 0.0f;
}
for (uint idx = lane; idx < QB * QB; idx += 32) diag[g * QB * QB + idx] = 0.0f;
threadgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_float8x8 Q[DC];
simdgroup_float8x8 O[DC];
for (uint c = 0; c < DC; ++c) {
  simdgroup_load(Q[c], kv_tile + g * QB * D + c * 8, D);
  O[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
float m = SENTINEL;  // this lane's row: running max and sum (the same in the row's 4 lanes)
float l = 0.0f;
uint visited = 0;
const size_t base = (size_t(b) * Hkv + kvh) * S * D;
for (uint t0 = lo; t0 < hi; t0 += TK) {
  const uint cnt = min(TK, hi - t0);
  threadgroup_barrier(mem_flags::mem_threadgroup);  // queries loaded / last tile's reads done
  for (uint idx = tid; idx < TK * D; idx += nthreads) {
    const bool in = idx < cnt * D;
    kv_tile[idx] = in ? float(k[base + size_t(t0) * D + idx]) : 0.0f;
    kv_tile[TK * D + idx] = in ? float(v[base + size_t(t0) * D + idx]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  visited += cnt;
  // S = Q K^T, one 8-key column block at a time
  for (uint kb = 0; kb < TK / 8; ++kb) {
    simdgroup_float8x8 s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint c = 0; c < DC; ++c) {
      simdgroup_float8x8 kt;
      simdgroup_load(kt, kv_tile + kb * 8 * D + c * 8, D, ulong2(0, 0), true);  // K^T block
      simdgroup_multiply_accumulate(s, Q[c], kt, s);
    }
    simdgroup_store(s, scores + g * QB * TK + kb * 8, TK);
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  // online softmax of this lane's 8 scores of its row; masked keys weigh 0
  threadgroup float* srow = scores + g * QB * TK + row * TK + col0;
  float mx = SENTINEL;
  for (uint j = 0; j < TK / 4; ++j) {
    const uint key = t0 + col0 + j;
    const bool seen = row_live && col0 + j < cnt && key <= qpos && key + uint(W) > qpos;
    mx = seen ? max(mx, srow[j]) : mx;
  }
  const float m_new = max(m, quad_max(mx));
  float psum = 0.0f;
  for (uint j = 0; j < TK / 4; ++j) {
    const uint key = t0 + col0 + j;
    const bool seen = row_live && col0 + j < cnt && key <= qpos && key + uint(W) > qpos;
    const float p = seen ? exp2(srow[j] - m_new) : 0.0f;
    srow[j] = p;
    psum += p;
  }
  const float c = exp2(m - m_new);
  l = l * c + quad_sum(psum);
  m = m_new;
  if (lane % 4 == 0) diag[g * QB * QB + row * QB + row] = c;
  simdgroup_barrier(mem_flags::mem_threadgroup);
  // O = diag(c) O, then O += P V
  simdgroup_float8x8 cm;
  simdgroup_load(cm, diag + g * QB * QB, QB);
  for (uint c2 = 0; c2 < DC; ++c2) {
    simdgroup_float8x8 scaled;
    simdgroup_multiply(scaled, cm, O[c2]);
    O[c2] = scaled;
  }
  for (uint kb = 0; kb < TK / 8; ++kb) {
    simdgroup_float8x8 pm;
    simdgroup_load(pm, scores + g * QB * TK + kb * 8, TK);
    for (uint c2 = 0; c2 < DC; ++c2) {
      simdgroup_float8x8 vm;
      simdgroup_load(vm, kv_tile + TK * D + kb * 8 * D + c2 * 8, D);
      simdgroup_multiply_accumulate(O[c2], pm, vm, O[c2]);
    }
  }
}
// the sink and the normalisation: O = diag(f) O with f = exp2(m - M) / (l exp2(m - M) + exp2(sink - M))
const float sink = float(sinks[h]) * M_LOG2E_F;
const float M = max(m, sink);
const float cf = exp2(m - M);
const float f = cf / (l * cf + exp2(sink - M));
simdgroup_barrier(mem_flags::mem_threadgroup);
if (lane % 4 == 0) diag[g * QB * QB + row * QB + row] = f;
simdgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_float8x8 fm;
simdgroup_load(fm, diag + g * QB * QB, QB);
threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with the last K/V tile
for (uint c2 = 0; c2 < DC; ++c2) {
  simdgroup_float8x8 out_m;
  simdgroup_multiply(out_m, fm, O[c2]);
  simdgroup_store(out_m, kv_tile + g * QB * D + c2 * 8, D);
}
simdgroup_barrier(mem_flags::mem_threadgroup);
for (uint idx = lane; idx < QB * D; idx += 32) {
  const uint r = idx / D, tq = q0 + r;
  if (tq < T) o[((size_t(b) * Hq + h) * T + tq) * D + idx % D] = static_cast<OT>(kv_tile[g * QB * D + idx]);
}
#ifdef GPTOSS_COUNT_VISITED
if (lane % 4 == 0 && row_live) visited_keys[(size_t(b) * Hq + h) * T + q0 + row] = int(visited);
#endif
