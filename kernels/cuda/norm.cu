// norm.cu: see kcuda.h (being written).
