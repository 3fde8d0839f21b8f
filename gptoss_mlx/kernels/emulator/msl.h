// msl.h: the Metal Shading Language as C++17 for g++ -- the types, the standard library functions
// and constants kernels use -- plus a C++ stand-in for MLX's JIT prelude
// (mlx/backend/metal/kernels/utils.h: float16_t, bfloat16_t, elem_to_loc, Limits, ...). It is
// included first in every translation unit the emulator compiles, before the kernel source that
// MLX would generate.
//
// Semantics that matter for bug finding live in runtime.h (fibers, barriers, SIMD collectives,
// SIMD-group matrices, poisoning, address-space-typed pointers); this file has the types and
// functions. What MSL lacks is left out on purpose (erf, hypot, expf, ...): a kernel calling it
// fails to compile here as it does on a Mac.
#pragma once

#include <stdint.h>
#include <stddef.h>
#include <limits.h>
#include <type_traits>
#include <limits>

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;

namespace metal {

// ---------------------------------------------------------------------------------------------
// bfloat: 16-bit storage, arithmetic in float, round-to-nearest-even back to bfloat.
struct bfloat {
  uint16_t bits;
  struct raw_t {};
  bfloat() = default;
  constexpr bfloat(raw_t, uint16_t b) : bits(b) {}
  static uint16_t from_float(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  template <class S, class = std::enable_if_t<std::is_arithmetic<S>::value || std::is_same<S, half>::value>>
  bfloat(S s) : bits(from_float(float(s))) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  constexpr bfloat operator-() const { return bfloat(raw_t{}, uint16_t(bits ^ 0x8000)); }
  constexpr bfloat operator+() const { return *this; }
#define MSL_BF_ASSIGN(op) \
  template <class S> bfloat& operator op##=(S s) { *this = bfloat(float(*this) op float(s)); return *this; }
  MSL_BF_ASSIGN(+) MSL_BF_ASSIGN(-) MSL_BF_ASSIGN(*) MSL_BF_ASSIGN(/)
#undef MSL_BF_ASSIGN
};
#define MSL_BF_BIN(op)                                                                     \
  inline bfloat operator op(bfloat a, bfloat b) { return bfloat(float(a) op float(b)); }  \
  template <class S, class = std::enable_if_t<std::is_integral<S>::value>>                 \
  inline bfloat operator op(bfloat a, S b) { return bfloat(float(a) op float(b)); }        \
  template <class S, class = std::enable_if_t<std::is_integral<S>::value>>                 \
  inline bfloat operator op(S a, bfloat b) { return bfloat(float(a) op float(b)); }        \
  inline float operator op(bfloat a, float b) { return float(a) op b; }                     \
  inline float operator op(float a, bfloat b) { return a op float(b); }                     \
  inline float operator op(bfloat a, half b) { return float(a) op float(b); }               \
  inline float operator op(half a, bfloat b) { return float(a) op float(b); }
MSL_BF_BIN(+) MSL_BF_BIN(-) MSL_BF_BIN(*) MSL_BF_BIN(/)
#undef MSL_BF_BIN
#define MSL_BF_CMP(op)                                                                     \
  inline bool operator op(bfloat a, bfloat b) { return float(a) op float(b); }              \
  inline bool operator op(bfloat a, float b) { return float(a) op b; }                      \
  inline bool operator op(float a, bfloat b) { return a op float(b); }                      \
  template <class S, class = std::enable_if_t<std::is_integral<S>::value>>                 \
  inline bool operator op(bfloat a, S b) { return float(a) op float(b); }
MSL_BF_CMP(<) MSL_BF_CMP(>) MSL_BF_CMP(<=) MSL_BF_CMP(>=) MSL_BF_CMP(==) MSL_BF_CMP(!=)
#undef MSL_BF_CMP

template <class T> struct is_msl_scalar
    : std::integral_constant<bool, std::is_arithmetic<T>::value || std::is_same<T, half>::value ||
                                       std::is_same<T, bfloat>::value> {};
template <class T> struct is_msl_float
    : std::integral_constant<bool, std::is_floating_point<T>::value || std::is_same<T, half>::value ||
                                       std::is_same<T, bfloat>::value> {};

// ---------------------------------------------------------------------------------------------
// Vectors. vec<T, N> is Metal's TN (float4, half2, uint3, ...); N == 3 is padded to 4 elements as
// in Metal. packed_vec<T, N> is packed_TN (no padding, element alignment).
//
// Swizzles: single components (.x .y .z .w, .r .g .b .a) are members. Multi-component swizzles
// (.zyx, .xxyy, .ba, ...: 2 to 4 components of one set) are rewritten by the emulator's build step
// into `.template swz<2, 1, 0>()` on the same line. On an lvalue vector swz returns a `swizzle`
// (a vector holding the selected values that also writes assignments back: v.zy = ...; v.xy += ...),
// elsewhere a plain vector. Writing a swizzle that repeats a component does not compile, as in Metal.
template <class T, int N, bool P> struct basic_vec;
template <class T, int N> using vec = basic_vec<T, N, false>;
template <class T, int N> using packed_vec = basic_vec<T, N, true>;
template <class T, int N, bool P, int... I> struct swizzle;

template <class T, class = void> struct vec_info { static constexpr int n = 1; typedef T elem; };
template <class T> struct vec_info<T, std::void_t<typename T::msl_vec_type>> {
  static constexpr int n = T::msl_vec_type::size;
  typedef typename T::msl_vec_type::value_type elem;
};

template <class T, int N, bool P>
struct basic_vec_storage;
template <class T, bool P>
struct alignas(P ? alignof(T) : 2 * sizeof(T)) basic_vec_storage<T, 2, P> {
  union { T v[2]; struct { T x, y; }; struct { T r, g; }; };
};
template <class T, bool P>
struct alignas(P ? alignof(T) : 4 * sizeof(T)) basic_vec_storage<T, 3, P> {
  union { T v[P ? 3 : 4]; struct { T x, y, z; }; struct { T r, g, b; }; };
};
template <class T, bool P>
struct alignas(P ? alignof(T) : 4 * sizeof(T)) basic_vec_storage<T, 4, P> {
  union { T v[4]; struct { T x, y, z, w; }; struct { T r, g, b, a; }; };
};

template <int... I> constexpr bool msl_distinct() {
  int idx[] = {I...};
  for (unsigned i = 0; i < sizeof...(I); ++i)
    for (unsigned j = i + 1; j < sizeof...(I); ++j)
      if (idx[i] == idx[j]) return false;
  return true;
}

template <class T, int N, bool P>
struct basic_vec : basic_vec_storage<T, N, P> {
  using basic_vec_storage<T, N, P>::v;
  typedef T value_type;
  typedef basic_vec<T, N, false> msl_vec_type;
  static constexpr int size = N;
  basic_vec() = default;
  // broadcast a scalar
  template <class S, class = std::enable_if_t<is_msl_scalar<S>::value>>
  basic_vec(S s) { for (int i = 0; i < N; ++i) v[i] = T(s); }
  // same element type, other packing: implicit
  template <bool Q>
  basic_vec(const basic_vec<T, N, Q>& o) { for (int i = 0; i < N; ++i) v[i] = o.v[i]; }
  // other element type: explicit conversion
  template <class U, bool Q, class = std::enable_if_t<!std::is_same<U, T>::value>>
  explicit basic_vec(const basic_vec<U, N, Q>& o) { for (int i = 0; i < N; ++i) v[i] = T(o.v[i]); }
  // element-wise from scalars and smaller vectors: float4(a, b, c, d), float4(xy, zw), ...
  template <class A, class B, class... Rest>
  basic_vec(const A& a, const B& b, const Rest&... rest) {
    static_assert(vec_info<A>::n + vec_info<B>::n + (0 + ... + vec_info<Rest>::n) == N,
                  "wrong number of vector components");
    int k = 0;
    put(k, a); put(k, b); (put(k, rest), ...);
  }
  T& operator[](int i) { return v[i]; }
  const T& operator[](int i) const { return v[i]; }

