// MoE experts for decode: the MXFP4 gate/linear matrix-vector products with bias and SwiGLU
// (moe_gate_up_swiglu), and the MXFP4 down projection with bias, routing weights and the sum over
// the selected experts (moe_down_combine). Sections are cut by gptoss_mlx/kernels/sources.py: the
// header goes to `header=` of mx.fast.metal_kernel, each kernel section to `source=`.
// Thread mapping and bytes per token: metal/README.md.

// ===== header =====
// E2M1: bit 3 sign, bits 2-1 exponent, bit 0 mantissa.
constant float FP4_VALUES[16] = {+0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                 -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// E8M0 scale byte -> 2^(byte - 127) (byte 0, a denormal, reads as 0).
inline float mxfp4_scale(uchar s) {
  return as_type<float>(uint(s) << 23);
}

// One MXFP4 block (32 values, 16 bytes: low nibble = even element) dotted with 32 floats.
inline float mxfp4_block_dot(uint4 q, thread const float* xs) {
  float s = 0.0f;
  for (int j = 0; j < 4; ++j) {
    uint word = q[j];
    for (int i = 0; i < 8; ++i) {
      s += FP4_VALUES[(word >> (4 * i)) & 15u] * xs[8 * j + i];
    }
  }
  return s;
}

// ===== kernel: moe_gate_up_swiglu =====
// inputs:  x [N, H], indices [N, K], w uint32 [E, 2I, H/8], scales uint8 [E, 2I, H/32],
//          bias [E, 2I], params float32 [2] = (alpha, limit)
// output:  act [N*K, I] of type T
// template: T, ROWS (output features per simdgroup; 2*ROWS weight rows, interleaved gate/linear)
// grid (32 * SG * ceil(I / (SG * ROWS)), N * K, 1), threadgroup (32 * SG, 1, 1)
const uint lane = thread_index_in_simdgroup;
const uint H = x_shape[1];
const uint K = indices_shape[1];
const uint I = w_shape[1] / 2;
const uint nb = H / 32;
const uint pair = threadgroup_position_in_grid.y;
const uint tok = pair / K;
const uint e = uint(indices[pair]);
const uint f0 = (threadgroup_position_in_grid.x * simdgroups_per_threadgroup +
                 simdgroup_index_in_threadgroup) * ROWS;
if (f0 >= I) return;
const uint nrows = 2 * min(uint(ROWS), I - f0);
const size_t row0 = size_t(e) * 2 * I + 2 * f0;
const device uint4* wq = (const device uint4*)w + row0 * nb;
const device uchar* sc = scales + row0 * nb;
float acc[2 * ROWS];
for (int r = 0; r < 2 * ROWS; ++r) acc[r] = 0.0f;
for (uint b = lane; b < nb; b += 32) {
  float xs[32];
  for (int i = 0; i < 32; ++i) xs[i] = float(x[size_t(tok) * H + b * 32 + i]);
  for (int r = 0; r < 2 * ROWS; ++r) {
    uint rr = min(uint(r), nrows - 1);  // rows past the end repeat the last one, unused
    acc[r] += mxfp4_scale(sc[rr * nb + b]) * mxfp4_block_dot(wq[rr * nb + b], xs);
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
// template: T, ROWS (output rows per simdgroup)
// grid (32 * SG * ceil(H / (SG * ROWS)), N, 1), threadgroup (32 * SG, 1, 1)
const uint lane = thread_index_in_simdgroup;
const uint H = w_shape[1];
const uint I = act_shape[1];
const uint K = indices_shape[1];
const uint nb = I / 32;
const uint tok = threadgroup_position_in_grid.y;
const uint r0 = (threadgroup_position_in_grid.x * simdgroups_per_threadgroup +
                 simdgroup_index_in_threadgroup) * ROWS;
if (r0 >= H) return;
const uint nrows = min(uint(ROWS), H - r0);
float acc[ROWS];
float bsum[ROWS];
for (int r = 0; r < ROWS; ++r) {
  acc[r] = 0.0f;
  bsum[r] = 0.0f;
}
for (uint j = 0; j < K; ++j) {
  const uint e = uint(indices[tok * K + j]);
  const float wt = float(weights[tok * K + j]);
  const size_t row0 = size_t(e) * H + r0;
  const device uint4* wq = (const device uint4*)w + row0 * nb;
  const device uchar* sc = scales + row0 * nb;
  const size_t a0 = (size_t(tok) * K + j) * I;
  for (uint b = lane; b < nb; b += 32) {
    float xs[32];
    for (int i = 0; i < 32; ++i) xs[i] = float(act[a0 + b * 32 + i]);
    for (int r = 0; r < ROWS; ++r) {
      uint rr = min(uint(r), nrows - 1);
      acc[r] += wt * mxfp4_scale(sc[rr * nb + b]) * mxfp4_block_dot(wq[rr * nb + b], xs);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    bsum[r] += wt * float(bias[row0 + min(uint(r), nrows - 1)]);
  }
}
for (int r = 0; r < ROWS; ++r) acc[r] = simd_sum(acc[r]);
if (lane == 0) {
  for (int r = 0; r < ROWS; ++r) {
    if (uint(r) < nrows) y[size_t(tok) * H + r0 + r] = static_cast<T>(acc[r] + bsum[r]);
  }
}
