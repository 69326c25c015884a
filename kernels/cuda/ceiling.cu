// ceiling.cu: see kcuda.h (being written).