  template <int... I> swizzle<T, N, P, I...> swz() & {
    static_assert(((I >= 0 && I < N) && ...), "swizzle selects a component this vector does not have");
    return swizzle<T, N, P, I...>(*this);
  }
  template <int... I> vec<T, int(sizeof...(I))> swz() const& {
    static_assert(((I >= 0 && I < N) && ...), "swizzle selects a component this vector does not have");
    return vec<T, int(sizeof...(I))>(v[I]...);
  }
  template <int... I> vec<T, int(sizeof...(I))> swz() && {
    static_assert(((I >= 0 && I < N) && ...), "swizzle selects a component this vector does not have");
    return vec<T, int(sizeof...(I))>(v[I]...);
  }

 private:
  template <class S> void put(int& k, const S& s) {
    if constexpr (vec_info<S>::n == 1) { v[k++] = T(s); }
    else { for (int i = 0; i < vec_info<S>::n; ++i) v[k++] = T(s.v[i]); }
  }
};

template <class T, int N, bool P, int... I>
struct swizzle : basic_vec<T, int(sizeof...(I)), false> {
  typedef basic_vec<T, int(sizeof...(I)), false> base;
  basic_vec<T, N, P>* src;
  explicit swizzle(basic_vec<T, N, P>& s) : base(s.v[I]...), src(&s) {}
  swizzle(const swizzle&) = default;
  swizzle& operator=(const base& x) {
    static_assert(msl_distinct<I...>(), "a swizzle that repeats a component cannot be assigned to");
    int k = 0;
    ((src->v[I] = x.v[k], this->v[k] = x.v[k], ++k), ...);
    return *this;
  }
  swizzle& operator=(const swizzle& x) { return *this = static_cast<const base&>(x); }
  template <class U> swizzle& operator=(const U& u) { return *this = base(u); }
#define MSL_SWZ_ASSIGN(op) \
  template <class U> swizzle& operator op##=(const U& u) { return *this = base(static_cast<const base&>(*this) op u); }
  MSL_SWZ_ASSIGN(+) MSL_SWZ_ASSIGN(-) MSL_SWZ_ASSIGN(*) MSL_SWZ_ASSIGN(/) MSL_SWZ_ASSIGN(%)
  MSL_SWZ_ASSIGN(&) MSL_SWZ_ASSIGN(|) MSL_SWZ_ASSIGN(^) MSL_SWZ_ASSIGN(<<) MSL_SWZ_ASSIGN(>>)
#undef MSL_SWZ_ASSIGN
};

#define MSL_VEC_TYPES(T, name)                                                                       \
  typedef vec<T, 2> name##2; typedef vec<T, 3> name##3; typedef vec<T, 4> name##4;                  \
  typedef packed_vec<T, 2> packed_##name##2; typedef packed_vec<T, 3> packed_##name##3;             \
  typedef packed_vec<T, 4> packed_##name##4;
MSL_VEC_TYPES(float, float) MSL_VEC_TYPES(half, half) MSL_VEC_TYPES(bfloat, bfloat)
MSL_VEC_TYPES(int, int) MSL_VEC_TYPES(uint, uint) MSL_VEC_TYPES(short, short) MSL_VEC_TYPES(ushort, ushort)
MSL_VEC_TYPES(char, char) MSL_VEC_TYPES(uchar, uchar) MSL_VEC_TYPES(long, long) MSL_VEC_TYPES(ulong, ulong)
MSL_VEC_TYPES(bool, bool)
#undef MSL_VEC_TYPES

// element-wise operators
#define MSL_VEC_BIN(op)                                                                            \
  template <class T, int N, bool P, bool Q>                                                         \
  inline vec<T, N> operator op(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b) {          \
    vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = T(a.v[i] op b.v[i]); return r; }              \
  template <class T, int N, bool P, class S, class = std::enable_if_t<is_msl_scalar<S>::value>>    \
  inline vec<T, N> operator op(const basic_vec<T, N, P>& a, S s) {                                  \
    vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = T(a.v[i] op T(s)); return r; }                \
  template <class T, int N, bool P, class S, class = std::enable_if_t<is_msl_scalar<S>::value>>    \
  inline vec<T, N> operator op(S s, const basic_vec<T, N, P>& a) {                                  \
    vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = T(T(s) op a.v[i]); return r; }                \
  template <class T, int N, bool P, class U>                                                        \
  inline basic_vec<T, N, P>& operator op##=(basic_vec<T, N, P>& a, const U& b) {                    \
    a = a op b; return a; }
MSL_VEC_BIN(+) MSL_VEC_BIN(-) MSL_VEC_BIN(*) MSL_VEC_BIN(/) MSL_VEC_BIN(%)
MSL_VEC_BIN(&) MSL_VEC_BIN(|) MSL_VEC_BIN(^) MSL_VEC_BIN(<<) MSL_VEC_BIN(>>)
#undef MSL_VEC_BIN
#define MSL_VEC_CMP(op)                                                                            \
  template <class T, int N, bool P, bool Q>                                                         \
  inline vec<bool, N> operator op(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b) {       \
    vec<bool, N> r; for (int i = 0; i < N; ++i) r.v[i] = a.v[i] op b.v[i]; return r; }              \
  template <class T, int N, bool P, class S, class = std::enable_if_t<is_msl_scalar<S>::value>>    \
  inline vec<bool, N> operator op(const basic_vec<T, N, P>& a, S s) {                               \
    vec<bool, N> r; for (int i = 0; i < N; ++i) r.v[i] = a.v[i] op T(s); return r; }
MSL_VEC_CMP(<) MSL_VEC_CMP(>) MSL_VEC_CMP(<=) MSL_VEC_CMP(>=) MSL_VEC_CMP(==) MSL_VEC_CMP(!=)
MSL_VEC_CMP(&&) MSL_VEC_CMP(||)
#undef MSL_VEC_CMP
template <class T, int N, bool P>
inline vec<T, N> operator-(const basic_vec<T, N, P>& a) { vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = -a.v[i]; return r; }
template <class T, int N, bool P>
inline vec<T, N> operator~(const basic_vec<T, N, P>& a) { vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = ~a.v[i]; return r; }
template <class T, int N, bool P>
inline vec<bool, N> operator!(const basic_vec<T, N, P>& a) { vec<bool, N> r; for (int i = 0; i < N; ++i) r.v[i] = !a.v[i]; return r; }

template <int N, bool P> inline bool all(const basic_vec<bool, N, P>& a) { for (int i = 0; i < N; ++i) if (!a.v[i]) return false; return true; }
template <int N, bool P> inline bool any(const basic_vec<bool, N, P>& a) { for (int i = 0; i < N; ++i) if (a.v[i]) return true; return false; }
inline bool all(bool a) { return a; }
inline bool any(bool a) { return a; }
// `not` is a C++ keyword (operator!), so MSL's not(x) parses as !(x) here too.

// ---------------------------------------------------------------------------------------------
// Matrices: matrix<T, C, R> is Metal's TCxR (C columns of R-component vectors), T float or half.
// m[i] is column i; m * v, v * m, m * m, +, -, scalar products, transpose, determinant.
template <class T, int C, int R>
struct matrix {
  static_assert(C >= 2 && C <= 4 && R >= 2 && R <= 4, "Metal matrices have 2 to 4 columns and rows");
  static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value,
                "Metal matrices hold float or half");
  vec<T, R> columns[C];
  matrix() = default;
  explicit matrix(T d) {  // diagonal
    for (int c = 0; c < C; ++c) for (int r = 0; r < R; ++r) columns[c][r] = c == r ? d : T(0);
  }
  template <class... Cols, class = std::enable_if_t<sizeof...(Cols) == C>>
  matrix(const Cols&... cols) {
    int c = 0;
    ((columns[c++] = vec<T, R>(cols)), ...);
  }
  template <class U, class = std::enable_if_t<!std::is_same<U, T>::value>>
  explicit matrix(const matrix<U, C, R>& o) { for (int c = 0; c < C; ++c) columns[c] = vec<T, R>(o.columns[c]); }
  vec<T, R>& operator[](int c) { return columns[c]; }
  const vec<T, R>& operator[](int c) const { return columns[c]; }
};
template <class T, int C, int R, bool P>
inline vec<T, R> operator*(const matrix<T, C, R>& m, const basic_vec<T, C, P>& x) {
  vec<T, R> r(T(0)); for (int c = 0; c < C; ++c) r = r + m.columns[c] * x.v[c]; return r; }
