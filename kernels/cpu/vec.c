/* vec.c: the small vector ops of a model step (dot, axpy, rmsnorm,
 * silu * up, softmax) and k_expf. The front ends pick the path; the scalar
 * versions here state the canonical order (kcpu.h) the SIMD versions in
 * vec_avx2.c and vec_avx512.c reproduce bit for bit.
 */
#include "kernels/cpu/kcpu.h"

float k_dot_f32(const float *a, const float *b, int64_t n)
{
    return kc_ops()->dot(a, b, n);
}

void k_axpy_f32(float *y, float a, const float *x, int64_t n)
{
    kc_ops()->axpy(y, a, x, n);
}

void k_dot_rows_f32(const float *a, const float *b, int64_t stride,
                    int64_t count, int64_t n, float *out)
{
    kc_ops()->dot_rows(a, b, stride, count, n, out);
}

void k_axpy_rows_f32(float *y, const float *w, const float *x, int64_t stride,
                     int64_t count, int64_t n)
{
    kc_ops()->axpy_rows(y, w, x, stride, count, n);
}

void k_rmsnorm(float *out, const float *x, const float *w, int64_t n,
               float eps)
{
    kc_ops()->rmsnorm(out, x, w, n, eps);
}

void k_silu_mul(float *out, const float *gate, const float *up, int64_t n)
{
    kc_ops()->silu_mul(out, gate, up, n);
}

void k_softmax_f32(float *x, int64_t n)
{
    kc_ops()->softmax(x, n);
}

float k_expf(float x)
{
    return kc_expf(x);
}

/* ----------------------------------------------------- scalar versions */

float kc_dot_scalar(const float *a, const float *b, int64_t n)
{
    float acc[16] = {0};
    for (int64_t i = 0; i < n; i++)
        acc[i & 15] = fmaf(a[i], b[i], acc[i & 15]);
    return kc_tree16(acc);
}

void kc_axpy_scalar(float *y, float a, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = fmaf(a, x[i], y[i]);
}

void kc_dot_rows_scalar(const float *a, const float *b, int64_t stride,
                        int64_t count, int64_t n, float *out)
{
    for (int64_t t = 0; t < count; t++)
        out[t] = kc_dot_scalar(a, b + t * stride, n);
}

void kc_axpy_rows_scalar(float *y, const float *w, const float *x,
                         int64_t stride, int64_t count, int64_t n)
{
    for (int64_t t = 0; t < count; t++)
        kc_axpy_scalar(y, w[t], x + t * stride, n);
}

void kc_rmsnorm_scalar(float *out, const float *x, const float *w,
                           int64_t n, float eps)
{
    float ss = kc_dot_scalar(x, x, n);
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = (x[i] * r) * w[i];
}

void kc_silu_mul_scalar(float *out, const float *g, const float *u,
                            int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        out[i] = (g[i] / (1.0f + kc_expf(-g[i]))) * u[i];
}

void kc_softmax_scalar(float *x, int64_t n)
{
    float mx = x[0];
    for (int64_t i = 1; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    float acc[16] = {0};
    for (int64_t i = 0; i < n; i++) {
        x[i] = kc_expf(x[i] - mx);
        acc[i & 15] += x[i];
    }
    float s = kc_tree16(acc);
    for (int64_t i = 0; i < n; i++)
        x[i] = x[i] / s;
}

