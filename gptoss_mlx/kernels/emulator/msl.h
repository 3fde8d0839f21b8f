// msl.h: the subset of the Metal Shading Language that gptoss-mlx kernels use, as C++17 for g++,
// plus a C++ stand-in for MLX's JIT prelude (mlx/backend/metal/kernels/utils.h: float16_t,
// bfloat16_t, elem_to_loc, Limits, ...). It is included first in every translation unit the
// emulator compiles, before the kernel source that MLX would generate.
//
// Semantics that matter for bug finding live in runtime.h (fibers, barriers, SIMD collectives,
// poisoning); this file has the types and functions.
#pragma once

#include <stdint.h>
#include <stddef.h>
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
  bfloat() = default;
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
  bfloat operator-() const { bfloat r; r.bits = bits ^ 0x8000; return r; }
  bfloat operator+() const { return *this; }
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
template <class T, int N, bool P> struct basic_vec;
template <class T, int N> using vec = basic_vec<T, N, false>;
template <class T, int N> using packed_vec = basic_vec<T, N, true>;

template <class T> struct vec_info { static constexpr int n = 1; typedef T elem; };
template <class T, int N, bool P> struct vec_info<basic_vec<T, N, P>> { static constexpr int n = N; typedef T elem; };

template <class T, int N, bool P>
struct basic_vec_storage;
template <class T, bool P>
struct alignas(P ? alignof(T) : 2 * sizeof(T)) basic_vec_storage<T, 2, P> {
  union { T v[2]; struct { T x, y; }; struct { T r, g; }; };
};
template <class T, bool P>
struct alignas(P ? alignof(T) : 4 * sizeof(T)) basic_vec_storage<T, 3, P> {
  union {
    T v[P ? 3 : 4];
    struct { T x, y, z; };
    struct { T r, g, b; };
    struct { basic_vec<T, 2, true> xy; };
    struct { T x_; basic_vec<T, 2, true> yz; };
  };
};
template <class T, bool P>
struct alignas(P ? alignof(T) : 4 * sizeof(T)) basic_vec_storage<T, 4, P> {
  union {
    T v[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    struct { basic_vec<T, 2, true> xy, zw; };
    struct { basic_vec<T, 3, true> xyz; };
    struct { T x_; basic_vec<T, 2, true> yz; };
    struct { T x__; basic_vec<T, 3, true> yzw; };
  };
};

template <class T, int N, bool P>
struct basic_vec : basic_vec_storage<T, N, P> {
  using basic_vec_storage<T, N, P>::v;
  typedef T value_type;
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

 private:
  template <class S> void put(int& k, const S& s) {
    if constexpr (vec_info<S>::n == 1) { v[k++] = T(s); }
    else { for (int i = 0; i < vec_info<S>::n; ++i) v[k++] = T(s.v[i]); }
  }
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
// Math. Float functions work on float, half and bfloat (computed in float, rounded back) and on
// their vectors element-wise. fast:: and precise:: name the same functions (see the docstring: the
// emulator cannot reproduce fast-math rounding).
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
MSL_UNARY(floor, __builtin_floorf(x)) MSL_UNARY(ceil, __builtin_ceilf(x)) MSL_UNARY(round, __builtin_roundf(x))
MSL_UNARY(rint, __builtin_rintf(x)) MSL_UNARY(trunc, __builtin_truncf(x)) MSL_UNARY(fabs, __builtin_fabsf(x))
MSL_UNARY(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
MSL_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.f), 1.f))
MSL_UNARY(sign, (x > 0.f ? 1.f : (x < 0.f ? -1.f : (x == x ? 0.f * x : 0.f))))
MSL_UNARY(erf, __builtin_erff(x))
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
MSL_BINARY(divide, x / y)
#undef MSL_BINARY

inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return half(__builtin_fmaf(float(a), float(b), float(c))); }
inline bfloat fma(bfloat a, bfloat b, bfloat c) { return bfloat(__builtin_fmaf(float(a), float(b), float(c))); }
template <class T, int N, bool P, bool Q, bool R>
inline vec<T, N> fma(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b, const basic_vec<T, N, R>& c) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r.v[i] = fma(a.v[i], b.v[i], c.v[i]); return r; }

// min/max/clamp/abs: integers and floats. Metal's fmin-like NaN handling for floats.
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
inline bool signbit(T x) { return __builtin_signbit(float(x)); }
template <class T, int N, bool P>
inline vec<bool, N> isnan(const basic_vec<T, N, P>& a) { vec<bool, N> r; for (int i = 0; i < N; ++i) r.v[i] = isnan(a.v[i]); return r; }
template <class T, int N, bool P>
inline vec<bool, N> isinf(const basic_vec<T, N, P>& a) { vec<bool, N> r; for (int i = 0; i < N; ++i) r.v[i] = isinf(a.v[i]); return r; }
inline float ldexp(float x, int e) { return __builtin_ldexpf(x, e); }
inline half ldexp(half x, int e) { return half(__builtin_ldexpf(float(x), e)); }
template <class T, int N, bool P, bool Q>
inline T dot(const basic_vec<T, N, P>& a, const basic_vec<T, N, Q>& b) { T s = T(0); for (int i = 0; i < N; ++i) s += a.v[i] * b.v[i]; return s; }
template <class T, int N, bool P>
inline T length(const basic_vec<T, N, P>& a) { return sqrt(dot(a, a)); }