template <class T, int C, int R, bool P>
inline vec<T, C> operator*(const basic_vec<T, R, P>& x, const matrix<T, C, R>& m) {
  vec<T, C> r; for (int c = 0; c < C; ++c) { T s = T(0); for (int i = 0; i < R; ++i) s += x.v[i] * m.columns[c].v[i]; r.v[c] = s; } return r; }
template <class T, int K, int R, int C>
inline matrix<T, C, R> operator*(const matrix<T, K, R>& a, const matrix<T, C, K>& b) {
  matrix<T, C, R> r; for (int c = 0; c < C; ++c) r.columns[c] = a * b.columns[c]; return r; }
template <class T, int C, int R>
inline matrix<T, C, R> operator+(const matrix<T, C, R>& a, const matrix<T, C, R>& b) {
  matrix<T, C, R> r; for (int c = 0; c < C; ++c) r.columns[c] = a.columns[c] + b.columns[c]; return r; }
template <class T, int C, int R>
inline matrix<T, C, R> operator-(const matrix<T, C, R>& a, const matrix<T, C, R>& b) {
  matrix<T, C, R> r; for (int c = 0; c < C; ++c) r.columns[c] = a.columns[c] - b.columns[c]; return r; }
template <class T, int C, int R, class S, class = std::enable_if_t<is_msl_scalar<S>::value>>
inline matrix<T, C, R> operator*(const matrix<T, C, R>& a, S s) {
  matrix<T, C, R> r; for (int c = 0; c < C; ++c) r.columns[c] = a.columns[c] * T(s); return r; }
template <class T, int C, int R, class S, class = std::enable_if_t<is_msl_scalar<S>::value>>
inline matrix<T, C, R> operator*(S s, const matrix<T, C, R>& a) { return a * s; }
template <class T, int C, int R>
inline matrix<T, R, C> transpose(const matrix<T, C, R>& a) {
  matrix<T, R, C> r; for (int c = 0; c < C; ++c) for (int i = 0; i < R; ++i) r.columns[i][c] = a.columns[c][i]; return r; }
template <class T> inline T determinant(const matrix<T, 2, 2>& m) { return m[0][0] * m[1][1] - m[1][0] * m[0][1]; }
template <class T> inline T determinant(const matrix<T, 3, 3>& m) {
  return m[0][0] * (m[1][1] * m[2][2] - m[2][1] * m[1][2]) - m[1][0] * (m[0][1] * m[2][2] - m[2][1] * m[0][2]) +
         m[2][0] * (m[0][1] * m[1][2] - m[1][1] * m[0][2]);
}
template <class T> inline T determinant(const matrix<T, 4, 4>& m) {
  T d = T(0);
  for (int c = 0; c < 4; ++c) {  // expansion along row 0
    matrix<T, 3, 3> minor;
    for (int cc = 0, k = 0; cc < 4; ++cc) {
      if (cc == c) continue;
      minor[k++] = vec<T, 3>(m[cc][1], m[cc][2], m[cc][3]);
    }
    T term = m[c][0] * determinant(minor);
    d += (c % 2 == 0) ? term : T(-term);
  }
  return d;
}
#define MSL_MAT_TYPES(T)                                                                         \
  typedef matrix<T, 2, 2> T##2x2; typedef matrix<T, 2, 3> T##2x3; typedef matrix<T, 2, 4> T##2x4; \
  typedef matrix<T, 3, 2> T##3x2; typedef matrix<T, 3, 3> T##3x3; typedef matrix<T, 3, 4> T##3x4; \
  typedef matrix<T, 4, 2> T##4x2; typedef matrix<T, 4, 3> T##4x3; typedef matrix<T, 4, 4> T##4x4;
