// gemm.cu: see kcuda.h (being written).
