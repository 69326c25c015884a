// sample.cu: see kcuda.h (being written).