MSL_MAT_TYPES(float) MSL_MAT_TYPES(half)
#undef MSL_MAT_TYPES

// ---------------------------------------------------------------------------------------------
// as_type: reinterpret the bits (sizes must match, as Metal requires).
template <class To, class From>
inline To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To t;
  __builtin_memcpy(&t, &f, sizeof(To));
  return t;
}

// ---------------------------------------------------------------------------------------------
// Math (MSL spec tables 6.1, 6.4). Float functions work on float, half and bfloat (computed in
// float, rounded back) and on their vectors element-wise. fast:: and precise:: name the same
// functions (the emulator cannot reproduce fast-math rounding).
#define MSL_UNARY(name, fexpr)                                                                  \
  inline float name(float x) { return fexpr; }                                                   \
  inline half name(half x) { return half(name(float(x))); }                                      \
  inline bfloat name(bfloat x) { return bfloat(name(float(x))); }                                \
  template <class T, int N, bool P> inline vec<T, N> name(const basic_vec<T, N, P>& a) {         \
    vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = name(a.v[i]); return r; }
MSL_UNARY(exp, __builtin_expf(x)) MSL_UNARY(exp2, __builtin_exp2f(x)) MSL_UNARY(exp10, __builtin_powf(10.f, x))
MSL_UNARY(log, __builtin_logf(x)) MSL_UNARY(log2, __builtin_log2f(x)) MSL_UNARY(log10, __builtin_log10f(x))
MSL_UNARY(sqrt, __builtin_sqrtf(x)) MSL_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
MSL_UNARY(sin, __builtin_sinf(x)) MSL_UNARY(cos, __builtin_cosf(x)) MSL_UNARY(tan, __builtin_tanf(x))
MSL_UNARY(asin, __builtin_asinf(x)) MSL_UNARY(acos, __builtin_acosf(x)) MSL_UNARY(atan, __builtin_atanf(x))
MSL_UNARY(sinh, __builtin_sinhf(x)) MSL_UNARY(cosh, __builtin_coshf(x)) MSL_UNARY(tanh, __builtin_tanhf(x))
MSL_UNARY(asinh, __builtin_asinhf(x)) MSL_UNARY(acosh, __builtin_acoshf(x)) MSL_UNARY(atanh, __builtin_atanhf(x))
MSL_UNARY(sinpi, __builtin_sinf(x * 3.14159265358979f)) MSL_UNARY(cospi, __builtin_cosf(x * 3.14159265358979f))
MSL_UNARY(tanpi, __builtin_tanf(x * 3.14159265358979f))
MSL_UNARY(floor, __builtin_floorf(x)) MSL_UNARY(ceil, __builtin_ceilf(x)) MSL_UNARY(round, __builtin_roundf(x))
MSL_UNARY(rint, __builtin_rintf(x)) MSL_UNARY(trunc, __builtin_truncf(x)) MSL_UNARY(fabs, __builtin_fabsf(x))
MSL_UNARY(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
MSL_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.f), 1.f))
MSL_UNARY(sign, (x > 0.f ? 1.f : (x < 0.f ? -1.f : (x == x ? x : 0.f))))
#undef MSL_UNARY

#define MSL_BINARY(name, fexpr)                                                                 \
  inline float name(float x, float y) { return fexpr; }                                          \
  inline half name(half x, half y) { return half(name(float(x), float(y))); }                    \
  inline bfloat name(bfloat x, bfloat y) { return bfloat(name(float(x), float(y))); }            \
  template <class T, int N, bool P, bool Q>                                                      \
  inline vec<T, N> name(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b) {              \
    vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = name(a.v[i], b.v[i]); return r; }          \
  template <class T, int N, bool P>                                                              \
  inline vec<T, N> name(const basic_vec<T, N, P>& a, T b) {                                      \
    vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = name(a.v[i], b); return r; }
MSL_BINARY(pow, __builtin_powf(x, y)) MSL_BINARY(powr, __builtin_powf(x, y))
MSL_BINARY(atan2, __builtin_atan2f(x, y)) MSL_BINARY(fmod, __builtin_fmodf(x, y))
MSL_BINARY(fmin, __builtin_fminf(x, y)) MSL_BINARY(fmax, __builtin_fmaxf(x, y))
MSL_BINARY(copysign, __builtin_copysignf(x, y)) MSL_BINARY(step, (y < x ? 0.f : 1.f))
MSL_BINARY(divide, x / y) MSL_BINARY(fdim, (x > y ? x - y : 0.f))
MSL_BINARY(nextafter, __builtin_nextafterf(x, y))
#undef MSL_BINARY

inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return half(__builtin_fmaf(float(a), float(b), float(c))); }
inline bfloat fma(bfloat a, bfloat b, bfloat c) { return bfloat(__builtin_fmaf(float(a), float(b), float(c))); }
template <class T, int N, bool P, bool Q, bool R>
inline vec<T, N> fma(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b, const basic_vec<T, N, R>& c) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = fma(a.v[i], b.v[i], c.v[i]); return r; }

// min/max/clamp/abs (and the 3-argument forms): integers and floats, Metal's fmin-like NaN handling
// for floats.
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline T min(T a, T b) {
  if constexpr (is_msl_float<T>::value) return T(__builtin_fminf(float(a), float(b)));
  else return b < a ? b : a;
}
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline T max(T a, T b) {
  if constexpr (is_msl_float<T>::value) return T(__builtin_fmaxf(float(a), float(b)));
  else return a < b ? b : a;
}
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline T abs(T a) {
  if constexpr (is_msl_float<T>::value) return T(__builtin_fabsf(float(a)));
  else if constexpr (std::is_signed<T>::value) return a < 0 ? T(-a) : a;
  else return a;
}
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline T min3(T a, T b, T c) { return min(a, min(b, c)); }
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline T max3(T a, T b, T c) { return max(a, max(b, c)); }
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline T median3(T a, T b, T c) { return max(min(a, b), min(max(a, b), c)); }
template <class T, class = std::enable_if_t<is_msl_float<T>::value>>
inline T fmin3(T a, T b, T c) { return min3(a, b, c); }
template <class T, class = std::enable_if_t<is_msl_float<T>::value>>
inline T fmax3(T a, T b, T c) { return max3(a, b, c); }
template <class T, class = std::enable_if_t<is_msl_float<T>::value>>
inline T fmedian3(T a, T b, T c) { return median3(a, b, c); }
template <class T, int N, bool P, bool Q>
inline vec<T, N> min(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b) { vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = min(a.v[i], b.v[i]); return r; }
template <class T, int N, bool P, bool Q>
inline vec<T, N> max(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b) { vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = max(a.v[i], b.v[i]); return r; }
template <class T, int N, bool P>
inline vec<T, N> min(const basic_vec<T, N, P>& a, T b) { vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = min(a.v[i], b); return r; }
template <class T, int N, bool P>
inline vec<T, N> max(const basic_vec<T, N, P>& a, T b) { vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = max(a.v[i], b); return r; }
template <class T, int N, bool P>
inline vec<T, N> clamp(const basic_vec<T, N, P>& a, T lo, T hi) { vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = clamp(a.v[i], lo, hi); return r; }
template <class T, int N, bool P, bool Q, bool R>
inline vec<T, N> clamp(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& lo, const basic_vec<T, N, R>& hi) { vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = clamp(a.v[i], lo.v[i], hi.v[i]); return r; }
template <class T, int N, bool P>
inline vec<T, N> abs(const basic_vec<T, N, P>& a) { vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = abs(a.v[i]); return r; }

