/* matmul_avx512.c: stub */
#include "kernels/cpu/kcpu.h"
void kc_quantize_avx512(const struct kc_mm *m, int64_t r0, int64_t r1) { kc_quantize_scalar(m, r0, r1); }
size_t kc_mm_work_avx512(const struct kc_mm *m) { return kc_mm_work_scalar(m); }
void kc_mm_rows_avx512(const struct kc_mm *m, int64_t o0, int64_t o1, void *work) { kc_mm_rows_scalar(m, o0, o1, work); }