// integer functions
template <class T, class = std::enable_if_t<std::is_integral<T>::value>>
inline T popcount(T x) { return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x)); }
template <class T, class = std::enable_if_t<std::is_integral<T>::value>>
inline T clz(T x) { return x == 0 ? T(sizeof(T) * 8) : T(__builtin_clzll((unsigned long long)(std::make_unsigned_t<T>)x) - (64 - sizeof(T) * 8)); }
template <class T, class = std::enable_if_t<std::is_integral<T>::value>>
inline T ctz(T x) { return x == 0 ? T(sizeof(T) * 8) : T(__builtin_ctzll((unsigned long long)(std::make_unsigned_t<T>)x)); }
template <class T, class = std::enable_if_t<std::is_integral<T>::value>>
inline T mulhi(T a, T b) { return T(((__int128)a * (__int128)b) >> (sizeof(T) * 8)); }

namespace fast { using metal::exp; using metal::exp2; using metal::exp10; using metal::log; using metal::log2;
  using metal::log10; using metal::sqrt; using metal::rsqrt; using metal::sin; using metal::cos; using metal::tan;
  using metal::tanh; using metal::pow; using metal::powr; using metal::divide; using metal::fabs; using metal::abs;
  using metal::min; using metal::max; using metal::fmin; using metal::fmax; using metal::clamp; using metal::floor;
  using metal::ceil; using metal::round; using metal::trunc; using metal::fma; using metal::atan; using metal::atan2;
  using metal::sinh; using metal::cosh; using metal::asin; using metal::acos; using metal::saturate; using metal::fract; }
namespace precise { using namespace fast; }

// numeric_limits (with half and bfloat)
template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static half max() { return half(65504.0f); }
  static half min() { return half(6.103515625e-05f); }
  static half lowest() { return half(-65504.0f); }
  static half epsilon() { return half(0.0009765625f); }
  static half infinity() { return half(__builtin_inff()); }
  static half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static bfloat bits(uint16_t b) { bfloat r; r.bits = b; return r; }
  static bfloat max() { return bits(0x7f7f); }
  static bfloat min() { return bits(0x0080); }
  static bfloat lowest() { return bits(0xff7f); }
  static bfloat epsilon() { return bits(0x3c00); }
  static bfloat infinity() { return bits(0x7f80); }
  static bfloat quiet_NaN() { return bits(0x7fc0); }
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

// SIMD and quad collectives, barriers and the scheduler.
#include "runtime.h"

// ---------------------------------------------------------------------------------------------
// MSL keywords. Address spaces are erased (see the module docstring): `threadgroup` storage
// declarations are rewritten by the emulator into per-threadgroup storage before compilation.
#define device
#define constant
#define thread
#define threadgroup
#define kernel
#define METAL_FUNC inline __attribute__((always_inline))
#define STEEL_CONST static constant constexpr const
#define STEEL_PRAGMA_UNROLL _Pragma("GCC unroll 16")

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
template <typename U> struct Limits {
  static U max_() { return metal::numeric_limits<U>::max(); }
};

template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(IdxT elem, constant const int* shape, constant const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(uint elem, constant const int* shape, constant const int64_t* strides, int ndim) {
  return elem_to_loc<IdxT>(IdxT(elem), shape, strides, ndim);
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(int elem, constant const int* shape, constant const int64_t* strides, int ndim) {
  return elem_to_loc<IdxT>(IdxT(elem), shape, strides, ndim);
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(uint3 elem, constant const int* shape, constant const int64_t* strides, int ndim) {
  IdxT loc = IdxT(elem.x) * IdxT(strides[ndim - 1]) + IdxT(elem.y) * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_1(uint elem, constant const int64_t& stride) { return IdxT(elem) * IdxT(stride); }
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_2(uint2 elem, constant const int64_t strides[2]) {
  return IdxT(elem.x) * IdxT(strides[1]) + IdxT(elem.y) * IdxT(strides[0]);
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_3(uint3 elem, constant const int64_t strides[3]) {
  return IdxT(elem.x) * IdxT(strides[2]) + IdxT(elem.y) * IdxT(strides[1]) + IdxT(elem.z) * IdxT(strides[0]);
}
inline uint ceildiv(uint n, uint d) { return (n + d - 1) / d; }