template <class T, class = std::enable_if_t<is_msl_float<T>::value>>
inline T mix(T x, T y, T a) { return T(float(x) + (float(y) - float(x)) * float(a)); }
template <class T, int N, bool P, bool Q, class A>
inline vec<T, N> mix(const basic_vec<T, N, P>& x, const basic_vec<T, N, Q>& y, const A& a) { return x + (y - x) * a; }
template <class T, class = std::enable_if_t<is_msl_float<T>::value>>
inline T smoothstep(T e0, T e1, T x) {
  float t = __builtin_fminf(__builtin_fmaxf((float(x) - float(e0)) / (float(e1) - float(e0)), 0.f), 1.f);
  return T(t * t * (3.f - 2.f * t));
}
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N, bool P, bool Q, bool R>
inline vec<T, N> select(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b, const basic_vec<bool, N, R>& c) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = c.v[i] ? b.v[i] : a.v[i]; return r; }
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline bool isnan(T x) { return float(x) != float(x); }
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline bool isinf(T x) { return __builtin_isinf(float(x)); }
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline bool isfinite(T x) { return __builtin_isfinite(float(x)); }
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline bool isnormal(T x) {
  if constexpr (std::is_same<T, half>::value) return __builtin_isfinite(float(x)) && __builtin_fabsf(float(x)) >= 6.103515625e-05f;
  else return __builtin_isnormal(float(x));
}
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline bool isordered(T x, T y) { return x == x && y == y; }
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline bool isunordered(T x, T y) { return !(x == x && y == y); }
template <class T, class = std::enable_if_t<is_msl_scalar<T>::value>>
inline bool signbit(T x) { return __builtin_signbit(float(x)); }
template <class T, int N, bool P>
inline vec<bool, N> isnan(const basic_vec<T, N, P>& a) { vec<bool, N> r; for (int i = 0; i < N; ++i) r.v[i] = isnan(a.v[i]); return r; }
template <class T, int N, bool P>
inline vec<bool, N> isinf(const basic_vec<T, N, P>& a) { vec<bool, N> r; for (int i = 0; i < N; ++i) r.v[i] = isinf(a.v[i]); return r; }
template <class T, int N, bool P>
inline vec<bool, N> isfinite(const basic_vec<T, N, P>& a) { vec<bool, N> r; for (int i = 0; i < N; ++i) r.v[i] = isfinite(a.v[i]); return r; }
inline float ldexp(float x, int e) { return __builtin_ldexpf(x, e); }
inline half ldexp(half x, int e) { return half(__builtin_ldexpf(float(x), e)); }
inline float frexp(float x, int& e) { return __builtin_frexpf(x, &e); }
inline half frexp(half x, int& e) { return half(__builtin_frexpf(float(x), &e)); }
inline int ilogb(float x) { return __builtin_ilogbf(x); }
inline int ilogb(half x) { return __builtin_ilogbf(float(x)); }
inline float modf(float x, float& ip) { return __builtin_modff(x, &ip); }
inline half modf(half x, half& ip) { float i; float f = __builtin_modff(float(x), &i); ip = half(i); return half(f); }
inline float sincos(float x, float& c) { c = __builtin_cosf(x); return __builtin_sinf(x); }
inline half sincos(half x, half& c) { c = half(__builtin_cosf(float(x))); return half(__builtin_sinf(float(x))); }

// geometric functions (MSL spec table 6.11)
template <class T, int N, bool P, bool Q>
inline T dot(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b) { T s = T(0); for (int i = 0; i < N; ++i) s += a.v[i] * b.v[i]; return s; }
template <class T, int N, bool P>
inline T length_squared(const basic_vec<T, N, P>& a) { return dot(a, a); }
template <class T, int N, bool P>
inline T length(const basic_vec<T, N, P>& a) { return sqrt(dot(a, a)); }
template <class T, int N, bool P, bool Q>
inline T distance(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b) { return length(a - b); }
template <class T, int N, bool P, bool Q>
inline T distance_squared(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b) { return length_squared(a - b); }
template <class T, int N, bool P>
inline vec<T, N> normalize(const basic_vec<T, N, P>& a) { return a * rsqrt(dot(a, a)); }
template <class T, bool P, bool Q>
inline vec<T, 3> cross(const basic_vec<T, 3, P>& a, const basic_vec<T, 3, Q>& b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x); }
template <class T, int N, bool P, bool Q, bool R>
inline vec<T, N> faceforward(const basic_vec<T, N, P>& n, const basic_vec<T, N, Q>& i, const basic_vec<T, N, R>& nref) {
  return dot(nref, i) < T(0) ? vec<T, N>(n) : vec<T, N>(-n); }
template <class T, int N, bool P, bool Q>
inline vec<T, N> reflect(const basic_vec<T, N, P>& i, const basic_vec<T, N, Q>& n) {
  vec<T, N> nn = normalize(n); return i - nn * (T(2) * dot(nn, i)); }
template <class T, int N, bool P, bool Q>
inline vec<T, N> refract(const basic_vec<T, N, P>& i, const basic_vec<T, N, Q>& n, T eta) {
  T d = dot(n, i);
  T k = T(1) - eta * eta * (T(1) - d * d);
  if (k < T(0)) return vec<T, N>(T(0));
  return i * eta - n * (eta * d + sqrt(k));
}

