/* vec_avx512.c: stub */
#include "kernels/cpu/kcpu.h"
float kc_dot_avx512(const float *a, const float *b, int64_t n) { return kc_dot_scalar(a, b, n); }
void kc_axpy_avx512(float *y, float a, const float *x, int64_t n) { kc_axpy_scalar(y, a, x, n); }
void kc_rmsnorm_avx512(float *out, const float *x, const float *w, int64_t n, float eps) { kc_rmsnorm_scalar(out, x, w, n, eps); }
void kc_silu_mul_avx512(float *out, const float *g, const float *u, int64_t n) { kc_silu_mul_scalar(out, g, u, n); }
void kc_softmax_avx512(float *x, int64_t n) { kc_softmax_scalar(x, n); }
