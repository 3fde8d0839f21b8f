// MoE experts for decode: the MXFP4 gate/linear matrix-vector products with bias and SwiGLU
// (moe_gate_up_swiglu), and the MXFP4 down projection with bias, routing weights and the sum over
// the selected experts (moe_down_combine). Sections are cut by gptoss_mlx/kernels/sources.py: the
// header goes to `header=` of mx.fast.metal_kernel, each kernel section to `source=`.
// Thread mapping, bytes per token and registers: metal/README.md.

// ===== header =====
// FP4 (E2M1) decoded with bit operations, no table: a code's sign and its 3 exponent/mantissa bits
// placed at bits 15 and 11..9 of a half give the half 2^-14 * value (codes 0 and 0.5 become the
// subnormals 0 and 2^-15), so FP4_UNIT = 2^14 restores the value. One word holds 8 codes, low
// nibble first; fp4_lo gives codes (0, 4, 2, 6) and fp4_hi codes (1, 5, 3, 7), two codes per
// 32-bit operation.
constant constexpr float FP4_UNIT = 16384.0f;

inline float4 fp4_lo(uint w) {
  half2 a = as_type<half2>(((w & 0x00070007u) << 9) | ((w & 0x00080008u) << 12));  // codes 0, 4
  half2 b = as_type<half2>(((w & 0x07000700u) << 1) | ((w & 0x08000800u) << 4));   // codes 2, 6
  return float4(float2(a), float2(b));
}

inline float4 fp4_hi(uint w) {
  half2 a = as_type<half2>(((w & 0x00700070u) << 5) | ((w & 0x00800080u) << 8));  // codes 1, 5
  half2 b = as_type<half2>(((w & 0x70007000u) >> 3) | (w & 0x80008000u));         // codes 3, 7
  return float4(float2(a), float2(b));
}

// E8M0 scale byte -> 2^(byte - 127) (byte 0, a denormal, reads as 0).
inline float mxfp4_scale(uchar s) {
  return as_type<float>(uint(s) << 23);
}

// Activations are staged once per threadgroup in threadgroup memory as float: block b (32 values)
// at b * XS_STRIDE (padded to 36 floats: the float4 reads of 32 lanes, one block each, spread over
// all banks), and within each group of 8 values, value p at slot bitrev3(p) -- order
// (0, 4, 2, 6, 1, 5, 3, 7) -- so the group's two float4 pair with fp4_lo and fp4_hi.
constant constexpr uint XS_STRIDE = 36;

inline uint staged_index(uint e) {
  const uint p = e & 7u;
  return (e >> 5) * XS_STRIDE + (e & 24u) + (((p & 1u) << 2) | (p & 2u) | (p >> 2));
}

// One MXFP4 block (16 bytes: 4 words) dotted with its 32 staged activations (8 float4 in registers),
// in units of 2^-14 (see FP4_UNIT).
inline float block_dot(uint4 q, thread const float4* xv) {
  float4 acc = float4(0.0f);
  for (int j = 0; j < 4; ++j) {
    acc = fma(fp4_lo(q[j]), xv[2 * j], acc);
    acc = fma(fp4_hi(q[j]), xv[2 * j + 1], acc);
  }
  return (acc.x + acc.y) + (acc.z + acc.w);
}

// ===== kernel: moe_gate_up_swiglu =====
// inputs:  x [N, H], indices [N, K], w uint32 [E, 2I, H/8], scales uint8 [E, 2I, H/32],
//          bias [E, 2I], params float32 [2] = (alpha, limit)
// output:  act [N*K, I] of type T
// template: T, H (input features: sizes the staging), ROWS (output features per simdgroup: 2 * ROWS
//           weight rows, interleaved gate/linear)
// grid (32 * SG * ceil(I / (SG * ROWS)), N * K, 1), threadgroup (32 * SG, 1, 1): one threadgroup per
// (block of SG * ROWS features, token-expert pair); lane l takes the MXFP4 blocks l, l + 32, ...
constexpr uint NB = H / 32;
threadgroup float4 xs4[NB * XS_STRIDE / 4];  // float4: 16-byte aligned for the vector reads
threadgroup float* xs = (threadgroup float*)xs4;
const uint lane = thread_index_in_simdgroup;
const uint tid = thread_index_in_threadgroup;
const uint nthreads = threads_per_threadgroup.x;
const uint K = indices_shape[1];
const uint I = w_shape[1] / 2;
const uint pair = threadgroup_position_in_grid.y;
const uint tok = pair / K;
const uint e = uint(indices[pair]);
for (uint i = tid; i < H; i += nthreads) xs[staged_index(i)] = float(x[size_t(tok) * H + i]);
threadgroup_barrier(mem_flags::mem_threadgroup);
const uint f0 = (threadgroup_position_in_grid.x * simdgroups_per_threadgroup +
                 simdgroup_index_in_threadgroup) * ROWS;