// integer functions (MSL spec table 6.2)
template <class T> using msl_int_t = std::enable_if_t<std::is_integral<T>::value && !std::is_same<T, bool>::value, T>;
template <class T> using msl_wide_t = std::conditional_t<std::is_signed<T>::value, long long, unsigned long long>;
template <class T>
inline msl_int_t<T> popcount(T x) { return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x)); }
template <class T>
inline msl_int_t<T> clz(T x) { return x == 0 ? T(sizeof(T) * 8) : T(__builtin_clzll((unsigned long long)(std::make_unsigned_t<T>)x) - (64 - sizeof(T) * 8)); }
template <class T>
inline msl_int_t<T> ctz(T x) { return x == 0 ? T(sizeof(T) * 8) : T(__builtin_ctzll((unsigned long long)(std::make_unsigned_t<T>)x)); }
template <class T>
inline msl_int_t<T> mulhi(T a, T b) { return T(((__int128)a * (__int128)b) >> (sizeof(T) * 8)); }
template <class T>
inline msl_int_t<T> madhi(T a, T b, T c) { return T(mulhi(a, b) + c); }
template <class T>
inline msl_int_t<T> msl_saturate_int(__int128 v) {
  __int128 lo = (__int128)std::numeric_limits<T>::min(), hi = (__int128)std::numeric_limits<T>::max();
  return T(v < lo ? lo : v > hi ? hi : v);
}
template <class T> inline msl_int_t<T> addsat(T a, T b) { return msl_saturate_int<T>((__int128)a + (__int128)b); }
template <class T> inline msl_int_t<T> subsat(T a, T b) { return msl_saturate_int<T>((__int128)a - (__int128)b); }
template <class T> inline msl_int_t<T> madsat(T a, T b, T c) { return msl_saturate_int<T>((__int128)a * (__int128)b + (__int128)c); }
template <class T>
inline std::make_unsigned_t<msl_int_t<T>> absdiff(T a, T b) { return std::make_unsigned_t<T>(a > b ? (__int128)a - b : (__int128)b - a); }
template <class T> inline msl_int_t<T> hadd(T a, T b) { return T(((__int128)a + (__int128)b) >> 1); }
template <class T> inline msl_int_t<T> rhadd(T a, T b) { return T(((__int128)a + (__int128)b + 1) >> 1); }
template <class T>
inline msl_int_t<T> extract_bits(T x, uint offset, uint bits) {
  if (bits == 0) return T(0);
  typedef std::make_unsigned_t<T> U;
  const uint W = sizeof(T) * 8;
  U u = U(U(x) << (W - offset - bits));  // the field's top bit to the top
  if constexpr (std::is_signed<T>::value) return T(T(u) >> (W - bits));  // arithmetic: sign-extends
  else return T(u >> (W - bits));
}
template <class T>
inline msl_int_t<T> insert_bits(T base, T insert, uint offset, uint bits) {
  if (bits == 0) return base;
  typedef std::make_unsigned_t<T> U;
  const uint W = sizeof(T) * 8;
  U mask = U((bits == W ? ~U(0) : U((U(1) << bits) - 1)) << offset);
  return T((U(base) & U(~mask)) | (U(U(insert) << offset) & mask));
}
template <class T>
inline msl_int_t<T> reverse_bits(T x) {
  typedef std::make_unsigned_t<T> U;
  U u = U(x), r = 0;
  for (uint i = 0; i < sizeof(T) * 8; ++i) r = U(r | (((u >> i) & 1u) << (sizeof(T) * 8 - 1 - i)));
  return T(r);
}
template <class T>
inline msl_int_t<T> rotate(T v, T i) {
  typedef std::make_unsigned_t<T> U;
  const uint W = sizeof(T) * 8;
  uint s = uint(U(i)) % W;
  U u = U(v);
  return T(s == 0 ? u : U((u << s) | (u >> (W - s))));
}
template <class T, class = std::enable_if_t<sizeof(T) == 4 && std::is_integral<T>::value>>
inline T mul24(T a, T b) {
  if constexpr (std::is_signed<T>::value) return T(int32_t(uint32_t(a) << 8) >> 8) * T(int32_t(uint32_t(b) << 8) >> 8);
  else return T(a & 0xffffffu) * T(b & 0xffffffu);
}
template <class T, class = std::enable_if_t<sizeof(T) == 4 && std::is_integral<T>::value>>
inline T mad24(T a, T b, T c) { return T(mul24(a, b) + c); }
// element-wise forms of the integer functions on vectors
#define MSL_IVEC1(name) template <class T, int N, bool P> inline auto name(const basic_vec<T, N, P>& a) { \
  vec<decltype(name(a.v[0])), N> r; for (int i = 0; i < N; ++i) r.v[i] = name(a.v[i]); return r; }
#define MSL_IVEC2(name) template <class T, int N, bool P, bool Q> inline auto name(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b) { \
  vec<decltype(name(a.v[0], b.v[0])), N> r; for (int i = 0; i < N; ++i) r.v[i] = name(a.v[i], b.v[i]); return r; }
#define MSL_IVEC3(name) template <class T, int N, bool P, bool Q, bool R> inline auto name(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b, const basic_vec<T, N, R>& c) { \
  vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = name(a.v[i], b.v[i], c.v[i]); return r; }
MSL_IVEC1(popcount) MSL_IVEC1(clz) MSL_IVEC1(ctz) MSL_IVEC1(reverse_bits)
MSL_IVEC2(mulhi) MSL_IVEC2(addsat) MSL_IVEC2(subsat) MSL_IVEC2(absdiff) MSL_IVEC2(hadd) MSL_IVEC2(rhadd)
MSL_IVEC2(rotate)
MSL_IVEC3(madhi) MSL_IVEC3(madsat) MSL_IVEC3(min3) MSL_IVEC3(max3) MSL_IVEC3(median3)
#undef MSL_IVEC1
#undef MSL_IVEC2
#undef MSL_IVEC3
template <class T, int N, bool P>
inline vec<T, N> extract_bits(const basic_vec<T, N, P>& x, uint offset, uint bits) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = extract_bits(x.v[i], offset, bits); return r; }
template <class T, int N, bool P, bool Q>
inline vec<T, N> insert_bits(const basic_vec<T, N, P>& b, const basic_vec<T, N, Q>& ins, uint offset, uint bits) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = insert_bits(b.v[i], ins.v[i], offset, bits); return r; }

namespace fast { using metal::exp; using metal::exp2; using metal::exp10; using metal::log; using metal::log2;
  using metal::log10; using metal::sqrt; using metal::rsqrt; using metal::sin; using metal::cos; using metal::tan;
  using metal::tanh; using metal::pow; using metal::powr; using metal::divide; using metal::fabs; using metal::abs;
  using metal::min; using metal::max; using metal::fmin; using metal::fmax; using metal::clamp; using metal::floor;
  using metal::ceil; using metal::round; using metal::trunc; using metal::fma; using metal::atan; using metal::atan2;
  using metal::sinh; using metal::cosh; using metal::asin; using metal::acos; using metal::saturate; using metal::fract;
  using metal::asinh; using metal::acosh; using metal::atanh; using metal::sinpi; using metal::cospi; using metal::tanpi;
  using metal::sincos; using metal::fmin3; using metal::fmax3; using metal::fmedian3; using metal::fdim; using metal::fmod;
  using metal::rint; using metal::copysign; using metal::ldexp; using metal::frexp; using metal::modf; using metal::ilogb;
  using metal::normalize; using metal::length; using metal::distance; using metal::length_squared;
  using metal::distance_squared; }
namespace precise { using namespace fast; }

// numeric_limits (with half and bfloat), constexpr as in Metal
template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr half max() { return half(65504.0f); }
  static constexpr half min() { return half(6.103515625e-05f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0.0009765625f); }
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr bfloat bits(uint16_t b) { return bfloat(bfloat::raw_t{}, b); }
  static constexpr bfloat max() { return bits(0x7f7f); }
  static constexpr bfloat min() { return bits(0x0080); }
  static constexpr bfloat lowest() { return bits(0xff7f); }
  static constexpr bfloat epsilon() { return bits(0x3c00); }
  static constexpr bfloat infinity() { return bits(0x7f80); }
  static constexpr bfloat quiet_NaN() { return bits(0x7fc0); }
};
using std::is_same; using std::is_same_v; using std::enable_if; using std::enable_if_t;
using std::conditional; using std::conditional_t; using std::is_integral; using std::is_integral_v;
using std::is_signed; using std::is_unsigned; using std::make_unsigned; using std::make_unsigned_t;
template <class T> struct is_floating_point : std::integral_constant<bool, is_msl_float<T>::value> {};
template <class T> constexpr bool is_floating_point_v = is_floating_point<T>::value;

// memory orders and flags
enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release, memory_order_acq_rel, memory_order_seq_cst };
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8, mem_object_data = 16 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
enum class thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };

// ---------------------------------------------------------------------------------------------
// Atomics: metal::atomic<T> holds a T; operations are real atomics (threadgroups run on several
// OS threads at once). Floats and 16-bit types use a compare-and-swap loop on their bits.
template <class T> struct atomic { T value; };
typedef atomic<int> atomic_int; typedef atomic<uint> atomic_uint; typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool; typedef atomic<ulong> atomic_ulong; typedef atomic<long> atomic_long;