if (f0 >= I) return;
const uint nrows = 2 * min(uint(ROWS), I - f0);
const size_t row0 = size_t(e) * 2 * I + 2 * f0;
const device uint4* wq = (const device uint4*)w + row0 * NB;
const device uchar* sc = scales + row0 * NB;
float acc[2 * ROWS];
for (int r = 0; r < 2 * ROWS; ++r) acc[r] = 0.0f;
for (uint b = lane; b < NB; b += 32) {
  const threadgroup float4* xb = (const threadgroup float4*)(xs + b * XS_STRIDE);
  float4 xv[8];
  for (int i = 0; i < 8; ++i) xv[i] = xb[i];
  for (int r = 0; r < 2 * ROWS; ++r) {
    const uint rr = min(uint(r), nrows - 1);  // rows past the end repeat the last one, unused
    acc[r] += mxfp4_scale(sc[rr * NB + b]) * (block_dot(wq[rr * NB + b], xv) * FP4_UNIT);
  }
}
for (int r = 0; r < 2 * ROWS; ++r) acc[r] = simd_sum(acc[r]);
if (lane == 0) {
  const float alpha = params[0];
  const float limit = params[1];
  for (int i = 0; i < ROWS; ++i) {
    if (uint(2 * i) < nrows) {
      float g = acc[2 * i] + float(bias[row0 + 2 * i]);
      float l = acc[2 * i + 1] + float(bias[row0 + 2 * i + 1]);
      g = min(g, limit);
      l = clamp(l, -limit, limit);
      act[size_t(pair) * I + f0 + i] = static_cast<T>(g / (1.0f + metal::exp(-alpha * g)) * (l + 1.0f));
    }
  }
}

// ===== kernel: moe_down_combine =====
// inputs:  act [N*K, I], indices [N, K], weights [N, K], w uint32 [E, H, I/8],
//          scales uint8 [E, H, I/32], bias [E, H]
// output:  y [N, H] of type T:  y[n] = sum_j weights[n, j] * (W[e_j] act[n, j] + bias[e_j])
// template: T, I (input features: sizes the staging), ROWS (output rows per simdgroup)
// grid (32 * SG * ceil(H / (SG * ROWS)), N, 1), threadgroup (32 * SG, 1, 1): one threadgroup per
// (block of SG * ROWS rows, token); it stages each of the token's K activation rows in turn.
constexpr uint NB = I / 32;
threadgroup float4 xs4[NB * XS_STRIDE / 4];  // float4: 16-byte aligned for the vector reads
threadgroup float* xs = (threadgroup float*)xs4;
const uint lane = thread_index_in_simdgroup;
const uint tid = thread_index_in_threadgroup;
const uint nthreads = threads_per_threadgroup.x;
const uint H = w_shape[1];
const uint K = indices_shape[1];
const uint tok = threadgroup_position_in_grid.y;
const uint r0 = (threadgroup_position_in_grid.x * simdgroups_per_threadgroup +
                 simdgroup_index_in_threadgroup) * ROWS;
const bool active = r0 < H;  // (no early return: every thread takes part in the staging)
const uint nrows = active ? min(uint(ROWS), H - r0) : 1;
float acc[ROWS];
float bsum[ROWS];
for (int r = 0; r < ROWS; ++r) {
  acc[r] = 0.0f;
  bsum[r] = 0.0f;
}
for (uint j = 0; j < K; ++j) {
  const size_t a0 = (size_t(tok) * K + j) * I;
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous expert's reads are done
  for (uint i = tid; i < I; i += nthreads) xs[staged_index(i)] = float(act[a0 + i]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (!active) continue;
  const uint e = uint(indices[tok * K + j]);
  const float wt = float(weights[tok * K + j]);
  const size_t row0 = size_t(e) * H + r0;
  const device uint4* wq = (const device uint4*)w + row0 * NB;
  const device uchar* sc = scales + row0 * NB;
  float part[ROWS];
  for (int r = 0; r < ROWS; ++r) part[r] = 0.0f;
  for (uint b = lane; b < NB; b += 32) {
    const threadgroup float4* xb = (const threadgroup float4*)(xs + b * XS_STRIDE);
    float4 xv[8];
    for (int i = 0; i < 8; ++i) xv[i] = xb[i];
    for (int r = 0; r < ROWS; ++r) {
      const uint rr = min(uint(r), nrows - 1);
      part[r] += mxfp4_scale(sc[rr * NB + b]) * (block_dot(wq[rr * NB + b], xv) * FP4_UNIT);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    acc[r] += wt * part[r];
    bsum[r] += wt * float(bias[row0 + min(uint(r), nrows - 1)]);
  }
}
if (!active) return;
for (int r = 0; r < ROWS; ++r) acc[r] = simd_sum(acc[r]);
if (lane == 0) {
  for (int r = 0; r < ROWS; ++r) {
    if (uint(r) < nrows) y[size_t(tok) * H + r0 + r] = static_cast<T>(acc[r] + bsum[r]);
  }
}