template <class P> inline auto* msl_raw(P p) { return &*p; }
template <class T> struct msl_bits { typedef std::conditional_t<sizeof(T) == 1, uint8_t, std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>> type; };

}  // namespace metal
namespace msl { static inline void spin_point(); }
namespace metal {

template <class T, class F>
inline T msl_atomic_rmw(atomic<T>* a, F f) {
  typedef typename msl_bits<T>::type B;
  B* p = reinterpret_cast<B*>(&a->value);
  B old = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    T ov; __builtin_memcpy(&ov, &old, sizeof(T));
    T nv = f(ov);
    B nb; __builtin_memcpy(&nb, &nv, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old, nb, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return ov;
  }
}
#define MSL_ATOMIC_OP(name, expr)                                                                  \
  template <class P, class U>                                                                      \
  inline auto name(P obj, U arg, memory_order = memory_order_relaxed) {                            \
    auto* a = msl_raw(obj);                                                                        \
    typedef decltype(a->value) T;                                                                  \
    T y = T(arg);                                                                                  \
    return msl_atomic_rmw(a, [&](T x) { return T(expr); });                                        \
  }
MSL_ATOMIC_OP(atomic_fetch_add_explicit, x + y) MSL_ATOMIC_OP(atomic_fetch_sub_explicit, x - y)
MSL_ATOMIC_OP(atomic_fetch_min_explicit, (y < x ? y : x)) MSL_ATOMIC_OP(atomic_fetch_max_explicit, (x < y ? y : x))
MSL_ATOMIC_OP(atomic_fetch_and_explicit, x & y) MSL_ATOMIC_OP(atomic_fetch_or_explicit, x | y)
MSL_ATOMIC_OP(atomic_fetch_xor_explicit, x ^ y) MSL_ATOMIC_OP(atomic_exchange_explicit, y)
#undef MSL_ATOMIC_OP
template <class P>
inline auto atomic_load_explicit(P obj, memory_order = memory_order_relaxed) {
  auto* a = msl_raw(obj);
  typedef decltype(a->value) T;
  typedef typename msl_bits<T>::type B;
  msl::spin_point();
  B b = __atomic_load_n(reinterpret_cast<B*>(&a->value), __ATOMIC_SEQ_CST);
  T v; __builtin_memcpy(&v, &b, sizeof(T)); return v;
}
template <class P, class U>
inline void atomic_store_explicit(P obj, U arg, memory_order = memory_order_relaxed) {
  auto* a = msl_raw(obj);
  typedef decltype(a->value) T;
  typedef typename msl_bits<T>::type B;
  T v = T(arg); B b; __builtin_memcpy(&b, &v, sizeof(T));
  __atomic_store_n(reinterpret_cast<B*>(&a->value), b, __ATOMIC_SEQ_CST);
}
template <class P, class E, class U>
inline bool atomic_compare_exchange_weak_explicit(P obj, E* expected, U desired, memory_order = memory_order_relaxed, memory_order = memory_order_relaxed) {
  auto* a = msl_raw(obj);
  typedef decltype(a->value) T;
  typedef typename msl_bits<T>::type B;
  msl::spin_point();
  T d = T(desired); B db; __builtin_memcpy(&db, &d, sizeof(T));
  B eb; T e = T(*expected); __builtin_memcpy(&eb, &e, sizeof(T));
  bool ok = __atomic_compare_exchange_n(reinterpret_cast<B*>(&a->value), &eb, db, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  if (!ok) { __builtin_memcpy(&e, &eb, sizeof(T)); *expected = E(e); }
  return ok;
}
template <class P, class E, class U>
inline bool atomic_compare_exchange_strong_explicit(P obj, E* expected, U desired, memory_order m1 = memory_order_relaxed, memory_order m2 = memory_order_relaxed) {
  return atomic_compare_exchange_weak_explicit(obj, expected, desired, m1, m2);
}

}  // namespace metal

// SIMD and quad collectives, SIMD-group matrices, barriers, the scheduler, guarded pointers.
#include "runtime.h"

// ---------------------------------------------------------------------------------------------
// MSL keywords. Address spaces are erased (see the module docstring); in guarded mode the build
// step first rewrites `device T*`, `constant T*` and `threadgroup T*` into msl::ptr / msl::cptr
// types tagged with their address space. `threadgroup` storage declarations are rewritten into
// per-threadgroup storage before compilation.
#define device
#define constant
#define thread
#define threadgroup
#define kernel
#define METAL_FUNC inline __attribute__((always_inline))
#define STEEL_CONST static constant constexpr const
#define STEEL_PRAGMA_UNROLL _Pragma("GCC unroll 16")

// ---------------------------------------------------------------------------------------------
// Constants and macros of the Metal standard library (MSL spec tables 6.5-6.7, section 7 limits).
// The language version kernels see: Metal 3.1 (bfloat, simdgroup_bfloat8x8, nextafter).
#define __METAL_VERSION__ 310
#define __HAVE_BFLOAT__ 1
#define MAXFLOAT 0x1.fffffep+127f
#define HUGE_VALF __builtin_huge_valf()
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define FLT_MAX 0x1.fffffep+127f
#define FLT_MIN 0x1p-126f
#define FLT_EPSILON 0x1p-23f
#define FLT_DIG 6
#define FLT_MANT_DIG 24
#define FLT_MAX_EXP 128
#define FLT_MIN_EXP (-125)
#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LOG10E_F 0.434294481903251827651f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_PI_F 3.14159265358979323846f
#define M_PI_2_F 1.57079632679489661923f
#define M_PI_4_F 0.785398163397448309616f
#define M_1_PI_F 0.318309886183790671538f
#define M_2_PI_F 0.636619772367581343076f
#define M_2_SQRTPI_F 1.12837916709551257390f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.707106781186547524401f
#define MAXHALF half(65504.0f)
#define HALF_MAX half(65504.0f)
#define HALF_MIN half(6.103515625e-05f)
#define HALF_EPSILON half(0.0009765625f)
#define HUGE_VALH half(__builtin_inff())
#define M_E_H half(M_E_F)
#define M_LOG2E_H half(M_LOG2E_F)
#define M_LOG10E_H half(M_LOG10E_F)
#define M_LN2_H half(M_LN2_F)
#define M_LN10_H half(M_LN10_F)
#define M_PI_H half(M_PI_F)
#define M_PI_2_H half(M_PI_2_F)
#define M_PI_4_H half(M_PI_4_F)
#define M_1_PI_H half(M_1_PI_F)
#define M_2_PI_H half(M_2_PI_F)
#define M_2_SQRTPI_H half(M_2_SQRTPI_F)
#define M_SQRT2_H half(M_SQRT2_F)
#define M_SQRT1_2_H half(M_SQRT1_2_F)
#define MAXBFLOAT (metal::numeric_limits<metal::bfloat>::max())
#define HUGE_VALBF (metal::numeric_limits<metal::bfloat>::infinity())
#define M_E_BF bfloat(M_E_F)
#define M_LOG2E_BF bfloat(M_LOG2E_F)
#define M_LOG10E_BF bfloat(M_LOG10E_F)
#define M_LN2_BF bfloat(M_LN2_F)
#define M_LN10_BF bfloat(M_LN10_F)
#define M_PI_BF bfloat(M_PI_F)
#define M_PI_2_BF bfloat(M_PI_2_F)
#define M_PI_4_BF bfloat(M_PI_4_F)
#define M_1_PI_BF bfloat(M_1_PI_F)
#define M_2_PI_BF bfloat(M_2_PI_F)
#define M_2_SQRTPI_BF bfloat(M_2_SQRTPI_F)
#define M_SQRT2_BF bfloat(M_SQRT2_F)
#define M_SQRT1_2_BF bfloat(M_SQRT1_2_F)

// Half-precision literals: 1.0h, 0.5H (a floating literal with an h suffix is a half in Metal).
inline half operator"" h(long double v) { return half(v); }
inline half operator"" H(long double v) { return half(v); }

// ---------------------------------------------------------------------------------------------
// Stand-in for MLX's JIT prelude (metal::utils(): bf16.h, bf16_math.h, complex.h, defines.h,
// logging.h, utils.h). Only the parts kernels use are provided; see the module docstring.
using namespace metal;
typedef half float16_t;
typedef bfloat bfloat16_t;
#define MLX_MTL_PRAGMA_UNROLL _Pragma("GCC unroll 16")
#define MLX_MTL_CONST static constant constexpr const
#define MLX_MTL_LOOP_UNROLL _Pragma("GCC unroll 16")

template <typename U> struct WorkPerThread { static constexpr int n = 8 / sizeof(U); };
// MLX's Limits<T> (utils.h, MLX 0.32): integers span numeric_limits; floating types have max = +inf,
// min = -inf, finite_max = the largest finite value, finite_min = its negation.
template <typename U> struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::min();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::min();
};
#define MSL_FLOAT_LIMIT(type)                                                 \
  template <> struct Limits<type> {                                           \
    static constexpr type max = metal::numeric_limits<type>::infinity();      \
    static constexpr type min = -metal::numeric_limits<type>::infinity();     \
    static constexpr type finite_max = metal::numeric_limits<type>::max();    \
    static constexpr type finite_min = -metal::numeric_limits<type>::max();   \
  };
MSL_FLOAT_LIMIT(half) MSL_FLOAT_LIMIT(float) MSL_FLOAT_LIMIT(bfloat16_t)
#undef MSL_FLOAT_LIMIT
template <> struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};

// elem_to_loc takes the shape and strides buffers as any pointer type (guarded mode passes them
// as constant-address-space pointers).
template <typename IdxT = int64_t, class Sh, class St>
METAL_FUNC IdxT elem_to_loc(IdxT elem, Sh shape, St strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t, class Sh, class St>
METAL_FUNC IdxT elem_to_loc(uint elem, Sh shape, St strides, int ndim) {
  return elem_to_loc<IdxT>(IdxT(elem), shape, strides, ndim);
}
template <typename IdxT = int64_t, class Sh, class St>
METAL_FUNC IdxT elem_to_loc(int elem, Sh shape, St strides, int ndim) {
  return elem_to_loc<IdxT>(IdxT(elem), shape, strides, ndim);
}
template <typename IdxT = int64_t, class Sh, class St>
METAL_FUNC IdxT elem_to_loc(uint3 elem, Sh shape, St strides, int ndim) {
  IdxT loc = IdxT(elem.x) * IdxT(strides[ndim - 1]) + IdxT(elem.y) * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_1(uint elem, const int64_t& stride) { return IdxT(elem) * IdxT(stride); }
template <typename IdxT = int64_t, class St>
METAL_FUNC IdxT elem_to_loc_2(uint2 elem, St strides) {
  return IdxT(elem.x) * IdxT(strides[1]) + IdxT(elem.y) * IdxT(strides[0]);
}
template <typename IdxT = int64_t, class St>
METAL_FUNC IdxT elem_to_loc_3(uint3 elem, St strides) {
  return IdxT(elem.x) * IdxT(strides[2]) + IdxT(elem.y) * IdxT(strides[1]) + IdxT(elem.z) * IdxT(strides[0]);
}
inline uint ceildiv(uint n, uint d) { return (n + d - 1) / d; }
